"""Configs of the decompositions: one frozen, keyword-only dataclass per method.

Every config has a ``rank`` spec (see :mod:`slimtorch.decompose.ranks`), ``round_to`` (round each
rank to a multiple, e.g. 8 for hardware efficiency; 1 = off) and ``min_saving`` (the fraction of
a layer's parameters a factorisation must save to be applied; the default 0 still requires a
strict reduction). ``min_speedup``, ``speed_on`` and ``speed_batch`` make ``decompose_`` keep a
factorised layer only where it runs faster (see :mod:`slimtorch.decompose.speed`).

Example:
    >>> TuckerConfig(rank="vbmf", round_to=8).to_dict()["rank"]
    'vbmf'
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from slimtorch.core.config import Config, check_bool, check_choice, check_int, check_range
from slimtorch.decompose.ranks import RankKind, RankSpec, parse_rank_spec


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecomposeConfig(Config):
    """Fields shared by every decomposition config.

    Attributes:
        rank: Rank spec: float fraction in ``(0, 1]``, int, ``"vbmf"``, ``"energy:x"`` or
            ``"budget:params=x"`` / ``"budget:flops=x"`` (each method says which forms it accepts
            and what the fraction is of).
        round_to: Round every rank to a multiple of this (1 = no rounding).
        min_saving: Skip a layer unless it saves at least this fraction of its parameters.
        min_speedup: ``None``: no speed check. Otherwise keep a factorised layer only if the
            original layer's time over the factorised one's is at least this (``> 0``; e.g. 1.1),
            else restore the original and report the skip with both times. Needs
            ``example_input`` in ``decompose_``.
        speed_on: ``"measured"`` (time both layers on the device they are on) or a registered
            device profile name (``"rx580"``: roofline estimate on that profile).
        speed_batch: Batch size to time at, or several (a layer is kept factorised only if it is
            at least ``min_speedup`` faster at every one of them, so a deployment range such as
            ``(1, 32, 256)`` sees no slow-down); ``None``: the batch of ``example_input``.
        speed_channels_last: Time both layers on channels-last (NHWC) inputs and weights, the
            layout a deployment that runs the model in ``torch.channels_last`` uses. Layouts
            change which layer is faster: on an H100, cuDNN's NHWC kernels run a dense VGG
            about 1.5x faster than NCHW at batch 4096 and change the factorised-vs-dense
            ratio layer by layer, so gate in the layout the model will run in.
        speed_scope: ``"layer"``: time each factorised layer alone against the original.
            ``"model"``: time the whole model instead (measured only), with and without each
            factorised layer, dropping first the layers that save the fewest FLOPs, and keep a
            layer factorised only if the whole model is at least ``min_speedup`` faster with it
            (see :mod:`slimtorch.decompose.model_gate`). A layer alone can be faster and the
            model not (fusion, layout changes, launches around it), and the reverse. One
            layer moves the whole model by a few percent at most, so ``min_speedup`` 1.0-1.01
            is the useful range there.
        speed_compile: With ``speed_scope="model"``, time the models under ``torch.compile``
            (static shapes), the way a GPU deployment runs them. It ends with
            ``torch._dynamo.reset()``, which also drops the caller's own compiled code.
    """

    RANK_KINDS: ClassVar[tuple[RankKind, ...]] = ("fraction", "int", "vbmf", "energy", "budget")
    METHOD: ClassVar[str] = "decompose"

    rank: float | int | str = 0.25
    round_to: int = 1
    min_saving: float = 0.0
    min_speedup: float | None = None
    speed_on: str = "measured"
    speed_batch: int | tuple[int, ...] | None = None
    speed_channels_last: bool = False
    speed_scope: str = "layer"
    speed_compile: bool = False

    def __post_init__(self) -> None:
        self.rank_spec  # noqa: B018 - validates
        check_choice(self, "speed_scope", self.speed_scope, ("layer", "model"))
        for flag in ("speed_channels_last", "speed_compile"):
            check_bool(self, flag, getattr(self, flag))
        if self.speed_scope == "model" and self.speed_on != "measured":
            raise ValueError(
                f"{type(self).__name__}.speed_scope='model' times the whole model here; it "
                f"cannot use a roofline profile (speed_on={self.speed_on!r}); use "
                "speed_scope='layer' for profile estimates"
            )
        check_int(self, "round_to", self.round_to, low=1)
        check_range(self, "min_saving", self.min_saving, low=0.0, high=1.0, high_inclusive=False)
        name = type(self).__name__
        if self.min_speedup is not None:
            check_range(self, "min_speedup", self.min_speedup, low=0.0, low_inclusive=False)
        if isinstance(self.speed_batch, list | tuple):
            if not self.speed_batch:
                raise ValueError(f"{name}.speed_batch must not be empty, got {self.speed_batch!r}")
            for b in self.speed_batch:
                check_int(self, "speed_batch", b, low=1)
            object.__setattr__(self, "speed_batch", tuple(self.speed_batch))
        elif self.speed_batch is not None:
            check_int(self, "speed_batch", self.speed_batch, low=1)
        if not isinstance(self.speed_on, str) or not self.speed_on:
            raise ValueError(
                f"{name}.speed_on must be 'measured' or a device profile name, "
                f"got {self.speed_on!r}"
            )
        if self.speed_on != "measured":
            from slimtorch.core.profiles import list_profiles  # lazy: profiles may be added late

            known = list_profiles()
            if self.speed_on not in known:
                raise ValueError(
                    f"{name}.speed_on must be 'measured' or one of the registered device "
                    f"profiles ({', '.join(known)}), got {self.speed_on!r}; register the "
                    "profile with slimtorch.core.profiles.register_profile first"
                )

    def speed_batches(self) -> tuple[int, ...]:
        """The batch sizes of the speed check; empty: the batch of ``example_input``.

        Example:
            >>> SVDConfig(speed_batch=32).speed_batches(), SVDConfig().speed_batches()
            ((32,), ())
        """
        if self.speed_batch is None:
            return ()
        if isinstance(self.speed_batch, tuple):
            return self.speed_batch
        return (self.speed_batch,)

    @property
    def rank_spec(self) -> RankSpec:
        """The parsed ``rank`` (raises ``ValueError`` naming the field when invalid)."""
        return parse_rank_spec(
            self.rank, field=f"{type(self).__name__}.rank", allowed=self.RANK_KINDS
        )

    @property
    def method(self) -> str:
        """Short method name for reports (``"svd"``, ``"tucker"``, ``"cp"``, ``"tt"``)."""
        return self.METHOD


@dataclasses.dataclass(frozen=True, kw_only=True)
class SVDConfig(DecomposeConfig):
    """Truncated SVD of ``nn.Linear`` and 1x1 ``nn.Conv2d`` layers.

    ``rank``: a fraction of ``min(out, in)``, an int, ``"energy:x"`` (share of ``sum s^2``
    kept) or ``"vbmf"`` (EVBMF on the weight matrix).

    Example:
        >>> SVDConfig(rank=0.5).method
        'svd'
    """

    METHOD: ClassVar[str] = "svd"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuckerConfig(DecomposeConfig):
    """Tucker-2 (HOSVD + HOOI) of dense ``nn.Conv2d`` layers (Kim et al., 2016, arXiv:1511.06530).

    ``rank``: a fraction of each channel count, an int for both modes, ``"energy:x"`` or
    ``"vbmf"`` on each channel-mode unfolding.

    Attributes:
        n_iter: Maximum HOOI sweeps (0: truncated HOSVD only).
        tol: HOOI stops when the relative error changes by less than this.
        batch_kernels: Factorise the targeted kernels of one shape and rank together
            (:func:`~slimtorch.decompose.batched.tucker2_many`) before building the layers;
            ``None``: on GPUs only (on the CPU, LAPACK solves the matrices one at a time either
            way and batching measured no faster).

    Example:
        >>> TuckerConfig(rank=0.25, n_iter=10).n_iter
        10
    """

    METHOD: ClassVar[str] = "tucker"

    n_iter: int = 25
    tol: float = 1e-7
    batch_kernels: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "n_iter", self.n_iter, low=0)
        check_range(self, "tol", self.tol, low=0.0)
        check_choice(self, "batch_kernels", self.batch_kernels, (None, True, False))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CPConfig(DecomposeConfig):
    """CP by damped ALS of dense spatial ``nn.Conv2d`` layers (Lebedev et al., 2015,
    arXiv:1412.6553).

    ``rank``: an int ``R``, or a fraction of the parameter-neutral rank
    ``C_out C_in kh kw / (C_out + C_in + kh + kw)`` (so 0.25 keeps about a quarter of the
    parameters).

    Attributes:
        n_iter: Maximum ALS sweeps.
        tol: Converged when the relative error changes by less than this between sweeps.
        reg: Proximal Tikhonov damping of each ALS solve (0: plain ALS).
        init: ``"svd"`` or ``"random"``.
        require_convergence: A run that does not reach ``tol`` fails (and the layer is skipped).
        batch_kernels: Factorise the targeted kernels of one shape and rank together
            (:func:`~slimtorch.decompose.cp_batched.cp_als_many`, CUDA-graph sweeps on NVIDIA
            GPUs) before building the layers; ``None``: on GPUs only.

    Example:
        >>> CPConfig(rank=16).rank_spec.kind
        'int'
    """

    RANK_KINDS: ClassVar[tuple[RankKind, ...]] = ("fraction", "int")
    METHOD: ClassVar[str] = "cp"

    n_iter: int = 300
    tol: float = 1e-4
    reg: float = 1e-3
    init: str = "svd"
    require_convergence: bool = True
    batch_kernels: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "n_iter", self.n_iter, low=1)
        check_range(self, "tol", self.tol, low=0.0)
        check_range(self, "reg", self.reg, low=0.0)
        check_choice(self, "init", self.init, ("svd", "random"))
        check_choice(self, "require_convergence", self.require_convergence, (True, False))
        check_choice(self, "batch_kernels", self.batch_kernels, (None, True, False))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TTConfig(DecomposeConfig):
    """TT-matrix of ``nn.Linear`` layers (Novikov et al., 2015, arXiv:1509.06569).

    ``rank``: an int cap on every TT rank, a fraction of each bond's full rank, or
    ``"energy:x"`` (TT-SVD with relative error bound ``eps = sqrt(1 - x)``).

    Attributes:
        n_cores: Number of cores ``d`` when the modes are chosen automatically.
        in_modes: Factorisation of ``in_features`` (``None``: near-equal factors, ``d`` of them).
        out_modes: Factorisation of ``out_features`` (``None``: automatic).

    Example:
        >>> TTConfig(rank=8, n_cores=2).n_cores
        2
    """

    RANK_KINDS: ClassVar[tuple[RankKind, ...]] = ("fraction", "int", "energy")
    METHOD: ClassVar[str] = "tt"

    n_cores: int = 3
    in_modes: tuple[int, ...] | None = None
    out_modes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "n_cores", self.n_cores, low=2)
        for name in ("in_modes", "out_modes"):
            value = getattr(self, name)
            if value is None:
                continue
            if (
                not isinstance(value, tuple | list)
                or len(value) < 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
            ):
                raise ValueError(
                    f"TTConfig.{name} must be None or >= 2 positive ints, got {value!r}"
                )
            object.__setattr__(self, name, tuple(value))
        if (self.in_modes is None) != (self.out_modes is None) or (
            self.in_modes is not None
            and self.out_modes is not None
            and len(self.in_modes) != len(self.out_modes)
        ):
            raise ValueError(
                "TTConfig.in_modes and TTConfig.out_modes must both be None or have one length, "
                f"got {self.in_modes!r} and {self.out_modes!r}"
            )
