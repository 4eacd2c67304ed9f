"""Exact values the command modules pass on: train's defaults for --teacher, --sparse, --lr and
--augment, compress's method options and messages, export's checks, profile's defaults, serve's
settings and the devices table; each command is called with its expensive part replaced."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from slimtorch.cli.main import main

TRAIN = ["train", "--model", "mlp", "--dataset", "digits", "--device", "cpu", "--threads", "1"]


def _fake_train(seen: dict[str, Any], tmp_path: Path) -> Any:
    """A ``train_classifier`` that records its arguments and the callbacks it would use."""

    def fake(**kwargs: Any) -> SimpleNamespace:
        seen.update(kwargs)
        train_ds = SimpleNamespace(
            input_shape=(1, 8, 8), classes=tuple("0123456789"), mean=(0.0,), std=(1.0,)
        )
        seen["callback_list"] = kwargs["callbacks"](train_ds)
        metrics = {"accuracy": 0.123456, "loss": 2.345678}
        return SimpleNamespace(
            test_metrics=metrics, val_metrics=None, train_seconds=1.26, model_dir=tmp_path,
            replica_mismatches=None, model=None,
        )  # fmt: skip

    return fake


@pytest.fixture
def train_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import slimtorch.train.classifier

    seen: dict[str, Any] = {}
    monkeypatch.setattr(slimtorch.train.classifier, "train_classifier", _fake_train(seen, tmp_path))
    return seen


def test_train_teacher_without_distill_options_uses_temperature_4_and_alpha_0_9(
    train_seen: dict[str, Any], model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slimtorch.distill
    from slimtorch.distill import DistillConfig

    made: list[tuple[object, DistillConfig]] = []
    monkeypatch.setattr(slimtorch.distill, "load_teacher", lambda *a, **k: "teacher")
    monkeypatch.setattr(
        slimtorch.distill, "DistillationCallback", lambda t, c: made.append((t, c)) or "cb"
    )
    out = str(tmp_path / "t")
    assert main([*TRAIN, "--out", out, "--teacher", str(model_dir)]) == 0
    assert made == [("teacher", DistillConfig(temperature=4.0, alpha=0.9))]
    assert train_seen["callback_list"] == ["cb"]


def test_train_sparse_without_its_options_passes_the_documented_defaults(
    train_seen: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import slimtorch.sparse

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    sp = SimpleNamespace(  # what the summary line reads of the callback after training
        kind="rigl",
        updates=[{"explored": 0.123456}],
        summary=lambda model: {"fc": {"active": 1, "numel": 8}},
    )
    monkeypatch.setattr(
        slimtorch.sparse, "make_sparse_callback", lambda *a, **k: calls.append((a, k)) or sp
    )
    assert main([*TRAIN, "--out", str(tmp_path / "a"), "--sparse", "rigl"]) == 0
    assert calls[-1] == (
        ("rigl", 0.9),
        {"distribution": "erk", "delta_t": 100, "alpha": 0.3, "t_end": 0.75, "seed": 0,
         "scale_init": True},
    )  # fmt: skip
    assert train_seen["callback_list"] == [sp]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sparse"] == {
        "method": "rigl", "sparsity": 0.875, "mask_updates": 1, "explored": 0.1235
    }  # fmt: skip
    assert main([*TRAIN, "--out", str(tmp_path / "b"), "--sparse", "set", "--dense-init"]) == 0
    assert calls[-1][1]["scale_init"] is False


def test_train_default_learning_rate_is_0_1_for_sgd_and_0_001_for_adamw(
    train_seen: dict[str, Any], tmp_path: Path
) -> None:
    assert main([*TRAIN, "--out", str(tmp_path / "s")]) == 0
    assert train_seen["train_config"].lr == 0.1
    assert main([*TRAIN, "--out", str(tmp_path / "a"), "--optimizer", "adamw"]) == 0
    assert train_seen["train_config"].lr == 0.001
    assert main([*TRAIN, "--out", str(tmp_path / "g"), "--lr", "0.05"]) == 0
    assert train_seen["train_config"].lr == 0.05


def test_train_summary_rounds_accuracy_and_loss_to_4_places(
    train_seen: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*TRAIN, "--out", str(tmp_path / "a")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["test_accuracy"], summary["test_loss"]) == (0.1235, 2.3457)
    assert summary["train_seconds"] == 1.3


def test_augment_choices_map_to_crop_padding_and_flips() -> None:
    from slimtorch.cli.train_cmd import _augment
    from slimtorch.data import AugmentConfig

    assert _augment("auto", "digits") == "auto"
    assert _augment("none", "digits") is None
    ds = SimpleNamespace(input_shape=(1, 28, 28))
    assert _augment("flip", "fashion-mnist")(ds) == AugmentConfig(random_crop_padding=0, hflip=True)
    assert _augment("crop", "fashion-mnist")(ds) == AugmentConfig(
        random_crop_padding=2, hflip=False
    )
    cifar = SimpleNamespace(input_shape=(3, 32, 32))
    assert _augment("crop+flip", "cifar10")(cifar) == AugmentConfig(
        random_crop_padding=4, hflip=True
    )


def _compress_args(model_dir: Path, tmp_path: Path, *extra: str) -> Any:
    from slimtorch.cli.main import build_parser

    base = ["compress", "--in", str(model_dir), "--out", str(tmp_path / "c"), *extra]
    return build_parser().parse_args(base)


def test_compress_decomposition_rank_defaults_to_a_quarter(model_dir: Path, tmp_path: Path) -> None:
    from slimtorch.cli.compress_cmd import _options

    assert _options(_compress_args(model_dir, tmp_path, "--method", "svd")) == {"rank": 0.25}
    args = _compress_args(model_dir, tmp_path, "--method", "tucker", "--rank", "16")
    assert _options(args) == {"rank": 16}


def test_compress_set_with_an_empty_key_is_refused(model_dir: Path, tmp_path: Path) -> None:
    from slimtorch.cli.compress_cmd import _options

    args = _compress_args(model_dir, tmp_path, "--method", "nm", "--set", " =2")
    with pytest.raises(ValueError, match="--set expects KEY=VALUE, got ' =2'"):
        _options(args)


def test_compress_one_speed_batch_is_an_int_and_several_a_list(
    model_dir: Path, tmp_path: Path
) -> None:
    from slimtorch.cli.compress_cmd import _options

    base = ["--method", "svd", "--min-speedup", "1.0", "--speed-batch"]
    assert _options(_compress_args(model_dir, tmp_path, *base, "32"))["speed_batch"] == 32
    several = _options(_compress_args(model_dir, tmp_path, *base, "1, 32,,256"))
    assert several["speed_batch"] == [1, 32, 256]
    for empty in (",", ""):  # passed on as an empty list before
        with pytest.raises(ValueError, match="--speed-batch must be integers"):
            _options(_compress_args(model_dir, tmp_path, *base, empty))


def _fake_compress(seen: dict[str, Any], report: dict[str, Any]) -> Any:
    def fake(**kwargs: Any) -> SimpleNamespace:
        seen.update(kwargs)
        return SimpleNamespace(report=report, table="TABLE", report_path="REPORT")

    return fake


def test_compress_without_fine_tuning_passes_no_train_config_and_warns_of_a_drop(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import slimtorch.pipeline

    seen: dict[str, Any] = {}
    report = {"layers": {"layers": []}, "accuracy": {"before": 0.9, "after_finetune": 0.88}}
    monkeypatch.setattr(slimtorch.pipeline, "compress_run", _fake_compress(seen, report))
    args = ["compress", "--in", str(model_dir), "--method", "svd", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a"), "--finetune-epochs", "0"]) == 0
    assert seen["finetune"] is None and seen["distill"] is None
    # 100 * (0.9 - 0.88) = 2.00 points, above the 1-point threshold
    assert "(accuracy fell 2.00 points and nothing was fine-tuned" in capsys.readouterr().out
    report["accuracy"] = {"before": 0.9, "after_finetune": 0.895}  # 0.50 points: no note
    assert main([*args, "--out", str(tmp_path / "b"), "--finetune-epochs", "0"]) == 0
    assert "accuracy fell" not in capsys.readouterr().out


def _digits_card() -> Any:
    from slimtorch.data import load_dataset

    def load_split(split: str, root: object = None, download: bool = True) -> Any:
        return load_dataset("digits", split)

    return SimpleNamespace(dataset="digits", load_split=load_split)


def test_export_judge_bounds_by_precision() -> None:
    from slimtorch.cli.export_cmd import _judge

    def result(agreement: float, diff: float = 0.01) -> dict[str, Any]:
        return {"checked_on": "digits test, 64 images", "top1_agreement": agreement,
                "max_abs_diff": diff}  # fmt: skip

    _judge(result(0.99), "fp32", None)  # exactly the float bound passes
    with pytest.raises(ValueError, match=r"top-1 agreement 0\.98 < 0\.99 \(fp32\)"):
        _judge(result(0.98), "fp32", None)
    # half precision (fp16 ONNX, or float16/bfloat16 layers in a float model): 0.97
    bf16 = "fp32 input, bfloat16 in 2 of 2 layers"
    for precision in ("fp16", "fp32 input, float16 in 1 of 2 layers", bf16):
        _judge(result(0.97), precision, None)
    with pytest.raises(ValueError, match=r"0\.96 < 0\.97 \(fp32 input, bfloat16"):
        _judge(result(0.96), bf16, None)
    _judge(result(0.85), "int8 Q/DQ", None)
    with pytest.raises(ValueError, match=r"0\.84 < 0\.85 \(int8 Q/DQ\)"):
        _judge(result(0.84), "int8 Q/DQ", None)
    with pytest.raises(ValueError, match=r"0\.9 < 0\.95 \(fp32\)"):
        _judge(result(0.9), "fp32", 0.95)


def test_export_judge_refuses_nan_outputs_even_when_top1_agrees() -> None:
    from slimtorch.cli.export_cmd import _judge

    nan = {"checked_on": "digits test, 64 images", "top1_agreement": 1.0,
           "max_abs_diff": float("nan")}  # fmt: skip
    with pytest.raises(ValueError, match="largest output difference nan"):
        _judge(nan, "fp32", None)


def test_export_judge_skips_int8_on_random_inputs_only_without_a_bound() -> None:
    from slimtorch.cli.export_cmd import _judge

    random = {"checked_on": "random normal, 8 inputs", "top1_agreement": 0.5,
              "max_abs_diff": 1.0}  # fmt: skip
    _judge(random, "int8 Q/DQ", None)
    with pytest.raises(ValueError, match=r"0\.5 < 0\.6 \(int8 Q/DQ\)"):
        _judge(random, "int8 Q/DQ", 0.6)


def test_export_calibration_of_zero_batches_reads_no_data() -> None:
    from slimtorch.cli.export_cmd import calibration_batches

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("no data may be read for 0 batches")

    card = SimpleNamespace(dataset="digits", load_split=refuse)
    assert calibration_batches(card, 0, None) is None


def test_export_calibration_on_an_empty_split_is_none() -> None:
    from slimtorch.cli.export_cmd import calibration_batches

    card = SimpleNamespace(dataset="digits", load_split=lambda *a, **k: [])
    assert calibration_batches(card, 4, None) is None


def test_export_checks_on_64_test_images_of_the_models_shape_else_8_random() -> None:
    from slimtorch.cli.export_cmd import check_inputs

    x, what = check_inputs(_digits_card(), (1, 8, 8), None)
    assert (tuple(x.shape), what) == ((64, 1, 8, 8), "digits test, 64 images")
    x, what = check_inputs(_digits_card(), (1, 28, 28), None)  # the data has another shape
    assert (tuple(x.shape), what) == ((8, 1, 28, 28), "random normal, 8 inputs")


@pytest.fixture
def profiled(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import slimtorch.core.measure

    seen: dict[str, Any] = {}

    def fake(model: Any, example: Any, **kwargs: Any) -> SimpleNamespace:
        seen.update(kwargs, model=model, example=example)
        return SimpleNamespace(to_table=lambda: "TABLE", to_dict=lambda: {})

    monkeypatch.setattr(slimtorch.core.measure, "profile_model", fake)
    return seen


def test_profile_model_defaults_to_1x28x28_inputs_and_10_classes(
    profiled: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    base = ["profile", "--model", "mlp", "--device", "cpu", "--profiles", "none"]
    assert main(base) == 0
    assert tuple(profiled["example"].shape) == (1, 1, 28, 28)
    with torch.no_grad():
        assert tuple(profiled["model"](profiled["example"]).shape) == (1, 10)
    assert "mlp: batch 1, input (1, 28, 28)" in capsys.readouterr().out
    assert main([*base, "--num-classes", "3", "--input-shape", "3,16,16", "--batch-size", "2"]) == 0
    with torch.no_grad():
        assert tuple(profiled["model"](profiled["example"]).shape) == (2, 3)


def test_profile_refuses_a_zero_batch_and_num_classes_for_an_exported_program(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["profile", "--device", "cpu", "--profiles", "none"]
    assert main([*base, "--model", "mlp", "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    prog = str(tmp_path / "m.pt2")
    assert main([*base, "--exported", prog, "--num-classes", "5"]) == 2
    assert "--num-classes 5 applies to --model; an exported program" in capsys.readouterr().err


def test_profile_int8_note_for_weight_only_and_dynamic_layers_is_the_dynamic_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import slimtorch.quant.export
    from slimtorch.cli.profile_cmd import _int8_note

    monkeypatch.setattr(slimtorch.quant.export, "is_qdq_model", lambda m: True)
    monkeypatch.setattr(
        slimtorch.quant.export, "qdq_activation_kinds", lambda m: {"float": 2, "dynamic": 1}
    )
    note = _int8_note(object())
    assert note is not None and "quantize their inputs per batch (dynamic)" in note
    monkeypatch.setattr(slimtorch.quant.export, "qdq_activation_kinds", lambda m: {"float": 2})
    assert "are weight-only" in str(_int8_note(object()))


def _serve_args(*argv: str) -> Any:
    from slimtorch.cli.main import build_parser

    return build_parser().parse_args(["serve", *argv])


def test_serve_options_set_port_and_pins_without_empty_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from slimtorch.cli.serve_cmd import settings_from_args

    monkeypatch.delenv("SLIMTORCH_SERVE_PORT", raising=False)
    monkeypatch.delenv("SLIMTORCH_SERVE_PINNED", raising=False)
    s = settings_from_args(_serve_args("--port", "9123", "--pin", " a, ,b,"))
    assert (s.port, s.pinned) == (9123, ("a", "b"))


def test_serve_verbose_logs_at_debug(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import logging

    import slimtorch.core.errors
    import slimtorch.serve.logs
    import slimtorch.serve.run
    from slimtorch.cli.serve_cmd import run

    levels: list[tuple[str, int]] = []
    monkeypatch.setattr(slimtorch.core.errors, "require_modules", lambda *a, **k: None)
    monkeypatch.setattr(
        slimtorch.serve.logs, "configure_logging", lambda f, level: levels.append((f, level))
    )
    monkeypatch.setattr(slimtorch.serve.run, "run_server", lambda settings: None)
    base = ["--repository", str(tmp_path), "--device", "cpu", "--log-format", "json"]
    args = _serve_args(*base)
    args.verbose = True
    assert run(args) == 0
    args.verbose = False
    assert run(args) == 0
    assert levels == [("json", logging.DEBUG), ("json", logging.INFO)]


def test_devices_table_gives_gib_gb_per_s_and_flags(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import slimtorch.core.devices
    import slimtorch.core.profiles
    from slimtorch.core.devices import DeviceInfo
    from slimtorch.core.profiles import DeviceProfile

    gpu = DeviceInfo(
        kind="cuda", index=0, device="cuda:0", name="Card", total_memory_bytes=8 * 2**30,
        free_memory_bytes=3 * 2**29, compute_capability="8.6", supports_fp16=True,
        supports_bf16=False,
    )  # fmt: skip
    prof = DeviceProfile(
        name="mine", description="a test profile",
        peak_flops={"fp32": 6e12, "fp16": 12e12, "bf16": 1.5e12, "int8": 24e12},
        memory_bandwidth=256e9, memory_bytes=4 * 2**30, int8_dot=True, tensor_cores=False,
    )  # fmt: skip
    slow = DeviceProfile(  # a CPU that emulates fp16: a few GFLOP/s, not "0.00"
        name="slow", description="emulated fp16",
        peak_flops={"fp32": 2.2e11, "fp16": 2.87e9, "bf16": 9e11, "int8": 1.8e12, "fp64": 1e11},
        memory_bandwidth=39e9, memory_bytes=2**30,
    )  # fmt: skip
    asked: list[str] = []
    monkeypatch.setattr(slimtorch.core.devices, "detect_devices", lambda: [gpu])
    monkeypatch.setattr(slimtorch.core.profiles, "list_profiles", lambda: ["cpu", "slow", "mine"])
    monkeypatch.setattr(
        slimtorch.core.profiles,
        "get_profile",
        lambda n: asked.append(n) or (slow if n == "slow" else prof),
    )
    assert main(["devices", "--no-probe"]) == 0
    assert asked == ["slow", "mine"]  # the cpu profile is measured: skipped with --no-probe
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].split() == [
        "slow", "0.22", "0.0029", "0.90", "1.80", "0.10", "39", "1.0", "-"
    ]  # fmt: skip
    # 8 GiB total, 1.5 GiB free; native fp16 but not bf16
    assert lines[3].split() == ["cuda:0", "cuda", "Card", "8.0", "1.5", "8.6", "yes", "no"]
    # TFLOP/s with two decimals, no fp64, 256e9 B/s = 256 GB/s, 4 GiB, only int8-dot set
    assert lines[-1].split() == [
        "mine", "6.00", "12.00", "1.50", "24.00", "-", "256", "4.0", "int8-dot"
    ]  # fmt: skip
    asked.clear()
    assert main(["devices"]) == 0
    assert asked == ["cpu", "slow", "mine"]
