"""Tests of slimtorch.core.measure.roofline against hand-computed roofline times."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from slimtorch.core.measure import estimate_latency
from slimtorch.core.profiles import DeviceProfile, get_profile


def toy(**changes: object) -> DeviceProfile:
    fields: dict[str, object] = dict(
        name="toy",
        description="made-up device",
        peak_flops={"fp32": 1e12, "fp16": 2e12, "bf16": 2e12, "int8": 4e12},
        memory_bandwidth=1e11,
        memory_bytes=2**30,
        launch_overhead_s=1e-5,
    )
    fields.update(changes)
    return DeviceProfile(**fields)  # type: ignore[arg-type]


def test_single_linear_by_hand() -> None:
    est = estimate_latency(nn.Linear(100, 10), torch.randn(4, 100), toy())
    (row,) = est.rows
    # aten.addmm is one kernel (the weight transpose is a free view): 2*4*100*10 FLOPs, bias not
    # counted; bytes = (bias 10 + x 400 + W 1000 + out 40) fp32 values * 4
    assert (row.flops, row.bytes, row.kernels) == (8000, 5800, 1)
    assert row.compute_s == pytest.approx(8000 / 1e12)
    assert row.memory_s == pytest.approx(5800 / 1e11)
    assert row.bound == "memory"
    assert row.overhead_s == pytest.approx(1e-5)
    assert est.total_s == pytest.approx(5.8e-8 + 1e-5)


def test_compute_bound_when_bandwidth_is_huge() -> None:
    est = estimate_latency(nn.Linear(100, 10), torch.randn(4, 100), toy(memory_bandwidth=1e15))
    assert est.rows[0].bound == "compute"
    assert est.total_s == pytest.approx(8e-9 + 1e-5)


def test_fp16_estimate_halves_bytes_and_uses_fp16_rate() -> None:
    est = estimate_latency(
        nn.Linear(100, 10), torch.randn(4, 100), toy(memory_bandwidth=1e15), dtype=torch.float16
    )
    (row,) = est.rows
    assert row.bytes == 2900
    assert row.compute_s == pytest.approx(8000 / 2e12)
    assert est.dtype == "float16"


def test_rx580_fp16_saves_memory_time_not_compute_time() -> None:
    model, x = nn.Conv2d(16, 16, 3, padding=1), torch.randn(1, 16, 32, 32)
    fp32 = estimate_latency(model, x, "rx580")
    fp16 = estimate_latency(model, x, "rx580", dtype=torch.float16)
    assert fp16.rows[0].compute_s == pytest.approx(fp32.rows[0].compute_s)
    assert fp16.rows[0].memory_s == pytest.approx(fp32.rows[0].memory_s / 2)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x


def test_residual_add_in_forward_is_counted() -> None:
    est = estimate_latency(Residual(), torch.randn(8, 16), toy())
    rows = {r.name: r for r in est.rows}
    assert set(rows) == {"", "fc"}
    # fc: addmm 2*8*16*16 FLOPs; (bias 16 + x 128 + W 256 + out 128) * 4 bytes
    assert (rows["fc"].flops, rows["fc"].bytes) == (4096, 2112)
    # the add in forward(): 128 FLOPs, reads two 128-element tensors and writes one
    assert (rows[""].flops, rows[""].bytes, rows[""].kernels) == (128, 1536, 1)
    assert est.total_s == pytest.approx(2112 / 1e11 + 1536 / 1e11 + 2 * 1e-5)


def test_broadcast_input_read_once() -> None:
    class AddBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Parameter(torch.zeros(1, 16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.b.expand(8, 16)  # stride-0 rows: 16 distinct values

    (row,) = estimate_latency(AddBias(), torch.randn(8, 16), toy()).rows
    assert row.bytes == (128 + 16 + 128) * 4


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.act(self.bn(self.conv(x)))))


def test_every_op_is_a_kernel_and_totals_add_up() -> None:
    est = estimate_latency(SmallCNN(), torch.randn(2, 3, 16, 16), "rx580")
    rows = {r.name: r for r in est.rows}
    # conv, batch norm, relu_, max pool, addmm; Flatten is a view: no kernel, no row
    assert {n: r.kernels for n, r in rows.items()} == {
        "conv": 1,
        "bn": 1,
        "act": 1,
        "pool": 1,
        "head.1": 1,
    }
    assert est.kernels == 5
    assert est.total_s == pytest.approx(sum(r.total_s for r in est.rows))
    for r in est.rows:
        assert r.total_s == pytest.approx(max(r.compute_s, r.memory_s) + r.overhead_s)
    # in-place relu reads and writes 2*8*16*16 fp32 values
    assert rows["act"].bytes == 2 * 2 * 8 * 16 * 16 * 4
    assert json.loads(json.dumps(est.to_dict()))["kernels"] == 5
    assert "head.1" in est.to_table()


def test_faster_profile_is_never_slower() -> None:
    model, x = SmallCNN(), torch.randn(2, 3, 16, 16)
    slow = toy()
    fast = toy(
        peak_flops={"fp32": 2e12, "fp16": 4e12, "bf16": 4e12, "int8": 8e12},
        memory_bandwidth=3e11,
        launch_overhead_s=5e-6,
    )
    a, b = estimate_latency(model, x, slow), estimate_latency(model, x, fast)
    assert b.total_s < a.total_s
    for ra, rb in zip(a.rows, b.rows, strict=True):
        assert rb.total_s <= ra.total_s
    assert (
        estimate_latency(model, x, "h100-sxm").total_s < estimate_latency(model, x, "rx580").total_s
    )


def test_restores_mode_and_checks_arguments() -> None:
    model = SmallCNN().train()
    estimate_latency(model, torch.randn(1, 3, 16, 16), get_profile("rx580"))
    assert model.training and model.bn.training
    with pytest.raises(ValueError, match="unknown device profile 'nope'"):
        estimate_latency(model, torch.randn(1, 3, 16, 16), "nope")
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype"):
        estimate_latency(model, torch.randn(1, 3, 16, 16), "rx580", dtype="fp16")  # type: ignore[arg-type]


def test_int8_layers_are_priced_as_one_int8_kernel() -> None:
    import copy

    from slimtorch.models import create_model
    from slimtorch.quant import PTQConfig, quantize_

    torch.manual_seed(0)
    fp32 = create_model("lenet5", in_channels=1, input_size=28).eval()
    calib = [torch.randn(16, 1, 28, 28) for _ in range(2)]
    int8 = copy.deepcopy(fp32)
    quantize_(int8, PTQConfig(mode="static"), calibration=calib)
    weight_only = copy.deepcopy(fp32)
    quantize_(weight_only, PTQConfig(mode="weight_only"), calibration=calib)
    x = torch.randn(4096, 1, 28, 28)
    f, q = (estimate_latency(m, x, "h100-sxm") for m in (fp32, int8))
    fr, qr = ({r.name: r for r in e.rows} for e in (f, q))
    for name in ("features.3", "fc1"):
        assert qr[name].kernels == fr[name].kernels == 1  # the Q/DQ steps fused away
        assert qr[name].flops == fr[name].flops
        # input and weights at one byte per element instead of four; these outputs stay float
        layer = int8.get_submodule(name)
        assert layer.roofline_kernel == ("int8" if layer.output_scale is not None else "int8>fp32")
        assert qr[name].bytes < fr[name].bytes
        assert qr[name].compute_s < fr[name].compute_s  # H100: int8 at twice the fp16 rate
    assert q.total_s < f.total_s
    # the RX 580 has no int8 dot product: same compute time, fewer bytes
    f580, q580 = (estimate_latency(m, x, "rx580") for m in (fp32, int8))
    r580 = {r.name: r for r in q580.rows}["features.3"]
    assert r580.compute_s == pytest.approx({r.name: r for r in f580.rows}["features.3"].compute_s)
    # weight-only int8 runs a float kernel on dequantized weights: priced as it runs
    w = {r.name: r for r in estimate_latency(weight_only, x, "h100-sxm").rows}
    assert w["fc1"].kernels > 1


def test_int8_outputs_in_float_and_dynamic_inputs_are_priced_as_they_run() -> None:
    # every tensor of an int8 layer was priced at one byte, its float output too, and a
    # dynamic layer's quantize pass over its float input was left out: dynamic int8 read 0.98x
    # of the fp32 time on the RX 580, which has no int8 dot product to gain from
    import copy

    from slimtorch.models import create_model
    from slimtorch.quant import PTQConfig, quantize_

    torch.manual_seed(0)
    fp32 = create_model("mlp", in_channels=1, input_size=28).eval()
    dynamic = copy.deepcopy(fp32)
    quantize_(dynamic, PTQConfig(mode="dynamic"))
    x = torch.randn(4096, 1, 28, 28)
    f, d = (estimate_latency(m, x, "rx580") for m in (fp32, dynamic))
    assert d.total_s > f.total_s
    fr, dr = ({r.name: r for r in e.rows} for e in (f, d))
    layer = dynamic.get_submodule("features.1")
    assert layer.roofline_kernel == "int8-dynamic>fp32"
    n_in = 4096 * 784
    out = fr["features.1"].bytes - 4 * (n_in + 784 * 256 + 256)  # the float output's bytes
    assert out == 4 * 4096 * 256
    # int8 input, weights and bias, the float output, and the quantize pass (2 reads, 1 write)
    assert dr["features.1"].bytes == n_in + 784 * 256 + 256 + out + 9 * n_in
    assert dr["features.1"].kernels == 2


def test_a_batch_that_cannot_fit_the_profiles_memory_is_flagged() -> None:
    # vgg11-bn at batch 65536 needs a 17 GB activation on an 8 GB card; the estimate gave a
    # plain time and said nothing
    from slimtorch.models import create_model

    with torch.device("meta"):
        model = create_model("vgg11-bn", in_channels=3, input_size=32).eval()
        x = torch.randn(65536, 3, 32, 32)
    big = estimate_latency(model, x, "rx580")
    assert not big.fits and big.memory_bytes == 8 * 2**30
    assert big.memory_needed_bytes >= 65536 * 64 * 32 * 32 * 4 * 2  # the first BN's in and out
    note = big.fit_note()
    assert note is not None and note.startswith("does not fit rx580: needs at least 34.36 GB")
    assert note in big.to_table() and big.to_dict()["fits"] is False
    small = estimate_latency(model, x[:256], "rx580")
    assert small.fits and small.fit_note() is None
    # the weights count: 1e9 float32 parameters need 4 GB before any activation
    lin = estimate_latency(nn.Linear(50_000, 20_000, device="meta"),
                           torch.randn(1, 50_000, device="meta"), "rx580")  # fmt: skip
    assert lin.memory_needed_bytes >= 4 * 50_000 * 20_000
    assert (
        lin.fits
        and not estimate_latency(
            nn.Linear(50_000, 50_000, device="meta"), torch.randn(1, 50_000, device="meta"), "rx580"
        ).fits
    )


def test_float64_matmuls_are_timed_at_the_profiles_fp64_rate() -> None:
    # profiles held no fp64 rate, so a float64 model was timed at the fp32 rate: the RX 580
    # runs fp64 at 1/16 of it
    model = nn.Linear(2048, 2048).double()
    x = torch.randn(4096, 2048, dtype=torch.float64)
    rx580 = get_profile("rx580")
    assert rx580.peak_rate(torch.float64) == pytest.approx(
        rx580.peak_rate(torch.float32) / 16, rel=0.01
    )
    est = estimate_latency(model, x, "rx580")
    row = est.rows[0]
    assert row.compute_s == pytest.approx(2 * 4096 * 2048 * 2048 / 0.386e12)
    assert row.bound == "compute"
    # a profile without an fp64 rate keeps the fp32 one
    toy = DeviceProfile(name="toy-fp64", description="", memory_bytes=2**30,
                        peak_flops={"fp32": 1e12, "fp16": 1e12, "bf16": 1e12, "int8": 1e12},
                        memory_bandwidth=1e11)  # fmt: skip
    assert toy.peak_rate(torch.float64) == toy.peak_rate("fp64") == 1e12
