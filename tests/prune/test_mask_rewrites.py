"""Rewrites that swap a pruned layer for an equivalent one keep its masks, saved and loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from model_helpers import grey_zoo_model, tucker_resnet20
from slimtorch.decompose import fuse_tucker_
from slimtorch.models import load_model, save_model
from slimtorch.prune import MagnitudeConfig, MaskCallback, masked_params, prune_
from slimtorch.quant import fold_bn_, lower_conv_gemm_, lower_direct_conv_
from slimtorch.train import TrainConfig, Trainer


def _lenet() -> nn.Module:
    return grey_zoo_model("lenet5", 0)


def _tucker_resnet() -> nn.Module:
    return tucker_resnet20(0)


CASES = {
    "gemm": (_lenet, lower_conv_gemm_, "features.0.linear"),
    "direct": (_lenet, lower_direct_conv_, "features.0"),
    "fuse": (_tucker_resnet, fuse_tucker_, "layer1.0.conv1.core"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_masks_survive_the_rewrite_a_fine_tune_and_a_reload(case: str, tmp_path: Path) -> None:
    # the rewrites dropped the masks: a fine-tune (compress adds MaskCallback for pruned
    # models) grew every pruned weight of the rewritten layers back
    build, rewrite, layer = CASES[case]
    model = build()
    prune_(model, MagnitudeConfig(sparsity=0.7))
    count = len(masked_params(model))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    rewrite(model)
    assert len(masked_params(model)) == count
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)
    zeros = model.get_submodule(layer).weight == 0
    assert float(zeros.float().mean()) == pytest.approx(0.7, abs=0.02)
    save_model(model, tmp_path / "m", input_shape=(1, 28, 28), mean=[0.5], std=[0.5],
               class_names=list("0123456789"))  # fmt: skip
    loaded, _ = load_model(tmp_path / "m")
    saved = model.state_dict()
    assert saved.keys() == loaded.state_dict().keys()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(3)]
    config = TrainConfig(epochs=1, lr=0.05, progress=False)
    Trainer(loaded, config, callbacks=[MaskCallback()]).fit(data)
    assert bool((loaded.get_submodule(layer).weight[zeros] == 0).all())


def test_gemm_keeps_frozen_layers_frozen_and_the_training_mode() -> None:
    model = _lenet()
    for p in model.parameters():
        p.requires_grad_(False)
    lower_conv_gemm_(model)
    gemm = model.get_submodule("features.0")
    assert not gemm.training and not any(p.requires_grad for p in gemm.parameters())


def test_a_batch_norm_fold_drops_the_bias_mask_it_overrides() -> None:
    # the folded bias carries the batch norm's shift under the conv bias's False entries: the
    # next mask application (every fine-tune step) changed the outputs
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    model[1].running_mean.uniform_(-1, 1)
    model.slimtorch_arch = {"name": "custom", "transforms": []}
    prune_(model, MagnitudeConfig(sparsity=0.5, include_bias=True))
    assert model[0].bias_mask is not None
    fold_bn_(model)
    assert not hasattr(model[0], "bias_mask")
    records = [
        t["params"] for t in model.slimtorch_arch["transforms"] if t["name"] == "prune.masks"
    ]
    assert records and all("0" not in r.get("bias", []) for r in records)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        y = model(x)
        from slimtorch.prune import apply_masks_

        apply_masks_(model)
        torch.testing.assert_close(model(x), y)


@pytest.mark.parametrize("case", ["direct", "fuse"])
def test_a_model_saved_before_masks_were_carried_still_loads(case: str, tmp_path: Path) -> None:
    # such a file lists the rewritten layers in its first "prune.masks" record but holds no
    # masks for them; replaying the rewrite carried that record's masks over, and the load
    # failed on missing keys
    build, rewrite, _ = CASES[case]
    model = build()
    prune_(model, MagnitudeConfig(sparsity=0.7))
    first = next(t for t in model.slimtorch_arch["transforms"] if t["name"] == "prune.masks")
    before = list(first["params"]["layers"])
    rewrite(model)
    records = model.slimtorch_arch["transforms"]
    moved = records.pop()["params"]["layers"]  # as saved then: no record after the rewrite
    next(t for t in records if t["name"] == "prune.masks")["params"]["layers"] = before
    for name in moved:
        del model.get_submodule(name)._buffers["weight_mask"]
    save_model(model, tmp_path / "m", input_shape=(1, 28, 28), mean=[0.5], std=[0.5],
               class_names=list("0123456789"))  # fmt: skip
    loaded, _ = load_model(tmp_path / "m")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
