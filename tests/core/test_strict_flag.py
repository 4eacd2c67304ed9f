"""``strict`` and the configs' flags take True or False only: ``strict="no"`` is truthy, so it
would have raised where the user asked for skips to be recorded (and ``0`` the reverse)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.decompose import SVDConfig, decompose_, fuse_tucker_
from slimtorch.prune import ChannelPruneConfig, MagnitudeConfig, prune_, prune_channels_
from slimtorch.quant import (
    DirectConvConfig,
    GemmConvConfig,
    PTQConfig,
    fold_bn_,
    lower_conv_gemm_,
    lower_direct_conv_,
    quantize_,
)
from slimtorch.sparse import sparsify_


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 4),
    )  # fmt: skip


X = torch.randn(2, 3, 4, 4)
CALLS = {
    "prune_": lambda m, s: prune_(m, MagnitudeConfig(sparsity=0.5), strict=s),
    "prune_channels_": lambda m, s: prune_channels_(m, ChannelPruneConfig(ratio=0.5), X, strict=s),
    "decompose_": lambda m, s: decompose_(m, SVDConfig(rank=0.5), strict=s),
    "fuse_tucker_": lambda m, s: fuse_tucker_(m, strict=s),
    "fold_bn_": lambda m, s: fold_bn_(m, strict=s),
    "quantize_": lambda m, s: quantize_(m, PTQConfig(), [X], strict=s),
    "lower_conv_gemm_": lambda m, s: lower_conv_gemm_(m, GemmConvConfig(), strict=s),
    "lower_direct_conv_": lambda m, s: lower_direct_conv_(m, DirectConvConfig(), strict=s),
    "sparsify_": lambda m, s: sparsify_(m, X, strict=s),
}


@pytest.mark.parametrize("verb", sorted(CALLS))
@pytest.mark.parametrize("flag", ["no", 0, None])
def test_strict_must_be_a_bool_and_the_model_is_untouched(verb, flag):
    model = _net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{verb}\(strict=\.\.\.\) must be True or False"):
        CALLS[verb](model, flag)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    ("config", "field"),
    [(PTQConfig, "fold_bn"), (GemmConvConfig, "fold_bn"), (DirectConvConfig, "fuse_pool"),
     (MagnitudeConfig, "include_bias"), (SVDConfig, "speed_compile")],
)  # fmt: skip
def test_config_flags_must_be_bools(config, field):
    extra = {"sparsity": 0.5} if config is MagnitudeConfig else {}
    with pytest.raises(ValueError, match=rf"{config.__name__}\.{field} must be True or False"):
        config(**extra, **{field: "yes"})


def test_compress_run_strict_must_be_a_bool(tmp_path):
    from slimtorch.pipeline import compress_run

    with pytest.raises(ValueError, match=r"compress_run\(strict=\.\.\.\) must be True or False"):
        compress_run(in_dir=tmp_path, out_dir=None, method="prune", strict="false")
