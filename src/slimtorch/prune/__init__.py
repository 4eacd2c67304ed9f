"""slimtorch.prune: magnitude, N:M and structured channel pruning, gradual pruning, storage.

Masks are ``bool`` buffers beside the weights (``<module>.weight_mask``); :func:`prune_` adds and
applies them, :class:`MaskCallback` keeps them exact while training, :class:`GradualPruning`
raises sparsity on the Zhu & Gupta 2017 cubic schedule (arXiv:1710.01878), and
:func:`save_compact` stores the result as bitmask/CSR safetensors. :func:`prune_channels_`
removes whole channels through a dependency graph, so the pruned model is smaller dense layers.
Importing this package does not initialise CUDA.

Example:
    >>> from slimtorch.prune import MagnitudeConfig, prune_
    >>> net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> round(prune_(net, MagnitudeConfig(sparsity=0.75)).to_dict()["totals"]["sparsity"], 2)
    0.75
"""

from __future__ import annotations

from slimtorch.prune.buffers import (
    TRANSFORM_NAME,
    add_mask_buffers_,
    apply_masks_,
    get_mask,
    mask_grads_,
    masked_params,
    remove_masks_,
)
from slimtorch.prune.callbacks import GradualPruning, MaskCallback
from slimtorch.prune.channel import (
    ChannelGraphError,
    ChannelPruneConfig,
    ChannelPruneReport,
    prune_channels_,
)
from slimtorch.prune.magnitude import MagnitudeConfig, NMConfig, prune_
from slimtorch.prune.masks import check_sparsity, global_magnitude_masks, magnitude_mask, nm_mask
from slimtorch.prune.report import PruneReport, PruneRow
from slimtorch.prune.storage import (
    compact_file_bytes,
    compact_state_dict,
    expand_state_dict,
    load_compact,
    nonzero_mask,
    pack_bits,
    save_compact,
    unpack_bits,
)

__all__ = [
    "TRANSFORM_NAME",
    "ChannelGraphError",
    "ChannelPruneConfig",
    "ChannelPruneReport",
    "GradualPruning",
    "MagnitudeConfig",
    "MaskCallback",
    "NMConfig",
    "PruneReport",
    "PruneRow",
    "add_mask_buffers_",
    "apply_masks_",
    "check_sparsity",
    "compact_file_bytes",
    "compact_state_dict",
    "expand_state_dict",
    "get_mask",
    "global_magnitude_masks",
    "load_compact",
    "magnitude_mask",
    "mask_grads_",
    "masked_params",
    "nm_mask",
    "nonzero_mask",
    "pack_bits",
    "prune_",
    "prune_channels_",
    "remove_masks_",
    "save_compact",
    "unpack_bits",
]
