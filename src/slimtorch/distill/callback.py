"""Distillation as a Trainer callback: a frozen teacher's soft targets and feature hints.

The student is the trainer's model. The teacher runs on the same inputs inside the trainer's
autocast region under ``torch.no_grad()`` (one kept in fp16 or bf16 runs in its own dtype,
outside it); the loss becomes
``(1 - alpha) * hard + alpha * T^2 * KL(teacher || student) + hint_weight * mean(hints)``
(Hinton, Vinyals & Dean 2015, arXiv:1503.02531). The hint term is FitNets-style (Romero et al.
2014, arXiv:1412.6550) but trained jointly with the soft targets in one stage; FitNets trains
the hints first, in a stage of their own, through a learned regressor.

Hint layers must produce outputs of the same shape in both models: no adapter (FitNets'
regressor) is created, because an adapter would be a trained module outside the model, missing
from the optimiser's schedule, the checkpoint and the saved model directory. A pair whose shapes
differ raises ``ValueError`` at the first batch, naming both layers and shapes.

Example:
    >>> from slimtorch.train import Trainer, TrainConfig
    >>> _ = torch.manual_seed(0)
    >>> teacher = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))  # untrained here
    >>> student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> train_loader = [(torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(4)]
    >>> x = torch.cat([inputs for inputs, _ in train_loader])
    >>> before = kd_loss(student(x), teacher(x), temperature=4.0)
    >>> cfg = TrainConfig(epochs=5, progress=False)
    >>> cb = DistillationCallback(teacher, DistillConfig(temperature=4.0, alpha=0.9))
    >>> _ = Trainer(student, cfg, callbacks=[cb]).fit(train_loader)
    >>> bool(kd_loss(student(x), teacher(x), temperature=4.0) < before)  # closer to the teacher
    True

    Hint layers whose outputs differ in shape are refused at the first batch:

    >>> cb = DistillationCallback(teacher, DistillConfig(hints=(("0", "0"),)))
    >>> Trainer(student, cfg, callbacks=[cb]).fit(train_loader)
    Traceback (most recent call last):
    ...
    ValueError: hint pair ('0', '0') has student output (16, 16) and teacher output (16, 64); ...
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimtorch.distill.config import DistillConfig
from slimtorch.distill.losses import hint_loss, kd_loss
from slimtorch.train.callbacks import Callback

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from slimtorch.train.trainer import Trainer

logger = logging.getLogger(__name__)


def _submodule(model: nn.Module, name: str, which: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise ValueError(
            f"hint layer {name!r} is not a submodule of the {which} "
            f"({type(model).__name__}); use a dotted name such as {', '.join(names)}"
        ) from None


class DistillationCallback(Callback):
    """Train the trainer's model (the student) to match a frozen ``teacher``.

    On fit start the teacher is moved to the trainer's device, put in eval mode and frozen
    (``requires_grad=False``); it is never part of the optimiser. Forward hooks record the
    outputs of the hint layers of both models and are removed on fit end. The callback keeps no
    checkpoint state beyond its config (:meth:`state_dict` is empty).

    Args:
        teacher: The teacher model; must take the student's inputs and predict the same
            classes. It must not share parameters with the student. A teacher whose weights
            are all in one dtype (an fp16 or bf16 copy, to save memory) gets the student's
            floating-point inputs cast to that dtype; the losses run in float32.
        config: Temperature, ``alpha``, hint pairs and hint weight.

    Example:
        >>> import copy
        >>> from slimtorch.decompose import TuckerConfig, decompose_
        >>> from slimtorch.train import Trainer, TrainConfig
        >>> model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        ...                       nn.Conv2d(32, 32, 3, padding=1), nn.AdaptiveAvgPool2d(1),
        ...                       nn.Flatten(), nn.Linear(32, 10))
        >>> teacher = copy.deepcopy(model)  # before the change
        >>> _ = decompose_(model, TuckerConfig(rank=0.25), include=["2"])
        >>> type(model[2]).__name__
        'TuckerConv2d'
        >>> loader = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
        >>> cb = DistillationCallback(teacher, DistillConfig(hints=(("2", "2"),)))  # same shape
        >>> cfg = TrainConfig(epochs=3, lr=0.01, progress=False)
        >>> Trainer(model, cfg, callbacks=[cb]).fit(loader).epoch
        [1, 2, 3]
    """

    def __init__(self, teacher: nn.Module, config: DistillConfig) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if not isinstance(config, DistillConfig):
            raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
        self.teacher = teacher
        self.config = config
        self._handles: list[RemovableHandle] = []
        self._student_feats: dict[str, torch.Tensor] = {}
        self._teacher_feats: dict[str, torch.Tensor] = {}
        self._teacher_dtype: torch.dtype | None = None  # set in on_fit_start
        self._teacher_digest: list[float] | None = None  # computed once, by run_info

    # ------------------------------------------------------------------ hooks

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._student_feats.clear()
        self._teacher_feats.clear()

    def _hook(self, store: dict[str, torch.Tensor], name: str, student: bool) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if student and not torch.is_grad_enabled():
                return  # evaluation passes: nothing to distil
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"hint layer {name!r} returns {type(output).__name__}, not a tensor; "
                    "pick a layer whose output is a single tensor"
                )
            # a copy: an in-place op after the layer (ReLU(inplace=True)) would change it
            store[name] = output.clone()

        return hook

    def on_fit_start(self, trainer: Trainer) -> None:
        student = trainer.unwrapped_model
        if self.teacher is student:
            raise ValueError(
                "the teacher is the student itself; pass a frozen copy, e.g. copy.deepcopy(model)"
            )
        student_ids = {id(p) for p in student.parameters()}
        if any(id(p) in student_ids for p in self.teacher.parameters()):
            raise ValueError(
                "the teacher shares parameters with the student; pass an independent copy, "
                "e.g. copy.deepcopy(model) taken before the change"
            )
        on_meta = [n for n, t in self.teacher.state_dict().items() if t.is_meta]
        if on_meta:
            raise ValueError(
                f"the teacher has {len(on_meta)} tensor(s) on the meta device (no values), "
                f"e.g. {on_meta[0]!r}; load its trained weights first (slimtorch.distill."
                "load_teacher, or load_state_dict(..., assign=True))"
            )
        self.teacher.to(trainer.device)
        if trainer.config.channels_last:
            self.teacher.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        dtypes = {p.dtype for p in self.teacher.parameters() if p.is_floating_point()}
        # a teacher kept in one low precision (an fp16/bf16 copy) gets its inputs in that dtype
        self._teacher_dtype = dtypes.pop() if len(dtypes) == 1 else None
        self._remove_hooks()
        for s_name, t_name in self.config.hints:
            s_mod = _submodule(student, s_name, "student")
            t_mod = _submodule(self.teacher, t_name, "teacher")
            self._handles.append(
                s_mod.register_forward_hook(self._hook(self._student_feats, s_name, True))
            )
            self._handles.append(
                t_mod.register_forward_hook(self._hook(self._teacher_feats, t_name, False))
            )
        if self.config.alpha == 0.0 and not self.config.hints:
            logger.warning("distillation with alpha=0 and no hints trains on the labels only")
        logger.info(
            "distilling from %s: temperature %g, alpha %g, %d hint pair(s)",
            type(self.teacher).__name__,
            self.config.temperature,
            self.config.alpha,
            len(self.config.hints),
        )

    def teardown(self, trainer: Trainer) -> None:
        self._remove_hooks()  # also after a failed run: no hook stays on either model

    # ------------------------------------------------------------------ loss

    def compute_loss(
        self,
        trainer: Trainer,
        inputs: Any,
        outputs: torch.Tensor,
        targets: Any,
        loss: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.config
        if cfg.alpha == 0.0 and not cfg.hints:
            return loss
        # called inside the trainer's autocast region: a float32 teacher runs in the same
        # precision; one kept in fp16/bf16 runs in its own, outside it (autocast to the other
        # half dtype would feed its batch norms inputs of another dtype than their weights)
        teacher_in = inputs
        dtype = self._teacher_dtype
        if isinstance(inputs, torch.Tensor) and inputs.is_floating_point() and dtype is not None:
            teacher_in = inputs.to(dtype)
        own = dtype is not None and dtype != torch.float32
        region = torch.autocast(trainer.device.type, enabled=False) if own else nullcontext()
        with torch.no_grad(), region:
            try:
                teacher_out = self.teacher(teacher_in)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:  # a teacher built for other inputs, most likely
                shape = tuple(teacher_in.shape) if isinstance(teacher_in, torch.Tensor) else "?"
                raise RuntimeError(
                    f"the distillation teacher ({type(self.teacher).__name__}) failed on a "
                    f"training batch of shape {shape}: {exc}; the teacher must take the "
                    "student's inputs (same channels and image size)"
                ) from exc
        total = loss
        if cfg.alpha > 0.0:
            soft = kd_loss(outputs, teacher_out, temperature=cfg.temperature)
            total = (1.0 - cfg.alpha) * loss + cfg.alpha * soft
        if cfg.hints:
            total = total + cfg.hint_weight * self._hint_term()
        return total

    def _hint_term(self) -> torch.Tensor:
        try:
            return self._hint_terms()
        finally:  # a layer may serve in several pairs: forget the features only once all ran
            self._student_feats.clear()
            self._teacher_feats.clear()

    def _hint_terms(self) -> torch.Tensor:
        terms = []
        for s_name, t_name in self.config.hints:
            s_feat = self._student_feats.get(s_name)
            t_feat = self._teacher_feats.get(t_name)
            if s_feat is None or t_feat is None:
                which = "student" if s_feat is None else "teacher"
                layer = s_name if s_feat is None else t_name
                raise ValueError(
                    f"hint layer {layer!r} of the {which} did not run in the forward pass; "
                    "pick a layer that every forward pass uses"
                )
            if s_feat.shape != t_feat.shape:
                raise ValueError(
                    f"hint pair ({s_name!r}, {t_name!r}) has student output "
                    f"{tuple(s_feat.shape)} and teacher output {tuple(t_feat.shape)}; hint "
                    "layers must produce the same shape (no adapter is trained): pick layers "
                    "with matching outputs"
                )
            terms.append(hint_loss(s_feat, t_feat))
        return torch.stack(terms).mean()

    def run_info(self) -> dict[str, Any]:
        """The config and the teacher's weights in brief (count, sum and sum of squares), so
        that a run is not resumed with another teacher."""
        if any(p.is_meta for p in self.teacher.parameters()):
            return {"config": self.config.to_dict(), "teacher": "meta"}  # refused on fit start
        if self._teacher_digest is None:  # on the CPU in float64, to 10 digits: the same
            with torch.no_grad():  # teacher on another device or process gives the same
                ps = [p.detach().to("cpu", torch.float64) for p in self.teacher.parameters()]
                sums = (sum(float(p.sum()) for p in ps), sum(float((p * p).sum()) for p in ps))
                self._teacher_digest = [
                    sum(p.numel() for p in ps),
                    *(float(f"{v:.10g}") for v in sums),
                ]
        return {"config": self.config.to_dict(), "teacher": self._teacher_digest}

    def state_dict(self) -> dict[str, Any]:
        """Nothing to save: the teacher is fixed and the config is given at construction."""
        return {}
