"""Low-rank factorisation of conv and linear layers: CP, Tucker-2, TT and truncated SVD.

Pure tensor functions do the maths (:func:`tucker2` and :func:`cp_als`, with
:func:`tucker2_many` and :func:`cp_als_many` for many kernels at once, :func:`tt_svd`,
:func:`tt_matrix`, :func:`truncated_svd`); factorised layers wrap their factors in ordinary
dense layers; :func:`decompose_` applies a config to a model in place and reports every layer.

Example:
    >>> from slimtorch.decompose import TuckerConfig, decompose_
    >>> net = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3))
    >>> report = decompose_(net, TuckerConfig(rank=0.25), include=["2"])
    >>> report.rows[0].action
    'decomposed'
"""

from __future__ import annotations

from slimtorch.core.surgery import set_submodule
from slimtorch.decompose.batched import tucker2_many
from slimtorch.decompose.budget import (
    BudgetSelection,
    LayerLadder,
    RankOption,
    select_ranks_for_budget,
)
from slimtorch.decompose.budget_mode import (
    LADDERS,
    BudgetPlan,
    LadderKind,
    plan_budget,
)
from slimtorch.decompose.config import CPConfig, DecomposeConfig, SVDConfig, TTConfig, TuckerConfig
from slimtorch.decompose.cp import CPResult, cp_als, cp_to_full
from slimtorch.decompose.cp_batched import cp_als_many
from slimtorch.decompose.fused import FusedTuckerConv2d, FuseReport, fuse_tucker_
from slimtorch.decompose.handlers import HANDLERS, Factorised, SkipLayer, split_modes
from slimtorch.decompose.layers import (
    LAYER_KINDS,
    CPConv2d,
    LowRankConv2d,
    LowRankLinear,
    TTLinear,
    TuckerConv2d,
)
from slimtorch.decompose.linalg import relative_error, unfold
from slimtorch.decompose.native import KernelStatus, kernel_status
from slimtorch.decompose.ranks import (
    RankSpec,
    parse_rank_spec,
    rank_from_energy,
    rank_from_fraction,
    round_rank,
    select_mode_rank,
)
from slimtorch.decompose.sensitivity import approximate_weight, measure_sensitivity
from slimtorch.decompose.speed import SpeedCheck, layer_speedup
from slimtorch.decompose.svd import truncated_svd
from slimtorch.decompose.transform import (
    DecomposeReport,
    LayerReport,
    decompose_,
    rebuild_decomposed,
)
from slimtorch.decompose.tt import tt_matrix, tt_matrix_to_full, tt_svd, tt_to_full
from slimtorch.decompose.tucker import Tucker2Factors, tucker2, tucker2_to_full
from slimtorch.decompose.vbmf import EVBMFResult, evbmf

__all__ = [
    "HANDLERS",
    "LADDERS",
    "LAYER_KINDS",
    "BudgetPlan",
    "BudgetSelection",
    "CPConfig",
    "CPConv2d",
    "CPResult",
    "DecomposeConfig",
    "DecomposeReport",
    "EVBMFResult",
    "Factorised",
    "FuseReport",
    "FusedTuckerConv2d",
    "KernelStatus",
    "LadderKind",
    "LayerLadder",
    "LayerReport",
    "LowRankConv2d",
    "LowRankLinear",
    "RankOption",
    "RankSpec",
    "SVDConfig",
    "SkipLayer",
    "SpeedCheck",
    "TTConfig",
    "TTLinear",
    "Tucker2Factors",
    "TuckerConfig",
    "TuckerConv2d",
    "approximate_weight",
    "cp_als",
    "cp_als_many",
    "cp_to_full",
    "decompose_",
    "evbmf",
    "fuse_tucker_",
    "kernel_status",
    "layer_speedup",
    "measure_sensitivity",
    "parse_rank_spec",
    "plan_budget",
    "rank_from_energy",
    "rank_from_fraction",
    "rebuild_decomposed",
    "relative_error",
    "round_rank",
    "select_mode_rank",
    "select_ranks_for_budget",
    "set_submodule",
    "split_modes",
    "truncated_svd",
    "tt_matrix",
    "tt_matrix_to_full",
    "tt_svd",
    "tt_to_full",
    "tucker2",
    "tucker2_many",
    "tucker2_to_full",
    "unfold",
]
