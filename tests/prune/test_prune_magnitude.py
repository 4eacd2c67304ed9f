"""prune_: exact sparsity, masks as buffers, reports, globs, strict mode, save/load, removal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.core.errors import TransformSkipError
from slimtorch.models import create_model, load_model, save_model
from slimtorch.prune import (
    TRANSFORM_NAME,
    MagnitudeConfig,
    NMConfig,
    apply_masks_,
    get_mask,
    prune_,
    remove_masks_,
)


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def test_layer_scope_gives_exact_sparsity_per_layer_and_mask_buffers() -> None:
    net = _net()
    report = prune_(net, MagnitudeConfig(sparsity=0.6))
    assert [r.name for r in report.rows] == ["0", "2", "4", "6"]
    for row in report.rows:
        layer = net.get_submodule(row.name)
        mask = get_mask(layer)
        assert mask is not None and mask.dtype == torch.bool
        assert "weight_mask" in dict(layer.named_buffers())
        n = layer.weight.numel()
        assert row.action == "pruned" and row.params == n
        assert row.zeros_after == int((layer.weight == 0).sum()) == round(0.6 * n)
        assert torch.equal(layer.weight == 0, ~mask)
        assert not torch.signbit(layer.weight[~mask]).any()  # +0.0, not -0.0
        assert get_mask(layer, "bias") is None and bool((layer.bias != 0).all())
    totals = report.to_dict()["totals"]
    assert totals["pruned"] == 4 and totals["skipped"] == 0
    assert totals["zeros_after"] == sum(round(0.6 * r.params) for r in report.rows)
    table = report.to_table()
    assert "layer" in table.splitlines()[0] and len(table.splitlines()) == 5


def test_global_scope_exact_total_and_more_zeros_where_weights_are_smaller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 20))
    with torch.no_grad():
        net[0].weight.copy_(torch.rand(20, 20) + 1.0)  # in [1, 2)
        net[1].weight.copy_(torch.rand(20, 20) * 0.5)  # in [0, 0.5)
    with caplog.at_level("WARNING", logger="slimtorch.prune"):
        report = prune_(net, MagnitudeConfig(sparsity=0.5, scope="global"))
    z0, z1 = (int((m.weight == 0).sum()) for m in net)
    assert z0 + z1 == 400 and z1 == 400 and z0 == 0
    assert report.to_dict()["totals"]["sparsity"] == pytest.approx(0.5)
    # the layer the threshold emptied is named (its output is now its bias alone)
    assert "every weight of 1 is now zero" in caplog.text and "of 0 " not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="slimtorch.prune"):
        prune_(net, MagnitudeConfig(sparsity=0.5, scope="global"))  # again: nothing new
    assert "every weight" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="slimtorch.prune"):  # layer scope: no such advice
        prune_(nn.Sequential(nn.Linear(2, 1)), MagnitudeConfig(sparsity=0.9, min_params=0))
    assert "every weight of 0 is now zero" in caplog.text and "scope=" not in caplog.text


def test_include_bias_masks_biases_too() -> None:
    net = nn.Sequential(nn.Linear(10, 10))
    prune_(net, MagnitudeConfig(sparsity=0.5, include_bias=True))
    assert int((net[0].bias == 0).sum()) == 5
    assert get_mask(net[0], "bias") is not None


def test_repruning_only_adds_zeros() -> None:
    net = nn.Sequential(nn.Linear(16, 16))
    prune_(net, MagnitudeConfig(sparsity=0.3))
    first = get_mask(net[0]).clone()  # type: ignore[union-attr]
    prune_(net, MagnitudeConfig(sparsity=0.7))
    second = get_mask(net[0])
    assert second is not None and int((~second).sum()) == round(0.7 * 256)
    assert not (second & ~first).any()  # nothing pruned before comes back


def test_include_exclude_and_unmatched_globs() -> None:
    net = _net()
    report = prune_(net, MagnitudeConfig(sparsity=0.5), include=["*"], exclude=["0", "6"])
    assert [r.name for r in report.rows] == ["2", "4"]
    assert get_mask(net[0]) is None and get_mask(net[6]) is None
    with pytest.raises(ValueError, match=r"include pattern\(s\) 'layer9\*' match no module"):
        prune_(_net(), MagnitudeConfig(sparsity=0.5), include=["layer9*"])
    with pytest.raises(ValueError, match=r"exclude pattern\(s\) 'nope' match no module"):
        prune_(_net(), MagnitudeConfig(sparsity=0.5), exclude=["nope"])
    with pytest.raises(TypeError, match="include must be a list"):
        prune_(_net(), MagnitudeConfig(sparsity=0.5), include="4")  # type: ignore[arg-type]


def test_skips_have_reasons_and_strict_raises_naming_every_layer() -> None:
    net = _net()
    with torch.no_grad():
        net[2].weight[0, 0, 0, 0] = float("nan")
    report = prune_(net, MagnitudeConfig(sparsity=0.5, min_params=300))
    reasons = {r.name: r.reason for r in report.skipped}
    assert reasons == {"0": "216 weights < min_params 300", "2": "weight holds NaN values"}
    assert get_mask(net[0]) is None and get_mask(net[4]) is not None

    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(TransformSkipError, match=r"skipped 2 layer\(s\).*0: 216 weights.*6: 320"):
        prune_(net, MagnitudeConfig(sparsity=0.5, min_params=400), strict=True)
    assert net.state_dict().keys() == before.keys()  # no mask buffers added
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_nm_prune_skips_indivisible_layer_and_strict_names_it() -> None:
    net = _net()  # conv 0 has 3 input channels
    report = prune_(net, NMConfig(n=2, m=4))
    skipped = {r.name: r.reason for r in report.skipped}
    assert list(skipped) == ["0"]
    assert "input dimension (dim 1)" in skipped["0"] and "size 3" in skipped["0"]
    lin = net[4].weight.view(32, -1, 4)
    assert bool(((lin != 0).sum(-1) <= 2).all()) and int((lin == 0).sum()) == lin.numel() // 2
    with pytest.raises(TransformSkipError, match=r"0: input dimension \(dim 1\).*size 3"):
        prune_(_net(), NMConfig(n=2, m=4), strict=True)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sparsity": 1.0}, "MagnitudeConfig.sparsity"),
        ({"sparsity": -0.01}, "MagnitudeConfig.sparsity"),
        ({"scope": "net"}, "MagnitudeConfig.scope"),
        ({"min_params": -1}, "MagnitudeConfig.min_params"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        MagnitudeConfig(**kwargs)  # type: ignore[arg-type]


def test_nm_config_validation_and_round_trip() -> None:
    with pytest.raises(ValueError, match=r"NMConfig\.n"):
        NMConfig(n=4, m=4)
    with pytest.raises(ValueError, match=r"NMConfig\.m"):
        NMConfig(n=1, m=1)
    cfg = MagnitudeConfig(sparsity=0.8, scope="global")
    assert MagnitudeConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TypeError, match="MagnitudeConfig or NMConfig"):
        prune_(_net(), {"sparsity": 0.5})  # type: ignore[arg-type]


def test_remove_masks_keeps_zeros_and_drops_buffers() -> None:
    net = _net()
    prune_(net, MagnitudeConfig(sparsity=0.5))
    zeros = [int((m.weight == 0).sum()) for m in (net[0], net[2], net[4], net[6])]
    removed = remove_masks_(net)
    assert removed == ["0.weight", "2.weight", "4.weight", "6.weight"]
    assert not any(k.endswith("_mask") for k in net.state_dict())
    assert zeros == [int((m.weight == 0).sum()) for m in (net[0], net[2], net[4], net[6])]
    assert apply_masks_(net) == 0


def test_pruned_zoo_model_saves_and_loads_with_masks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=10, in_channels=1, input_size=16).eval()
    report = prune_(model, MagnitudeConfig(sparsity=0.7), exclude=["classifier"])
    assert report.entry == {
        "name": TRANSFORM_NAME,
        "params": {"layers": ["features.0", "features.3", "fc1", "fc2"]},
    }
    prune_(model, MagnitudeConfig(sparsity=0.7), exclude=["classifier"])  # recorded once
    kw = dict(input_shape=(1, 16, 16), mean=[0.5], std=[0.5], class_names=list("0123456789"))
    path = save_model(model, tmp_path / "lenet", **kw)  # type: ignore[arg-type]
    saved = json.loads((path / "config.json").read_text())
    assert [t["name"] for t in saved["transforms"]] == [TRANSFORM_NAME]
    loaded, _ = load_model(path)
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    for name in ("features.0", "features.3", "fc1", "fc2"):
        mask = get_mask(loaded.get_submodule(name))
        assert mask is not None and torch.equal(mask, get_mask(model.get_submodule(name)))
    assert get_mask(loaded.classifier) is None

    remove_masks_(model)  # permanent pruning saves and loads without mask buffers
    path2 = save_model(model, tmp_path / "lenet2", **kw)  # type: ignore[arg-type]
    plain, _ = load_model(path2)
    assert not any(k.endswith("_mask") for k in plain.state_dict())
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)


def test_include_glob_that_selects_no_layer_raises_and_changes_nothing() -> None:
    # "block" names a container: its layers are "block.0" and "block.2"
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    net.add_module("block", nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    with pytest.raises(
        ValueError,
        match=r"include pattern\(s\) 'block' select no nn.Conv2d/nn.Linear layer of Sequential "
        r"\(they match only block \(Sequential\)\); match the layers themselves, e.g. 'block.\*'",
    ):
        prune_(net, MagnitudeConfig(sparsity=0.5), include=["0", "block"])
    with pytest.raises(ValueError, match=r"'1' select no nn.Conv2d/nn.Linear layer .*1 \(ReLU\)"):
        prune_(net, NMConfig(), include=["1"])
    assert not [k for k in net.state_dict() if k.endswith("_mask")]
    assert int((net[0].weight == 0).sum()) == 0
    report = prune_(net, MagnitudeConfig(sparsity=0.5), include=["block.*"])
    assert [r.name for r in report.rows] == ["block.0", "block.2"]


def _weight_norm(layer: nn.Linear) -> nn.Module:
    return nn.utils.parametrizations.weight_norm(layer)


def _spectral_norm(layer: nn.Linear) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(layer)


def _torch_pruned(layer: nn.Linear) -> nn.Module:
    from torch.nn.utils import prune as torch_prune

    return torch_prune.l1_unstructured(layer, "weight", amount=0.3)


@pytest.mark.parametrize("wrap", [_weight_norm, _spectral_norm, _torch_pruned])
def test_layers_whose_weight_is_computed_are_skipped(wrap) -> None:  # type: ignore[no-untyped-def]
    # a mask on a recomputed weight was overwritten by the next forward (the report claimed
    # the zeros), and torch's own pruning masks made prune_ fail with a raw torch error
    torch.manual_seed(0)
    net = nn.Sequential(wrap(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 16)
    first = net[0](x)
    report = prune_(net, MagnitudeConfig(sparsity=0.5))
    rows = {r.name: r for r in report.rows}
    assert rows["0"].action == "skipped" and "computed from other tensors" in str(rows["0"].reason)
    assert rows["2"].action == "pruned" and rows["2"].zeros_after == 32
    torch.testing.assert_close(net[0](x), first, rtol=0, atol=0)
    assert int((net[2].weight == 0).sum()) == 32


def test_layers_of_other_kinds_left_dense_are_named_once(caplog: pytest.LogCaptureFixture) -> None:
    # a Conv1d model read "sparsity 0.9" while 99% of its weights stayed dense, without a word
    net = nn.Sequential(nn.Conv1d(4, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6, 4))
    with caplog.at_level("WARNING", logger="slimtorch.prune.magnitude"):
        prune_(net, MagnitudeConfig(sparsity=0.5))
        prune_(net, MagnitudeConfig(sparsity=0.6))
    warned = [r.getMessage() for r in caplog.records if "left dense" in r.getMessage()]
    assert warned == ["prune_ prunes nn.Conv2d/nn.Linear only; left dense: 0 (Conv1d)"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="slimtorch.prune.magnitude"):
        prune_(nn.Sequential(nn.Conv1d(4, 16, 3), nn.Linear(4, 4)), NMConfig(), include=["1"])
    assert not caplog.records  # the Conv1d is not selected
