"""``TTLinear``: a linear layer stored as TT-matrix cores, applied core by core.

Novikov, Podoprikhin, Osokin and Vetrov, 2015, "Tensorizing neural networks", arXiv:1509.06569.
The forward pass never builds the full matrix: the input ``(B, n_1 ... n_d)`` is contracted with
one core at a time, each step a batched matmul.

Example:
    >>> layer = TTLinear.from_layer(nn.Linear(64, 32), in_modes=(4, 4, 4), out_modes=(2, 4, 4),
    ...                             max_rank=4)
    >>> layer(torch.randn(3, 64)).shape
    torch.Size([3, 32])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimtorch.decompose.layers._common import LAYER_KINDS, FromSpec
from slimtorch.decompose.tt import tt_matrix, tt_matrix_to_full


def _modes(values: Sequence[int], name: str) -> tuple[int, ...]:
    out = tuple(values)
    if len(out) < 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise ValueError(f"{name} must be >= 2 positive ints, got {values!r}")
    return out


class TTLinear(FromSpec, nn.Module):
    """A linear map ``prod(in_modes) -> prod(out_modes)`` in TT-matrix format, plus bias.

    Args:
        in_modes: ``(n_1, ..., n_d)``.
        out_modes: ``(m_1, ..., m_d)``, same length.
        ranks: The ``d - 1`` inner TT ranks ``(r_1, ..., r_{d-1})``.
        bias: Whether to add a bias of size ``prod(out_modes)``.
        device, dtype: Where and in what to create the cores.

    Example:
        >>> TTLinear((2, 3), (4, 2), ranks=(3,))(torch.randn(5, 6)).shape
        torch.Size([5, 8])
    """

    kind = "tt_linear"
    flops_input = "rows"  # flops() takes the input row count

    def __init__(
        self,
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        ranks: Sequence[int],
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_modes = _modes(in_modes, "in_modes")
        self.out_modes = _modes(out_modes, "out_modes")
        d = len(self.in_modes)
        if len(self.out_modes) != d:
            raise ValueError(
                f"in_modes and out_modes need one length, got {self.in_modes} and {self.out_modes}"
            )
        inner = tuple(int(r) for r in ranks)
        if len(inner) != d - 1 or any(r < 1 for r in inner):
            raise ValueError(f"ranks must be {d - 1} ints >= 1, got {tuple(ranks)!r}")
        self.tt_ranks = (1, *inner, 1)
        self.in_features = math.prod(self.in_modes)
        self.out_features = math.prod(self.out_modes)
        self.cores = nn.ParameterList()
        for k in range(d):
            shape = (self.tt_ranks[k], self.out_modes[k], self.in_modes[k], self.tt_ranks[k + 1])
            core = torch.empty(shape, device=device, dtype=dtype)
            # Variance so the product of d cores has the variance of a default Linear's weight.
            std = (1.0 / (3 * self.in_features * math.prod(inner))) ** (1.0 / (2 * d))
            nn.init.normal_(core, std=std)
            self.cores.append(nn.Parameter(core))
        if bias:
            bound = 1.0 / math.sqrt(self.in_features)
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.empty(self.out_features, device=device, dtype=dtype).uniform_(-bound, bound)
            )
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        t = x.reshape(-1, 1 * self.in_modes[0], self.in_features // self.in_modes[0])
        p = t.shape[0]  # rows so far: batch x m_1 ... m_{k-1}
        for k, core in enumerate(self.cores):
            r0, m, n, r1 = core.shape
            # (r_{k-1} n_k, m_k r_k): matches t's middle axis (r_{k-1}, n_k) row-major
            mat = core.permute(0, 2, 1, 3).reshape(r0 * n, m * r1)
            t = torch.einsum("paq,ab->pbq", t, mat)  # (P, m_k r_k, rest)
            p = p * m
            if k + 1 < len(self.cores):
                n_next = self.in_modes[k + 1]
                t = t.reshape(p, r1 * n_next, -1)  # (P m_k, r_k n_{k+1}, rest / n_{k+1})
        out = t.reshape(*lead, self.out_features)  # (..., m_1 ... m_d)
        if self.bias is not None:
            out = out + self.bias
        return out

    def full_weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight (forward never builds it)."""
        return tt_matrix_to_full(list(self.cores))

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) with ``kind``."""
        return {
            "kind": self.kind,
            "in_modes": list(self.in_modes),
            "out_modes": list(self.out_modes),
            "ranks": list(self.tt_ranks[1:-1]),
            "bias": self.bias is not None,
        }

    def flops(self, rows: int = 1) -> int:
        """FLOPs (2 x MACs) of the core-by-core contraction for ``rows`` input rows."""
        total, left, right = 0, 1, self.in_features
        for k in range(len(self.in_modes)):
            r0, r1 = self.tt_ranks[k], self.tt_ranks[k + 1]
            m, n = self.out_modes[k], self.in_modes[k]
            right //= n
            total += 2 * left * right * r0 * n * m * r1
            left *= m
        return rows * total

    @classmethod
    def from_factors(
        cls, cores: Sequence[torch.Tensor], bias: torch.Tensor | None = None
    ) -> TTLinear:
        """Build from TT-matrix cores ``(r_{k-1}, m_k, n_k, r_k)``.

        Example:
            >>> cores = tt_matrix(torch.randn(6, 4), (2, 2), (3, 2))
            >>> TTLinear.from_factors(cores).out_features
            6
        """
        if len(cores) < 2 or any(c.ndim != 4 for c in cores):
            raise ValueError("cores must be >= 2 tensors of shape (r_{k-1}, m_k, n_k, r_k)")
        for a, b in itertools.pairwise(cores):
            if a.shape[3] != b.shape[0]:
                raise ValueError(f"TT ranks do not chain: {tuple(a.shape)} then {tuple(b.shape)}")
        layer = cls(
            [int(c.shape[2]) for c in cores],
            [int(c.shape[1]) for c in cores],
            [int(c.shape[3]) for c in cores[:-1]],
            bias=bias is not None,
            device=cores[0].device,
            dtype=cores[0].dtype,
        )
        with torch.no_grad():
            for dst, src in zip(layer.cores, cores, strict=True):
                dst.copy_(src)
            if bias is not None and layer.bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_layer(
        cls,
        linear: nn.Linear,
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        *,
        eps: float | None = None,
        max_rank: int | Sequence[int] | None = None,
    ) -> TTLinear:
        """Factorise ``linear.weight`` with :func:`~slimtorch.decompose.tt.tt_matrix`.

        Raises:
            TypeError: not an ``nn.Linear``.
            ValueError: ``prod(in_modes) != in_features`` or ``prod(out_modes) != out_features``.

        Example:
            >>> TTLinear.from_layer(nn.Linear(6, 4), (2, 3), (2, 2)).in_features
            6
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"TTLinear needs an nn.Linear, got {type(linear).__name__}")
        cores = tt_matrix(linear.weight.detach(), in_modes, out_modes, eps=eps, max_rank=max_rank)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_factors(cores, bias)


LAYER_KINDS.add(TTLinear.kind, TTLinear)
