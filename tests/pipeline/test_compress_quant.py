"""compress_run with the quantization methods: int8/cast models that reload and keep accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.models import load_model
from slimtorch.pipeline import compress_run
from slimtorch.pipeline.quant_methods import GEMM_HINT, _gemm_candidates
from slimtorch.quant import QDQConv2d, QDQLinear
from slimtorch.train import TrainConfig
from slimtorch.train.classifier import train_classifier


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base")
    cfg = TrainConfig(epochs=8, lr=0.05, progress=False)
    run = train_classifier(
        model="lenet5", dataset="digits", out_dir=out, train_config=cfg, batch_size=64
    )
    assert run.test_metrics["accuracy"] > 0.9
    return out


def _run(trained: Path, out: Path, method: str, options: dict[str, object]) -> dict[str, object]:
    res = compress_run(
        in_dir=trained,
        out_dir=out,
        method=method,
        method_options=options,
        finetune=TrainConfig(epochs=2, lr=0.01, progress=False),
        batch_size=64,
        profile_batch=8,
        threads=1,
    )
    model, _ = load_model(out / "model")  # reloads without calibration data
    x = torch.randn(4, 1, 8, 8)
    res.model.eval()
    torch.testing.assert_close(model(x), res.model(x))
    return json.loads((out / "report.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("method", ["ptq", "qat"])
def test_int8_methods_keep_accuracy_and_shrink(trained: Path, tmp_path: Path, method: str) -> None:
    options: dict[str, object] = (
        {"mode": "static"}
        if method == "ptq"
        else {"weight_bits": 8, "act_bits": 8, "runtime_check": False}
    )
    report = _run(trained, tmp_path / method, method, options)
    acc = report["accuracy"]
    assert acc["after_finetune"] >= acc["before"] - 0.02
    assert report["after"]["size_bytes"] < report["before"]["size_bytes"] / 3
    # int8 weights are still weights: only the folded batch norms leave the count
    assert report["after"]["params"] >= 0.95 * report["before"]["params"]
    assert (report["history"] is None) == (method == "ptq")  # PTQ is never fine-tuned
    model, _ = load_model(tmp_path / method / "model")
    assert any(isinstance(m, QDQConv2d | QDQLinear) for m in model.modules())
    finish = report["finish"]
    assert "simulated" in finish["note"]
    assert report["config"]["runtime_check"] == (method == "ptq")
    if method == "qat":
        assert "runtimes" not in finish  # runtime_check off
        return
    # the int8 model timed against the float one where int8 kernels run, and in the table
    runtimes = finish["runtimes"]
    assert sorted(runtimes) == ["inductor", "onnxruntime"]
    table = (tmp_path / method / "report.txt").read_text()
    for name, t in runtimes.items():
        assert t["batch"] == 8 and t["threads"] == 1
        if t["skipped"] is None:
            assert t["fp32_s"] > 0 and t["int8_s"] > 0 and t["int8_kernels"]
            ratio = f"{t['int8_s'] / t['fp32_s']:.2f}x"
            assert any(
                line.startswith(f"latency {name} (ms)") and line.endswith(ratio)
                for line in table.splitlines()
            )
        else:
            assert f"latency {name} (ms)" in table and "skipped" in table
    assert runtimes["onnxruntime"]["skipped"] is None  # onnxruntime is a test dependency
    # at a small batch the report points to the im2col + linear layout for inductor
    assert finish["hint"] == GEMM_HINT and f"({GEMM_HINT})" in table.splitlines()


def test_int8_runtime_check_is_an_option(trained: Path) -> None:
    with pytest.raises(TypeError, match="runtime_check"):
        compress_run(
            in_dir=trained, out_dir=None, method="ptq", method_options={"runtime_check": "yes"}
        )
    # nothing quantized (every layer excluded): no change, so nothing is timed
    res = compress_run(
        in_dir=trained, out_dir=None, method="ptq", method_options={"mode": "static"},
        exclude=["*"], profile_batch=2, threads=1, profiles=(),
    )  # fmt: skip
    assert res.report["finish"] is None
    assert all(t["note"] == "no layer changed" for t in res.report["verdict"]["speed"])


def test_int8_runtimes_are_timed_by_the_main_process_only(
    trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slimtorch.quant as quant
    import slimtorch.train.distributed as dist

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a second rank timed the runtimes")

    monkeypatch.setattr(dist, "is_main_process", lambda: False)
    monkeypatch.setattr(quant, "time_int8_runtimes", never)
    res = compress_run(
        in_dir=trained, out_dir=None, method="ptq", method_options={"mode": "static"},
        profile_batch=2, threads=1, profiles=(),
    )  # fmt: skip
    assert res.report["finish"]["runtimes_skipped"] == "timed by the main process only"


def test_conv_gemm_lowers_times_and_then_quantizes(trained: Path, tmp_path: Path) -> None:
    report = _run(trained, tmp_path / "gemm", "conv-gemm", {})
    assert report["history"] is None
    layers = report["layers"]
    assert [r["conv"] for r in layers["gemm"]["rows"] if r["action"] == "gemm"] == ["features.3"]
    assert [r["conv"] for r in layers["direct"]["rows"] if r["action"] != "skipped"] == [
        "features.0"
    ]
    # one row per convolution, saying what it finally became
    assert [(r["conv"], r["action"]) for r in layers["layers"]] == [
        ("features.0", "direct+pool"),  # its ReLU and max-pooling fused in
        ("features.3", "gemm"),
    ]
    acc = report["accuracy"]
    assert acc["after_finetune"] == pytest.approx(acc["before"], abs=1e-3)  # exact rewrite
    timed = report["finish"]["compiled_latency"]
    assert timed["after_s"] > 0 and timed["source"].endswith(",compiled,max_autotune")
    # a lowered model directory quantizes like any other: the linear inside becomes Q/DQ
    options = {"mode": "static", "runtime_check": False}
    _run(tmp_path / "gemm", tmp_path / "gemm-int8", "ptq", options)
    model, _ = load_model(tmp_path / "gemm-int8" / "model")
    gemm = model.features[3]
    assert type(gemm).__name__ == "GemmConv2d" and isinstance(gemm.linear, QDQLinear)
    # no hint for a model already lowered, nor for one without a convolution to lower
    original, _ = load_model(trained / "model")
    assert _gemm_candidates(original) and not _gemm_candidates(model)
    assert not _gemm_candidates(
        torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4, 2))
    )
    with pytest.raises(TypeError, match="direct_stem"):
        compress_run(
            in_dir=trained, out_dir=None, method="conv-gemm", method_options={"direct_stem": 1}
        )


def test_fp16_cast_and_mixed_precision(trained: Path, tmp_path: Path) -> None:
    report = _run(trained, tmp_path / "fp16", "fp16", {"profile": "rx580"})
    assert report["after"]["size_bytes"] < 0.6 * report["before"]["size_bytes"]
    assert report["history"] is None
    mixed = _run(trained, tmp_path / "mixed", "mixed", {"size_ratio": 4.0})
    assert mixed["accuracy"]["after_finetune"] >= mixed["accuracy"]["before"] - 0.03
    # weight-only int8: no runtime builds it, so no hint about int8 kernels either
    runtimes = mixed["finish"]["runtimes"]
    assert all("weight-only" in t["skipped"] for t in runtimes.values())
    assert "hint" not in mixed["finish"]
    # the verdict's size is what the model directory holds (int4 packed), not the memory size

    def file_bytes(model_dir: Path) -> int:
        from safetensors import safe_open

        with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
            return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())

    def file_size(model_dir: Path) -> int:
        return (model_dir / "model.safetensors").stat().st_size

    saved = file_size(tmp_path / "mixed" / "model") / file_size(trained / "model")
    assert mixed["verdict"]["size_ratio"] == pytest.approx(saved)  # the files, headers and all
    tensors = file_bytes(tmp_path / "mixed" / "model") / file_bytes(trained / "model")
    assert tensors <= 1 / 4.0 + 1e-6  # the plan's budget holds on the weights written
    with pytest.raises(ValueError, match="size_ratio"):
        compress_run(
            in_dir=trained, out_dir=None, method="mixed", method_options={"size_ratio": -1}
        )


def test_fold_bn_is_exact_and_reloads(tmp_path: Path) -> None:
    base = tmp_path / "base"
    cfg = TrainConfig(epochs=1, lr=0.05, progress=False)
    train_classifier(model="resnet20", dataset="digits", out_dir=base, train_config=cfg)
    report = _run(base, tmp_path / "folded", "fold-bn", {})
    assert report["history"] is None  # a deployment step: never fine-tuned
    assert report["layers"]["folded"] == 21 and report["layers"]["skipped"] == 0
    acc = report["accuracy"]
    assert acc["after_finetune"] == pytest.approx(acc["before"], abs=1e-3)
    model, _ = load_model(tmp_path / "folded" / "model")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    # half precision folds the batch norms first: no float32 islands, so no cast kernels
    est = {}
    for fold in (True, False):
        out = tmp_path / f"fp16-{fold}"
        cast = _run(base, out, "fp16", {"profile": "rx580", "fold_bn": fold})
        assert cast["config"]["fold_bn"] is fold
        assert ("fold_bn" in cast["layers"]) is fold
        est[fold] = cast["after"]["estimates"]["rx580"]["total_s"]
        kept_bn = any(
            isinstance(m, torch.nn.BatchNorm2d) for m in load_model(out / "model")[0].modules()
        )
        assert kept_bn is not fold
    assert cast["layers"]["gain"] == "memory"  # fp16 computes at the fp32 rate on the rx580
    assert est[True] < est[False]  # the cast kernels around fp32 batch norms cost on the target
    with pytest.raises(ValueError, match="takes no options"):
        compress_run(in_dir=base, out_dir=None, method="fold-bn", method_options={"x": 1})


def test_direct_conv_lowers_the_stem_and_times_it_compiled(trained: Path, tmp_path: Path) -> None:
    report = _run(trained, tmp_path / "direct", "direct-conv", {})
    assert report["history"] is None  # a deployment step: never fine-tuned
    assert (
        report["layers"]["lowered"] == 1 and report["layers"]["rows"][0]["action"] == "direct+pool"
    )
    acc = report["accuracy"]
    assert acc["after_finetune"] == pytest.approx(acc["before"], abs=1e-3)  # exact rewrite
    timed = report["finish"]["compiled_latency"]
    assert timed["before_s"] > 0 and timed["after_s"] > 0 and timed["source"].endswith(",compiled")
    model, _ = load_model(tmp_path / "direct" / "model")
    assert type(model.features[0]).__name__ == "DirectConv2d"
    with pytest.raises(TypeError, match="compiled_check"):
        compress_run(
            in_dir=trained, out_dir=None, method="direct-conv", method_options={"compiled_check": 1}
        )


def test_direct_conv_on_a_float64_model_skips_the_compiled_check(
    trained: Path, tmp_path: Path
) -> None:
    # inductor's frozen CPU kernels take no float64: the finish step ended the command in a
    # 120-line BackendCompilerFailed traceback after the transform had run
    from slimtorch.models import save_model
    from slimtorch.quant import compile_int8_x86

    model, card = load_model(trained / "model")
    double = tmp_path / "f64"
    save_model(model.double(), double / "model", input_shape=card.input_shape, mean=card.mean,
               std=card.std, class_names=card.class_names, extra=card.extra)  # fmt: skip
    report = _run(double, tmp_path / "direct", "direct-conv", {})
    assert report["layers"]["lowered"] == 1
    assert "float64" in report["finish"]["hint"] and not report["finish"].get("compiled_latency")
    with pytest.raises(ValueError, match="cannot compile a float64 model"):
        compile_int8_x86(model)


def test_the_compiled_check_is_skipped_on_a_gpu_inductor_cannot_compile_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # direct-conv and conv-gemm compiled both models on any GPU: on a GTX 1060 the run failed
    # with GPUTooOldForTriton after its transform, writing nothing
    import slimtorch.core.devices as devices
    from slimtorch.pipeline.side_by_side import compiled_side_by_side

    monkeypatch.setattr(devices, "compile_problem", lambda d: "a GPU too old for Triton")
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    out = compiled_side_by_side(net, net, torch.randn(1, 1, 8, 8), max_autotune=False)
    assert out == {"hint": "compiled check skipped: a GPU too old for Triton"}


def test_ptq_of_an_int8_model_changes_nothing_and_times_nothing(
    trained: Path, tmp_path: Path
) -> None:
    # every layer was skipped as int8 already, yet the run counted as a change and its
    # runtime check timed the int8 model against itself
    _run(trained, tmp_path / "q1", "ptq", {"runtime_check": False})
    report = _run(tmp_path / "q1", tmp_path / "q2", "ptq", {})
    assert report["finish"] is None
    assert all(t["note"] == "no layer changed" for t in report["verdict"]["speed"])


def test_calibration_alone_takes_a_training_split_smaller_than_the_batch(trained: Path) -> None:
    # ptq, fp16 and mixed only calibrate, yet a 2,000 batch refused the 1,438 digits images
    res = compress_run(in_dir=trained, out_dir=None, method="ptq",
                       method_options={"runtime_check": False}, finetune=None, batch_size=2000,
                       profile_batch=2, threads=1, profiles=())  # fmt: skip
    assert res.report["layers"]["totals"]["quantized"] == 5
    with pytest.raises(ValueError, match="batch_size 2000 is larger than the 1438 training"):
        compress_run(in_dir=trained, out_dir=None, method="prune", method_options={},
                     finetune=TrainConfig(epochs=1, progress=False), batch_size=2000,
                     profile_batch=2, threads=1, profiles=())  # fmt: skip


def test_qat_times_the_converted_int8_model_against_the_float_one(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slimtorch.quant as quant
    from slimtorch.quant.export import is_qdq_model
    from slimtorch.quant.int8_runtimes import RuntimeTiming

    seen: dict[str, object] = {}

    def fake(reference: torch.nn.Module, quantized: torch.nn.Module, example: torch.Tensor,
             **kw: object) -> dict[str, RuntimeTiming]:  # fmt: skip
        seen.update(ref_qdq=is_qdq_model(reference), q_qdq=is_qdq_model(quantized), **kw)
        seen["batch"] = example.shape[0]
        return {"onnxruntime": RuntimeTiming("onnxruntime", 8, 1, 2e-3, 1e-3, 2.0, {"QGemm": 2})}

    monkeypatch.setattr(quant, "time_int8_runtimes", fake)
    report = _run(trained, tmp_path / "qat", "qat", {"weight_bits": 8, "act_bits": 8})
    # after the fine-tune: the converted Q/DQ model against the float model from before QAT
    assert seen["ref_qdq"] is False and seen["q_qdq"] is True
    assert seen["batch"] == 8 and seen["threads"] == 1
    calib = seen["calibration"]
    assert isinstance(calib, list) and 0 < len(calib) <= 8
    finish = report["finish"]
    assert finish["converted"] and finish["runtimes"]["onnxruntime"]["speedup"] == 2.0
    table = (tmp_path / "qat" / "report.txt").read_text()
    assert any(
        line.startswith("latency onnxruntime (ms)") and line.endswith("0.50x")
        for line in table.splitlines()
    )


def _qdq_linear_model(device: str) -> tuple[nn.Module, torch.Tensor]:
    from slimtorch.quant import PTQConfig, quantize_

    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 32)
    quantize_(net, PTQConfig(mode="static"), x)
    return net.to(device), x.to(device)


def test_the_cuda_int8_pointer_is_given_only_where_it_would_run() -> None:
    from slimtorch.pipeline.methods import MethodRequest
    from slimtorch.pipeline.quant_methods import _int8_report

    q, x = _qdq_linear_model("cpu")
    skipped = _int8_report(q, MethodRequest({}, example_input=x), None, True)["runtimes_skipped"]
    assert "torchao_cuda_" not in skipped  # measured on the CPU: no GPU to point at


@pytest.mark.gpu
def test_the_cuda_int8_pointer_names_torchao_on_a_gpu_with_an_int8_gemm() -> None:
    from slimtorch.pipeline.methods import MethodRequest
    from slimtorch.pipeline.quant_methods import _int8_report
    from slimtorch.quant.runtime import int_mm_problem

    q, x = _qdq_linear_model("cuda")
    skipped = _int8_report(q, MethodRequest({}, example_input=x), None, True)["runtimes_skipped"]
    assert ("torchao_cuda_" in skipped) == (int_mm_problem(x.device) is None), skipped
