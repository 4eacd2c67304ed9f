from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model_helpers import same_model
from slimtorch.core.errors import ModelLoadError, TransformSkipError
from slimtorch.decompose import (
    CPConfig,
    CPConv2d,
    LowRankConv2d,
    LowRankLinear,
    SVDConfig,
    TTConfig,
    TTLinear,
    TuckerConfig,
    TuckerConv2d,
    decompose_,
    rebuild_decomposed,
    set_submodule,
)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=4),
            nn.Conv2d(32, 48, 1),
        )
        self.head = nn.Linear(48 * 8 * 8, 64)
        self.out = nn.Linear(64, 10)
        self.slimtorch_arch = {"name": "tiny"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.head(self.features(x).flatten(1))))


@pytest.fixture
def net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def rows(report):
    return {r.name: r for r in report.rows}


def test_tucker_on_selected_convs_with_flops(net: TinyNet) -> None:
    report = decompose_(net, TuckerConfig(rank=0.5), include=["features.*"], example_input=X)
    by = rows(report)
    assert set(by) == {"features.0", "features.3", "features.5", "features.6"}
    assert by["features.3"].action == "decomposed" and by["features.3"].ranks == [16, 16]
    assert isinstance(net.features[3], TuckerConv2d)
    assert by["features.3"].params_after < by["features.3"].params_before
    # 32->32 3x3 stride 2 at 16x16 -> 8x8
    assert by["features.3"].flops_before == 2 * 32 * 32 * 9 * 64
    assert by["features.3"].flops_after == net.features[3].flops((16, 16))
    assert by["features.5"].action == "skipped" and "groups=4" in by["features.5"].reason
    assert by["features.6"].action == "skipped" and "would not reduce params" in (
        by["features.6"].reason
    )
    assert by["features.0"].ranks == [16, 2]  # ceil(0.5 * 3)
    assert 0 < by["features.3"].rel_error < 1
    assert net(X).shape == (2, 10)
    table = report.to_table()
    assert "features.3" in table and "decomposed" in table and "groups=4" in table
    d = report.to_dict()
    assert d["totals"]["decomposed"] == len(report.decomposed) and len(d["layers"]) == 4


def test_include_exclude_globs_and_type_skips(net: TinyNet) -> None:
    report = decompose_(net, SVDConfig(rank=0.25), exclude=["features.[0-3]"])
    by = rows(report)
    assert set(by) == {"features.5", "features.6", "head", "out"}
    assert "groups=4" in by["features.5"].reason
    assert isinstance(net.features[6], LowRankConv2d) and isinstance(net.head, LowRankLinear)
    assert by["head"].flops_before == 2 * 3072 * 64 and by["head"].flops_after == 2 * 16 * 3136
    report = decompose_(net, SVDConfig(), include=["features.0"])
    assert "1x1 convs only" in report.rows[0].reason
    again = decompose_(net, SVDConfig(), include=["head*"]).rows  # parts are not targets
    assert [(r.name, r.action) for r in again] == [("head", "skipped")]
    assert "already factorised" in str(again[0].reason)
    # a glob naming only the parts (head.first, head.last) is answered by the same row; it
    # raised "select no nn.Conv2d/nn.Linear layer (they match only head.first (Linear) ...)"
    parts = decompose_(net, SVDConfig(), include=["head.*"]).rows
    assert [(r.name, r.action) for r in parts] == [("head", "skipped")]
    assert "already factorised" in str(parts[0].reason)
    # excluding the factorised layer itself leaves it out of the report (strict passes)
    assert decompose_(net, SVDConfig(), include=["head*"], exclude=["head"], strict=True).rows == []
    report = decompose_(TinyNet(), TuckerConfig(), include=["out"])
    assert "does not handle Linear" in report.rows[0].reason


def test_strict_raises_naming_every_skip_and_leaves_model_unchanged(net: TinyNet) -> None:
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(TransformSkipError, match=r"features\.5: .*groups=4.*features\.6"):
        decompose_(
            net, CPConfig(rank=0.25, require_convergence=False), strict=True, include=["features.*"]
        )
    assert isinstance(net.features[3], nn.Conv2d)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert "transforms" not in net.slimtorch_arch


def test_nan_weights_and_failed_decompositions_are_skipped(net: TinyNet) -> None:
    with torch.no_grad():
        net.features[3].weight[0, 0, 0, 0] = float("nan")
    report = decompose_(net, CPConfig(rank=8, n_iter=2, tol=0.0), include=["features.[03]"])
    by = rows(report)
    assert "NaN/Inf" in by["features.3"].reason
    assert "DecompositionError" in by["features.0"].reason  # 2 sweeps cannot converge
    assert isinstance(net.features[0], nn.Conv2d)


def test_cp_and_tt_decompose_and_record(net: TinyNet) -> None:
    cp = decompose_(
        net, CPConfig(rank=16, n_iter=50, require_convergence=False), include=["features.3"]
    )
    assert isinstance(net.features[3], CPConv2d) and cp.rows[0].info["iterations"] >= 1
    tt = decompose_(net, TTConfig(rank=8), include=["head", "out"])
    by = rows(tt)
    assert isinstance(net.head, TTLinear) and by["head"].info["in_modes"] == [16, 16, 12]
    assert "cannot be split" in by["out"].reason  # 10 = 5 x 2 has no 3 modes > 1
    transforms = net.slimtorch_arch["transforms"]
    assert [t["name"] for t in transforms] == ["decompose.layers", "decompose.layers"]
    assert transforms[0]["params"]["layers"]["features.3"]["kind"] == "cp"
    assert transforms[1]["params"]["layers"]["head"]["kind"] == "tt_linear"


def test_rebuild_loads_saved_weights_strictly(net: TinyNet, tmp_path) -> None:
    conv = net.features[3]
    with torch.no_grad():  # low multilinear rank plus noise: EVBMF finds components to keep
        low = torch.einsum("oa,ab,bi->oi", torch.randn(conv.out_channels, 3), torch.randn(3, 3),
                           torch.randn(3, conv.weight[0].numel()))  # fmt: skip
        conv.weight.copy_(low.reshape(conv.weight.shape) + 0.01 * torch.randn_like(conv.weight))
    report = decompose_(net, TuckerConfig(rank="vbmf", round_to=4), include=["features.3"])
    assert report.rows[0].action == "decomposed", report.rows[0].reason
    decompose_(net, SVDConfig(rank="energy:0.8"), include=["head", "features.6"])
    decompose_(net, TTConfig(rank=0.5, n_cores=2), include=["out"], strict=True)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    torch.manual_seed(123)
    fresh = TinyNet().eval()
    for entry in net.slimtorch_arch["transforms"]:
        rebuild_decomposed(fresh, entry["params"])
    fresh.load_state_dict(load_file(str(path)), strict=True)
    torch.testing.assert_close(fresh(X), net(X))


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="config must be a DecomposeConfig"):
        decompose_(nn.Linear(2, 2), {"rank": 0.5})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="include must be a list of glob strings"):
        decompose_(nn.Linear(2, 2), SVDConfig(), include="head")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is not a submodule"):
        set_submodule(nn.Sequential(nn.Linear(2, 2)), "3", nn.Identity())
    from slimtorch.core.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="lacks"):
        rebuild_decomposed(nn.Sequential(), {"layers": {"x": {"kind": "cp"}}})


def test_saved_decomposed_zoo_model_loads_through_model_directory(tmp_path) -> None:
    """decompose_ -> save_model -> load_model replays the factorised shapes and weights."""
    from slimtorch.decompose import TuckerConfig, decompose_
    from slimtorch.models import create_model, load_model, save_model

    model = create_model("lenet5", num_classes=10, in_channels=1, input_size=28).eval()
    x = torch.randn(3, 1, 28, 28)
    with pytest.raises(ValueError, match="'conv2' match no module"):
        decompose_(model, TuckerConfig(rank=0.5), include=["conv2"])
    report = decompose_(model, TuckerConfig(rank=0.5), include=["features.3"], example_input=x)
    assert [r.action for r in report.rows] == ["decomposed"]
    expected = model(x)
    save_model(
        model,
        tmp_path / "m",
        input_shape=(1, 28, 28),
        mean=(0.5,),
        std=(0.5,),
        class_names=[str(i) for i in range(10)],
    )
    loaded, card = load_model(tmp_path / "m")
    assert [t["name"] for t in card.transforms] == ["decompose.layers"]
    torch.testing.assert_close(loaded(x), expected)


def test_tucker_rank_is_capped_by_the_unfolding_rank() -> None:
    """rank=0.5 of Conv2d(3, 64, 3) asks for 32 output ranks; the (64, 27) unfolding has 27."""
    from slimtorch.decompose import TuckerConfig, decompose_

    net = nn.Sequential(nn.Conv2d(3, 64, 3))
    report = decompose_(net, TuckerConfig(rank=0.5))
    row = report.rows[0]
    assert row.action == "skipped" or row.ranks[0] <= 27
    assert "failed" not in (row.reason or "")


def test_exclude_glob_matching_nothing_is_an_error(net: TinyNet) -> None:
    before = copy.deepcopy(net)
    with pytest.raises(ValueError, match=r"exclude pattern\(s\) 'haed' match no module of TinyNet"):
        decompose_(net, SVDConfig(rank=0.25), exclude=["haed"])
    assert same_model(net, before)


def test_include_glob_matching_only_a_container_is_an_error() -> None:
    # it selected no layer and decompose_ changed nothing without a word
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8)))
    before = copy.deepcopy(net)
    with pytest.raises(ValueError, match=r"'2' select no nn.Conv2d/nn.Linear layer.*'2\.\*'"):
        decompose_(net, SVDConfig(rank=0.25), include=["2"])
    assert same_model(net, before)
    report = decompose_(net, SVDConfig(rank=0.25), include=["2.*"])
    assert [r.name for r in report.rows] == ["2.0"]


def test_meta_device_model_is_refused_naming_the_layers() -> None:
    with torch.device("meta"):
        meta = TinyNet()
    with pytest.raises(ValueError, match=r"layer\(s\) features\.0, features\.3, .* meta-device"):
        decompose_(meta, TuckerConfig(rank=0.5))
    assert [type(m) for m in meta.modules()] == [type(m) for m in TinyNet().modules()]


def test_layers_read_directly_by_torch_modules_are_skipped() -> None:
    """nn.MultiheadAttention reads out_proj.weight, nn.TransformerEncoderLayer (eval) linear1/2."""
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    mha = nn.Sequential(nn.MultiheadAttention(32, 4, batch_first=True), nn.Linear(32, 32))
    x = torch.randn(2, 5, 32)
    report = decompose_(layer, SVDConfig(rank=0.25))
    assert [(r.name, r.action) for r in report.rows] == [
        ("self_attn.out_proj", "skipped"),
        ("linear1", "skipped"),
        ("linear2", "skipped"),
    ]
    reason = rows(report)["self_attn.out_proj"].reason
    assert reason.startswith("self_attn (nn.MultiheadAttention) reads this layer's weight directly")
    assert "the model (nn.TransformerEncoderLayer) reads" in rows(report)["linear1"].reason
    assert layer(x).shape == (2, 5, 32)
    report = decompose_(mha, SVDConfig(rank=0.25))
    assert {r.name: r.action for r in report.rows} == {"0.out_proj": "skipped", "1": "decomposed"}
    assert mha[0](x, x, x)[0].shape == (2, 5, 32)


class _CosineHead(nn.Module):
    """Reads ``fc.weight`` without calling ``fc``; ``enc`` is called and its weight read too."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.fc, self.body = nn.Linear(32, 64), nn.Linear(64, 40), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(torch.relu(self.enc(x)))
        h = h + nn.functional.linear(x, self.enc.weight)  # a second, direct use
        return nn.functional.linear(nn.functional.normalize(h), self.fc.weight)


def test_layers_whose_weight_the_forward_reads_are_skipped() -> None:
    # decompose_ reported them decomposed and the model then failed on every call
    torch.manual_seed(0)
    model, x = _CosineHead().eval(), torch.randn(4, 32)
    before = model(x)
    report = decompose_(model, SVDConfig(rank=0.25))
    assert {r.name: r.action for r in report.rows} == {
        "enc": "skipped",
        "fc": "skipped",
        "body": "decomposed",
    }
    assert "reads fc.weight directly" in rows(report)["fc"].reason
    assert model(x).shape == before.shape


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        self.body = nn.Linear(64, 64)
        self.head = nn.Linear(64, 100, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.again = self.body  # one module under two names

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.again(self.body(self.emb(t))))


def test_shared_weights_are_skipped_not_untied() -> None:
    model = TiedLM()
    before = copy.deepcopy(model)
    report = decompose_(model, SVDConfig(rank=0.25))
    assert {r.name: r.action for r in report.rows} == {"body": "skipped", "head": "skipped"}
    assert "shared with again.bias, again.weight (tied weights)" in rows(report)["body"].reason
    assert "shared with emb.weight (tied weights)" in rows(report)["head"].reason
    assert same_model(model, before) and model.head.weight is model.emb.weight
    with pytest.raises(TransformSkipError, match=r"skipped 2 layer\(s\).*head: its parameters"):
        decompose_(model, SVDConfig(rank=0.25), strict=True)


def test_rebuild_with_a_malformed_spec_is_a_model_load_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    for spec in (
        {"kind": "svd_linear", "in_features": 4},
        {"kind": "svd_linear", "in_features": 4, "out_features": 4, "rank": 0},
    ):
        with pytest.raises(ModelLoadError, match=r"layer '0' has a malformed svd_linear spec"):
            rebuild_decomposed(model, {"layers": {"0": spec}})
        assert type(model[0]) is nn.Linear


def test_an_example_input_the_model_cannot_run_is_named(net: TinyNet) -> None:
    before = copy.deepcopy(net)
    for bad, what in (
        (torch.randn(2, 1, 16, 16), r"\(\(2, 1, 16, 16\) torch\.float32\)"),
        ([X], r"\(list\)"),
    ):
        with pytest.raises(ValueError, match=rf"example_input {what} does not run through TinyNet"):
            decompose_(net, TuckerConfig(rank=0.5), example_input=bad)
        assert same_model(net, before)


def test_a_budget_the_built_layers_miss_is_reported_missed(
    net: TinyNet, caplog: pytest.LogCaptureFixture
) -> None:
    # the plan meets params=0.5, but a speed gate no layer can pass keeps every layer dense
    config = TuckerConfig(rank="budget:params=0.5", min_speedup=100.0, speed_batch=2)
    with caplog.at_level("WARNING"):
        report = decompose_(net, config, include=["features.3"], example_input=X)
    budget = report.budget
    assert budget is not None and budget["metric"] == "params" and not budget["met"]
    assert budget["reached"] == budget["total_before"] > budget["target"] >= budget["planned"]
    assert report.to_dict()["budget"] == budget
    assert report.to_table().splitlines()[-1].endswith("MISSED")
    assert "budget params missed" in caplog.text and "features.3 (" in caplog.text
    met = decompose_(net, TuckerConfig(rank="budget:params=0.5"), include=["features.3"],
                     example_input=X).budget  # fmt: skip
    assert met is not None and met["met"] and met["reached"] <= met["target"]


def test_a_half_precision_model_is_refused(net: TinyNet) -> None:
    half = copy.deepcopy(net).half()
    before = copy.deepcopy(half)
    with pytest.raises(ValueError, match=r"torch\.float16 tensors; decompose_ takes a float32"):
        decompose_(half, SVDConfig(rank=0.5))
    assert same_model(half, before)


@pytest.mark.parametrize(
    "config", [SVDConfig(rank=0.5), TuckerConfig(rank=0.5), CPConfig(rank=8), TTConfig(rank=4)]
)
def test_a_frozen_layer_stays_frozen(net: TinyNet, config) -> None:
    net.head.requires_grad_(False)
    net.features[3].requires_grad_(False)
    report = decompose_(net, config, include=["head", "features.3", "features.6", "out"])
    done = {r.name for r in report.rows if r.action == "decomposed"}
    assert done & {"head", "features.3"}
    for name in done:
        flags = {p.requires_grad for p in net.get_submodule(name).parameters()}
        assert flags == ({False} if name in ("head", "features.3") else {True}), name


def test_a_trainable_bias_stays_trainable_when_the_weight_is_frozen(net: TinyNet) -> None:
    net.head.weight.requires_grad_(False)  # train only the bias
    decompose_(net, SVDConfig(rank=0.5), include=["head"])
    flags = {n: p.requires_grad for n, p in net.head.named_parameters()}
    assert flags == {"first.weight": False, "last.weight": False, "last.bias": True}


def test_a_model_that_is_a_single_layer_is_refused() -> None:
    with pytest.raises(ValueError, match=r"decompose_ changes the layers .* Linear has none"):
        decompose_(nn.Linear(64, 64), SVDConfig(rank=0.25))


def test_a_layer_factorised_before_gets_a_skip_row() -> None:
    # decomposing an SVD'd layer again returned an empty report, which strict=True passed
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    decompose_(net, SVDConfig(rank=0.25), include=["0"])
    report = decompose_(net, SVDConfig(rank=0.25))
    rows = {r.name: (r.action, r.reason) for r in report.rows}
    assert rows["0"][0] == "skipped" and "already factorised (LowRankLinear)" in str(rows["0"][1])
    assert rows["2"][0] == "decomposed"
    with pytest.raises(TransformSkipError, match="already factorised"):
        decompose_(net, SVDConfig(rank=0.25), include=["0"], strict=True)
