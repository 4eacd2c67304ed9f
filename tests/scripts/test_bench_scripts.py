"""The benchmark scripts' argument parsing and checks, and the helpers they share: fast, no
timing runs."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from script_helpers import load_script
from slimtorch.decompose import CPConfig, TuckerConfig
from slimtorch.models import create_model, save_model

CARD = {"input_shape": (1, 28, 28), "mean": [0.286], "std": [0.353],
        "class_names": [str(i) for i in range(10)]}  # fmt: skip


def _run_dir(tmp_path: Path, dataset: str | None = "fashion-mnist") -> Path:
    """A run directory as ``slimtorch train --out`` leaves it: the model in ``model/``."""
    model = create_model("lenet5", in_channels=1, input_size=28).eval()
    extra = {"dataset": dataset} if dataset else None
    save_model(model, tmp_path / "run" / "model", extra=extra, **CARD)
    (tmp_path / "run" / "history.json").write_text("{}")
    return tmp_path / "run"


def _usage_error(main, argv: list[str], capsys) -> str:
    """Run ``main(argv)``, expect argparse's usage error (exit 2) and return its message."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


# --- the shared module -------------------------------------------------------------------------


def test_model_dir_accepts_a_model_or_a_run_directory(tmp_path: Path) -> None:
    common = load_script("_bench_common")
    run = _run_dir(tmp_path)
    assert common.model_dir(run) == run / "model"
    assert common.model_dir(run / "model") == run / "model"
    with pytest.raises(ValueError, match=r"--base .*nope does not exist"):
        common.model_dir(tmp_path / "nope", "--base")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no slimtorch model"):
        common.model_dir(tmp_path / "empty")
    with pytest.raises(argparse.ArgumentTypeError, match="does not exist"):
        common.model_dir_type("--model-dir")(str(tmp_path / "nope"))


def test_positive_int_types() -> None:
    common = load_script("_bench_common")
    assert common.positive_int("3") == 3
    assert common.positive_ints("1, 32,") == [1, 32]
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match=">= 1"):
            common.positive_int(bad)
    for bad in ("", "1,0", "1,-4", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError, match=">= 1"):
            common.positive_ints(bad)


def test_cpu_name_is_the_model_name(tmp_path: Path) -> None:
    common = load_script("_bench_common")
    name = common.cpu_name()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        if names:
            assert name == names[0]
    assert name


def test_card_dataset_defaults_to_the_card_and_warns_on_another(capsys) -> None:
    common = load_script("_bench_common")
    card = SimpleNamespace(extra={"dataset": "fashion-mnist"})
    assert common.card_dataset(card, None) == "fashion-mnist"
    assert capsys.readouterr().err == ""
    assert common.card_dataset(card, "mnist") == "mnist"
    err = capsys.readouterr().err
    assert "mnist" in err and "fashion-mnist" in err and "warning" in err
    assert common.card_dataset(SimpleNamespace(extra={}), None, default="digits") == "digits"
    assert common.card_dataset(None, "kmnist") == "kmnist"


# --- bench_compress: plans ---------------------------------------------------------------------


def test_plan_ranks_are_read_as_the_cli_reads_them() -> None:
    bench = load_script("bench_compress")
    cp = bench.parse_plan("cp@16@cpu@1")
    assert cp["rank_value"] == 16 and isinstance(cp["rank_value"], int)
    assert CPConfig.from_dict({"rank": cp["rank_value"]}).rank_spec.kind == "int"
    one = bench.parse_plan("tucker@1@cpu@1")
    assert one["rank_value"] == 1 and isinstance(one["rank_value"], int)
    assert TuckerConfig.from_dict({"rank": one["rank_value"]}).rank_spec.kind == "int"
    half = bench.parse_plan("tucker@0.5@cpu@1+32")
    assert half["rank_value"] == 0.5 and half["batches"] == [1, 32]
    budget = bench.parse_plan("tucker@budget:params=0.3,flops=0.4@cpu@32")
    assert budget["rank_value"] == "budget:params=0.3,flops=0.4"
    with pytest.raises(ValueError, match="fraction must be in"):
        bench.parse_plan("cp@1.5@cpu@1")
    with pytest.raises(ValueError, match="does not support"):
        bench.parse_plan("cp@vbmf@cpu@1")
    with pytest.raises(ValueError, match="method 'svd' is not one of tucker, cp, tt"):
        bench.parse_plan("svd@0.5@cpu@1")
    with pytest.raises(ValueError, match="four @-separated parts"):
        bench.parse_plan("cp@16@cpu")
    with pytest.raises(ValueError, match="batch '0'"):
        bench.parse_plan("cp@16@cpu@0")


def test_plan_devices_are_checked(tmp_path: Path, capsys) -> None:
    bench = load_script("bench_compress")
    assert bench.parse_plan("cp@16@cuda@1")["device"] == "cuda"
    assert bench.parse_plan("cp@16@cuda:1@1")["device"] == "cuda:1"
    with pytest.raises(ValueError, match="device 'gpu' is not one of cpu, cuda or cuda:N"):
        bench.parse_plan("cp@16@gpu@1")
    out = tmp_path / "r.json"
    run = _run_dir(tmp_path)
    err = _usage_error(
        bench.main, ["--base", str(run), "--plans", "cp@16@gpu@1", "--out", str(out)], capsys
    )
    assert "device 'gpu' is not one of cpu, cuda or cuda:N" in err
    assert not out.exists()


def test_bench_compress_refuses_bad_bases_and_threads(tmp_path: Path, capsys) -> None:
    bench = load_script("bench_compress")
    out = str(tmp_path / "r.json")
    err = _usage_error(bench.main, ["--base", str(tmp_path / "nope"), "--out", out], capsys)
    assert "argument --base" in err and "does not exist" in err
    err = _usage_error(bench.main, ["--threads", "0", "--out", out], capsys)
    assert "argument --threads: must be an integer >= 1" in err


# --- model and run directories across the scripts ----------------------------------------------


def test_scripts_take_a_run_directory(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    prune = load_script("bench_channel_prune")
    args = prune.parse_args(["--model-dir", str(run)])
    assert args.model_dir == run / "model"
    model, shape, label = prune._base_model(args)
    assert shape == (1, 28, 28) and "lenet5" in label
    assert model(torch.zeros(1, *shape)).shape == (1, 10)
    qat = load_script("bench_qat")
    assert qat._args(["--model-dir", str(run), "--out", "x.json"]).model_dir == run / "model"


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("bench_decompose", ["--part", "curves", "--out", "o.json"]),
        ("bench_sparse", ["--out", "o.json"]),
        ("bench_quant", ["--out", "o.json"]),
        ("bench_ort_stem", ["--data", "d", "--out", "o.json"]),
    ],
)
def test_scripts_refuse_a_folder_without_a_model(
    tmp_path: Path, capsys, script: str, argv: list[str]
) -> None:
    (tmp_path / "empty").mkdir()
    main = load_script(script).main
    err = _usage_error(main, [*argv, "--model-dir", str(tmp_path / "empty")], capsys)
    assert "argument --model-dir" in err and "holds no slimtorch model" in err


def test_fused_tucker_refuses_a_folder_without_a_model(tmp_path: Path, capsys) -> None:
    run = _run_dir(tmp_path)
    main = load_script("bench_fused_tucker").main
    argv = ["--base", str(run), "--compressed", str(tmp_path / "nope"), "--data", "d"]
    err = _usage_error(main, [*argv, "--out", "o.json"], capsys)
    assert "argument --compressed" in err and "does not exist" in err


# --- argument checks that run before any work --------------------------------------------------


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("bench_foundation", ["--threads", "-1"], "argument --threads: must be an integer >= 1"),
        ("bench_fused_tucker", ["--base", "RUN", "--compressed", "RUN", "--data", "d",
                                "--threads", "0"], "argument --threads: must be an integer >= 1"),
        ("bench_decompose", ["--repeats", "0"], "argument --repeats: must be an integer >= 1"),
        ("bench_lowp", ["--batch", "0"], "argument --batch: must be an integer >= 1"),
        ("bench_lowp", ["--profile", "bogus"], "--profile 'bogus' is not a device profile"),
        ("bench_lowp", ["--rounds", "0"], "argument --rounds: must be an integer >= 1"),
        ("bench_sparse", ["--batches", "1,0"], "argument --batches: must be a comma-separated"),
        ("bench_quant", ["--model", "resnet20", "--threads", "0"], "argument --threads"),
        ("bench_ddp", ["--device", "cpu", "--threads", "0"], "argument --threads"),
    ],
)  # fmt: skip
def test_bad_arguments_fail_at_once(
    tmp_path: Path, capsys, script: str, argv: list[str], message: str
) -> None:
    out = tmp_path / "o.json"
    if "RUN" in argv:  # a real model directory
        run = str(_run_dir(tmp_path))
        argv = [run if a == "RUN" else a for a in argv]
    err = _usage_error(load_script(script).main, [*argv, "--out", str(out)], capsys)
    assert message in err
    assert not out.exists()


def test_channel_prune_refuses_negative_batches(capsys) -> None:
    prune = load_script("bench_channel_prune")
    err = _usage_error(prune.parse_args, ["--batches", "-1"], capsys)
    assert "argument --batches: must be a comma-separated list of integers >= 1" in err


def test_lowp_profile_is_checked_before_any_model_is_built(monkeypatch, capsys) -> None:
    lowp = load_script("bench_lowp")

    def built(*a, **k):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(lowp, "_bench_model", built)
    _usage_error(lowp.main, ["--profile", "bogus", "--out", "o.json"], capsys)
    assert lowp._args(["--profile", "rx580", "--out", "o.json"]).profile == "rx580"


# --- serving benchmark: the LitServe peer's command ----------------------------------------------


def test_litserve_peer_gets_the_batching_settings(tmp_path: Path, monkeypatch) -> None:
    bench = load_script("bench_serve/run_bench")
    args = argparse.Namespace(threads=2, peer_python="py", max_batch_size=8, delay_ms=2.5)
    cmd = bench.server_cmd("litserve", args, tmp_path, tmp_path / "m", "mlp", 8123)
    assert cmd[cmd.index("--max-batch-size") + 1] == "8"
    assert float(cmd[cmd.index("--batch-timeout") + 1]) == pytest.approx(0.0025)
    assert cmd[0] == "py" and cmd[1].endswith("peer_litserve.py")
    plain = bench.server_cmd("fastapi", args, tmp_path, tmp_path / "m", "mlp", 8123)
    assert "--max-batch-size" not in plain  # FastAPI runs one request at a time
    # the peer's own parser takes every option it is given (it stops at the missing litserve)
    peer = load_script("bench_serve/peer_litserve")
    monkeypatch.setattr(peer, "ls", None)
    assert peer.main(cmd[2:]) == 3


# --- load generator --------------------------------------------------------------------------


def test_loadgen_refuses_a_rate_of_zero(tmp_path: Path, capsys) -> None:
    loadgen = load_script("bench_serve/loadgen")
    body = tmp_path / "b.json"
    body.write_text("{}")
    argv = ["--url", "http://127.0.0.1:1/x", "--body", str(body)]
    for rate in ("0", "-5"):
        err = _usage_error(loadgen.main, [*argv, "--rate", rate], capsys)
        assert "--rate must be > 0" in err


def test_loadgen_open_loop_leaves_the_warmup_out(tmp_path: Path) -> None:
    loadgen = load_script("bench_serve/loadgen")

    async def serve() -> dict:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    size = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                                if ln.lower().startswith(b"content-length"))  # fmt: skip
                    await reader.readexactly(size)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await loadgen.open_loop(
                f"http://127.0.0.1:{port}/v2/models/m/infer", b"{}", 100.0, 0.5, warmup=0.5
            )

    res = asyncio.run(serve())
    assert res["warmup_s"] == 0.5
    # about 50 requests in the measured half second; with the warm-up counted, about 100
    assert 20 <= res["sent"] <= 80, res
    assert res["statuses"] == {"200": res["sent"]} and res["lost"] == 0


# --- bench_decompose --------------------------------------------------------------------------


def test_decompose_refuses_zero_repeats_before_any_work(tmp_path: Path, capsys) -> None:
    bench = load_script("bench_decompose")
    out = tmp_path / "d.json"
    err = _usage_error(bench.main, ["--part", "speed", "--repeats", "0", "--out", str(out)], capsys)
    assert "--repeats: must be an integer >= 1, got '0'" in err
    assert not out.exists()


# --- bench_foundation and render_benchmarks ----------------------------------------------------


def _doc(tmp_path: Path, names: list[str]) -> Path:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n" + "".join(
        f"<!-- BEGIN {n} -->\nold\n<!-- END {n} -->\n\n" for n in names))  # fmt: skip
    return doc


def test_foundation_accuracy_results_render(tmp_path: Path, monkeypatch, capsys) -> None:
    foundation = load_script("bench_foundation")

    def fake_train(**kw):
        return SimpleNamespace(test_metrics={"accuracy": 0.9}, train_seconds=12.0)

    monkeypatch.setattr(foundation, "train_classifier", fake_train)
    results = tmp_path / "results"
    results.mkdir()
    out = results / "acc.json"
    argv = ["--part", "accuracy", "--device", "cpu", "--quick", "--runs-dir", str(tmp_path)]
    assert foundation.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "resnet20" in printed and "90.00%" in printed and "{" not in printed  # a table
    saved = json.loads(out.read_text())
    command = "python scripts/bench_foundation.py " + " ".join([*argv, "--out", str(out)])
    assert saved["command"] == command
    assert [r["command"] for r in saved["accuracy"]] == [command, command]

    render = load_script("render_benchmarks")
    doc = _doc(tmp_path, ["acc"])
    assert render.main(["--doc", str(doc), "--results", str(results)]) == 0
    text = doc.read_text()
    assert "old" not in text and f"`{command}`" in text and "90.00%" in text


def test_foundation_roofline_estimates_on_the_named_profile(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    # it compared every GPU with the H100 profile; the GPU at hand's profile can now be named
    foundation = load_script("bench_foundation")
    timed = SimpleNamespace(median_s=1e-3, p10_s=1e-3, p90_s=1e-3)
    monkeypatch.setattr(foundation, "measure_latency", lambda *a, **k: timed)
    out = tmp_path / "roof.json"
    argv = ["--part", "roofline", "--device", "cpu", "--quick", "--profile", "rx580"]
    assert foundation.main([*argv, "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert {r["profile"] for r in saved["roofline"]} == {"rx580"}
    with pytest.raises(SystemExit):
        foundation.main(["--part", "roofline", "--profile", "rx9999", "--out", str(out)])
    assert "invalid choice: 'rx9999'" in capsys.readouterr().err


def test_render_names_the_file_and_key_it_lacks(tmp_path: Path, capsys) -> None:
    render = load_script("render_benchmarks")
    results = tmp_path / "results"
    results.mkdir()
    row = {"model": "lenet5", "dataset": "mnist", "epochs": 1, "batch_size": 128, "lr": 0.05,
           "amp": "auto", "test_accuracy": 0.9, "train_seconds": 3.0}  # fmt: skip
    (results / "acc.json").write_text(json.dumps({"accuracy": [row]}))
    doc = _doc(tmp_path, ["acc"])
    before = doc.read_text()
    for argv in ([], ["--check"]):
        assert render.main([*argv, "--doc", str(doc), "--results", str(results)]) == 2
        err = capsys.readouterr().err
        assert str(results / "acc.json") in err and "missing key 'command'" in err
    assert doc.read_text() == before
    (results / "acc.json").write_text("{not json")
    assert render.main(["--doc", str(doc), "--results", str(results)]) == 2
    assert "cannot read it as JSON" in capsys.readouterr().err


def test_render_check_reports_a_stale_document_without_writing(tmp_path: Path, capsys) -> None:
    render = load_script("render_benchmarks")
    results = tmp_path / "results"
    results.mkdir()
    rows = [{"batch_size": 128, "loader_images_per_s": 900.0, "synthetic_images_per_s": 1000.0,
             "loader_share_of_step": 0.1}]  # fmt: skip
    (results / "loader.json").write_text(json.dumps({"device": "cpu", "loader": rows}))
    doc = _doc(tmp_path, ["loader"])
    before = doc.read_text()
    argv = ["--doc", str(doc), "--results", str(results)]
    assert render.main(["--check", *argv]) == 1
    err = capsys.readouterr().err
    assert "out of date" in err and "-old" in err and "+| 128 | 900 | 1000 | 10.0% |" in err
    assert doc.read_text() == before  # --check writes nothing
    assert render.main(argv) == 0
    assert "| 128 | 900 | 1000 | 10.0% |" in doc.read_text()
    assert render.main(["--check", *argv]) == 0
    assert "up to date" in capsys.readouterr().out


def test_render_check_passes_on_the_repository_docs() -> None:
    assert load_script("render_benchmarks").main(["--check"]) == 0


# --- bench_ddp -------------------------------------------------------------------------------


def test_ddp_keeps_earlier_results_when_a_later_run_fails(tmp_path: Path, monkeypatch) -> None:
    bench = load_script("bench_ddp")
    calls = []

    def launch(world, train_args, **kw):
        calls.append(world)
        if len(calls) > 1:
            raise RuntimeError("the second run failed")
        return None, 1.0

    run = {"images_per_s": [10.0, 12.0], "images_per_s_median": 12.0, "test_accuracy": None,
           "ranks_consistent": None}  # fmt: skip
    monkeypatch.setattr(bench, "launch", launch)
    monkeypatch.setattr(bench, "read_run", lambda out: dict(run))
    out = tmp_path / "ddp.json"
    argv = ["--model", "mlp", "--dataset", "digits", "--device", "cpu", "--world-sizes", "1,2",
            "--per-rank-batches", "32", "--out", str(out)]  # fmt: skip
    with pytest.raises(RuntimeError, match="second run failed"):
        bench.main(argv)
    saved = json.loads(out.read_text())
    assert len(saved["throughput"]) == 1
    first = saved["throughput"][0]
    assert first["world_size"] == 1 and first["images_per_s_median"] == 12.0
    assert first["speedup"] == pytest.approx(1.0)


def test_bench_scale_quick_runs_and_agrees_with_the_earlier_methods(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    assert load_script("bench_scale").main(["--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["same"] for r in rows if r["same"] is not None] == [True] * 4
    assert all(r["new_s"] >= 0 for r in rows)
