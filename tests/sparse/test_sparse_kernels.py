"""Sparse-kernel layers give the dense outputs; 2:4 kernels on CUDA (gpu-marked)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch.prune import MagnitudeConfig, NMConfig, prune_
from slimtorch.sparse import (
    SparseConv2d,
    SparseLinear,
    build_sparse_layer,
    conv_lowering_skip,
    semi_structured_support,
    sparsify_,
    to_semi_structured_,
)


def _pruned(module: nn.Module, sparsity: float = 0.8) -> nn.Module:
    prune_(nn.Sequential(module), MagnitudeConfig(sparsity=sparsity))
    return module


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_dense(fmt: str, bias: bool) -> None:
    lin = _pruned(nn.Linear(64, 32, bias=bias))
    layer = build_sparse_layer(lin, fmt)
    assert isinstance(layer, SparseLinear) and layer.fmt == fmt
    assert layer.weight.layout == {"csr": torch.sparse_csr, "bsr": torch.sparse_bsr}[fmt]
    for x in (torch.randn(1, 64), torch.randn(5, 64), torch.randn(2, 3, 64)):
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), lin(x), atol=1e-5, rtol=1e-5)
    assert "weight" not in layer.state_dict()  # a deployment module: weight not persisted
    back = layer.to_dense_module()
    assert torch.equal(back.weight, lin.weight)


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "stride": 2, "padding": (1, 2), "dilation": (1, 2)},
        {"kernel_size": 1, "bias": False},
        {"kernel_size": (3, 1), "padding": "valid"},
    ],
)
def test_sparse_conv_lowering_matches_dense(fmt: str, kwargs: dict) -> None:
    conv = _pruned(nn.Conv2d(8, 16, **kwargs))
    layer = build_sparse_layer(conv, fmt)
    assert isinstance(layer, SparseConv2d)
    x = torch.randn(3, 8, 11, 9)
    with torch.inference_mode():
        out = layer(x)
        torch.testing.assert_close(out, conv(x), atol=1e-5, rtol=1e-5)
    assert out.is_contiguous()
    assert torch.equal(layer.to_dense_module().weight, conv.weight)


def test_conv_lowering_skips_and_semi_structured_statement() -> None:
    assert "groups=4" in str(conv_lowering_skip(nn.Conv2d(8, 8, 3, groups=4)))
    assert "padding_mode" in str(conv_lowering_skip(nn.Conv2d(8, 8, 3, padding_mode="reflect")))
    assert "explicit integer padding" in str(conv_lowering_skip(nn.Conv2d(8, 8, 3, padding="same")))
    with pytest.raises(ValueError, match="groups=4"):
        build_sparse_layer(nn.Conv2d(8, 8, 3, groups=4), "csr")
    with pytest.raises(TypeError, match=r"nn\.Linear or nn\.Conv2d"):
        build_sparse_layer(nn.ReLU(), "csr")
    with pytest.raises(ValueError, match="fmt must be one of"):
        build_sparse_layer(nn.Linear(4, 4), "coo")
    with pytest.raises(ValueError, match="no BSR block size"):
        build_sparse_layer(nn.Linear(6, 10), "bsr")
    reason = semi_structured_support("cpu")
    assert reason is not None and "storage-only on cpu" in reason and ">= 8.0" in reason


@pytest.mark.gpu
def test_semi_structured_kernels_on_cuda() -> None:
    dev = torch.device("cuda")
    if semi_structured_support(dev) is not None:
        pytest.skip(str(semi_structured_support(dev)))
    net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).half().to(dev)
    prune_(net, NMConfig(n=2, m=4))
    x = torch.randn(64, 256, dtype=torch.half, device=dev)
    with torch.inference_mode():
        ref = net(x)
    layer = build_sparse_layer(net[0], "semi_structured")
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), net[0](x), atol=1e-2, rtol=1e-2)
    report = to_semi_structured_(net)
    assert [r.action for r in report.rows] == ["sparse", "sparse"]
    with torch.inference_mode():
        torch.testing.assert_close(net(x), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_semi_structured_conv_and_sparsify_on_cuda() -> None:
    dev = torch.device("cuda")
    if semi_structured_support(dev) is not None:
        pytest.skip(str(semi_structured_support(dev)))
    conv = nn.Conv2d(64, 128, 3, padding=1).half().to(dev)
    prune_(nn.Sequential(conv), NMConfig(n=2, m=4))
    x = torch.randn(8, 64, 16, 16, dtype=torch.half, device=dev)
    layer = build_sparse_layer(conv, "semi_structured")
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), conv(x), atol=2e-2, rtol=2e-2)
    net = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024)).half().to(dev)
    prune_(net, NMConfig(n=2, m=4))
    report = sparsify_(net, torch.randn(256, 1024, dtype=torch.half, device=dev))
    for row in report.rows:
        semi = next(c for c in row.candidates if c.fmt == "semi_structured")
        assert semi.status in ("ok", "error"), semi
        assert row.action in ("sparse", "dense")
    assert report.notes == []


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_sparse_conv_takes_an_unbatched_image_like_conv2d(fmt: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    prune_(nn.Sequential(conv), MagnitudeConfig(sparsity=0.8))
    layer = build_sparse_layer(conv, fmt)
    x = torch.randn(4, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"expects \(N, 4, H, W\) or \(4, H, W\) input"):
        layer(torch.randn(2, 3, 10, 10))


def test_exports_and_quantizers_name_sparse_kernels_instead_of_failing_inside_torch(
    tmp_path,
) -> None:
    from slimtorch.models import save_exported
    from slimtorch.quant import PTQConfig, quantize_
    from slimtorch.quant.export import export_onnx
    from slimtorch.quant.lowp import LowPrecisionConfig, cast_

    net = nn.Sequential(_pruned(nn.Linear(64, 32)), nn.ReLU(), nn.Linear(32, 10)).eval()
    net[0] = build_sparse_layer(net[0], "csr")
    x = torch.randn(3, 64)
    for what, call in (
        ("export_onnx", lambda: export_onnx(net, tmp_path / "m.onnx", x)),
        ("torch.export", lambda: save_exported(net, x, tmp_path / "m.pt2")),
        ("quantize_", lambda: quantize_(net, PTQConfig(mode="dynamic"))),
        ("cast_", lambda: cast_(net, LowPrecisionConfig())),
    ):
        with pytest.raises(ValueError, match=rf"^0 is a sparse kernel .*{what}.*"
                           r"densify_\(model\) first"):  # fmt: skip
            call()
    assert not list(tmp_path.iterdir())
    assert type(net[2]) is nn.Linear and net[2].weight.dtype == torch.float32  # untouched


@pytest.mark.gpu
def test_a_strict_refusal_on_another_device_leaves_the_model_where_it_was() -> None:
    # the model was moved to the GPU for the measurement and stayed there after the strict
    # refusal, though the docstring promises it unchanged
    from slimtorch.core.errors import TransformSkipError

    net = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    prune_(net, MagnitudeConfig(sparsity=0.9))  # the grouped conv has no sparse kernel
    with pytest.raises(TransformSkipError):
        sparsify_(net, torch.randn(2, 8, 8, 8), device="cuda", strict=True, min_time_s=0.0)
    assert {p.device.type for p in net.parameters()} == {"cpu"}


def test_training_a_model_with_sparse_kernels_is_refused() -> None:
    # the sparse layers hold no trainable parameter: fit ran, and silently left them as they were
    from slimtorch.sparse import build_sparse_layer
    from slimtorch.train import TrainConfig, Trainer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    prune_(model, MagnitudeConfig(sparsity=0.9))
    model[0] = build_sparse_layer(model[0], "csr")
    loader = [(torch.randn(8, 64), torch.randint(0, 4, (8,)))]
    refused = r"layer\(s\) .*0.* run a sparse kernel from sparsify_, whose weights do not train"
    with pytest.raises(ValueError, match=refused):
        Trainer(model, TrainConfig(epochs=1, progress=False)).fit(loader)


def test_to_semi_structured_refuses_a_meta_model_by_name() -> None:
    # it failed inside torch with "Tensor.item() cannot be called on meta tensors"
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="to_semi_structured_ needs the model's values"):
        to_semi_structured_(net)


def test_a_swap_keeps_precision_casts_training_mode_and_frozen_weights() -> None:
    # to_semi_structured_ after cast_ dropped the layer's input cast (the next forward failed
    # on float32 inputs), and densify_ gave back trainable, training-mode layers
    from slimtorch.quant.precision import layer_precisions, set_precision_
    from slimtorch.sparse import densify_

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    set_precision_(net, ["0"], torch.float16)
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 8)
    before, hooks = net(x), len(net[2]._forward_pre_hooks)
    net[2] = build_sparse_layer(net[2], "csr")
    assert len(net[2]._forward_pre_hooks) == hooks and not net[2].training
    torch.testing.assert_close(net(x), before)
    assert densify_(net) == ["2"]
    assert len(net[2]._forward_pre_hooks) == hooks and not net[2].training
    assert not any(p.requires_grad for p in net[2].parameters())
    assert layer_precisions(net) == {"0": "float16", "2": "float32"}
    torch.testing.assert_close(net(x), before)


@pytest.mark.gpu
def test_semi_structured_after_cast_runs_and_densifies_on_cuda() -> None:
    from slimtorch.quant import LowPrecisionConfig, cast_
    from slimtorch.sparse import densify_, to_semi_structured_

    dev = torch.device("cuda")
    if semi_structured_support(dev) is not None:
        pytest.skip(str(semi_structured_support(dev)))
    torch.manual_seed(0)
    lin = nn.Linear
    net = nn.Sequential(lin(256, 256), nn.ReLU(), lin(256, 256), nn.ReLU(), lin(256, 10))
    net = net.to(dev).eval()
    prune_(net, NMConfig(n=2, m=4))
    x = torch.randn(64, 256, device=dev)
    cast_(net, LowPrecisionConfig(dtype="fp16", max_output_error=1.0), check_inputs=x)
    with torch.inference_mode():
        ref = net(x)
    report = to_semi_structured_(net)
    assert "2" in [r.name for r in report.rows if r.action == "sparse"]  # the fp16 layer
    with torch.inference_mode():
        torch.testing.assert_close(net(x), ref, atol=2e-2, rtol=2e-2)
    densify_(net)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), ref, atol=2e-2, rtol=2e-2)


def test_sparse_layers_stay_inference_only_and_dense_forms_trainable() -> None:
    # the frozen-flag carry made a sparse layer's bias trainable (every forward outside no_grad
    # built a graph) and froze the bias of a dense form made from a sparse layer built directly
    sparse = build_sparse_layer(nn.Linear(8, 8), "csr")
    assert not any(p.requires_grad for p in sparse.parameters())
    dense = SparseLinear(torch.eye(8), torch.zeros(8), "csr").to_dense_module()
    assert all(p.requires_grad for p in dense.parameters())
