"""The distillation config: temperature, soft-loss weight and feature hints.

Example:
    >>> cfg = DistillConfig(temperature=4.0, alpha=0.9, hints=(("layer3", "layer3"),))
    >>> cfg.to_dict()["hints"]
    [['layer3', 'layer3']]
"""

from __future__ import annotations

import dataclasses

from slimtorch.core.config import Config, check_range


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig(Config):
    """How a student learns from a teacher.

    The training loss is ``(1 - alpha) * hard + alpha * soft + hint_weight * mean(hints)``,
    where ``hard`` is the trainer's loss on the labels, ``soft`` is
    :func:`~slimtorch.distill.kd_loss` at ``temperature`` (Hinton, Vinyals & Dean 2015,
    arXiv:1503.02531) and each hint is the :func:`~slimtorch.distill.hint_loss` between the
    outputs of a student layer and a teacher layer (FitNets, Romero et al. 2014,
    arXiv:1412.6550).

    Attributes:
        temperature: Softmax temperature of the soft loss (> 0).
        alpha: Weight of the soft loss, in [0, 1]; ``0`` trains on the labels only.
        hints: ``(student_layer, teacher_layer)`` dotted-name pairs whose outputs must have the
            same shape; empty for logit distillation only.
        hint_weight: Weight of the mean hint loss (>= 0).

    Example:
        >>> DistillConfig(alpha=0.5).temperature
        4.0
    """

    temperature: float = 4.0
    alpha: float = 0.9
    hints: tuple[tuple[str, str], ...] = ()
    hint_weight: float = 1.0

    def __post_init__(self) -> None:
        # check_range refuses inf: an infinite temperature makes the soft loss NaN
        check_range(self, "temperature", self.temperature, low=0.0, low_inclusive=False)
        check_range(self, "alpha", self.alpha, low=0.0, high=1.0)
        check_range(self, "hint_weight", self.hint_weight, low=0.0)
        if not isinstance(self.hints, tuple | list):
            raise ValueError(
                "DistillConfig.hints must be a sequence of (student_layer, teacher_layer) "
                f"pairs, got {self.hints!r}"
            )
        pairs: list[tuple[str, str]] = []
        for pair in self.hints:
            ok = isinstance(pair, tuple | list) and len(pair) == 2
            if not ok or not all(isinstance(n, str) and n for n in pair):
                raise ValueError(
                    "DistillConfig.hints must hold (student_layer, teacher_layer) pairs of "
                    f"non-empty dotted names such as ('layer3', 'layer3'), got {pair!r}"
                )
            if (pair[0], pair[1]) in pairs:  # would silently weigh that pair twice
                raise ValueError(
                    f"DistillConfig.hints lists the pair {tuple(pair)!r} twice; give each pair once"
                )
            pairs.append((pair[0], pair[1]))
        # JSON recipes give lists of lists: store the canonical, hashable form
        object.__setattr__(self, "hints", tuple(pairs))
