"""slimtorch.prune.channel: structured channel pruning that really shrinks the layers.

A dependency graph (:mod:`.graph`, after DepGraph, Fang et al. 2023, arXiv:2301.12900) keeps
residual additions, concatenations, depthwise/grouped convolutions, batch norms and flatten
consistent; :func:`prune_channels_` scores channels (L1/L2, BN scale, first-order Taylor),
keeps counts rounded to a hardware multiple, slices the layers and checks the result. The
pruned model is an ordinary dense model; the ``"prune.channels"`` architecture transform lets
``save_model``/``load_model`` round-trip it. Pruning a model directory, fine-tuning and
measuring it is ``slimtorch.pipeline.compress_run(method="channel-prune")``.

Example:
    >>> from slimtorch.prune.channel import ChannelPruneConfig, prune_channels_
    >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    >>> prune_channels_(net, ChannelPruneConfig(ratio=0.5), torch.randn(2, 8)).rows[0].action
    'pruned'
"""

from __future__ import annotations

from slimtorch.prune.channel.config import ChannelPruneConfig, round_channels
from slimtorch.prune.channel.graph import (
    ChannelGraph,
    ChannelGraphError,
    ChannelGroup,
    LayerUse,
    build_graph,
)
from slimtorch.prune.channel.importance import IMPORTANCES, channel_scores
from slimtorch.prune.channel.layers import (
    TRANSFORM_NAME,
    layer_widths,
    replay_channel_widths,
    resized,
    slice_layer,
)
from slimtorch.prune.channel.report import ChannelGroupRow, ChannelPruneReport
from slimtorch.prune.channel.transform import prune_channels_

__all__ = [
    "IMPORTANCES",
    "TRANSFORM_NAME",
    "ChannelGraph",
    "ChannelGraphError",
    "ChannelGroup",
    "ChannelGroupRow",
    "ChannelPruneConfig",
    "ChannelPruneReport",
    "LayerUse",
    "build_graph",
    "channel_scores",
    "layer_widths",
    "prune_channels_",
    "replay_channel_widths",
    "resized",
    "round_channels",
    "slice_layer",
]
