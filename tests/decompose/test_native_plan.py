"""The fused layer's prepared CPU kernel calls: packed once, rebuilt whenever a weight changes."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from fused_helpers import reference_of
from slimtorch.decompose import FusedTuckerConv2d, native
from slimtorch.decompose import fused_op as fo
from slimtorch.decompose.native_plan import MAX_PLANS, PlanCache

ATOL, RTOL = 1e-5, 1e-4

pytestmark = pytest.mark.skipif(
    not native.kernel_status().available, reason="the fused CPU kernel cannot be built here"
)


def _layer(relu: bool = True, residual: bool = True, stride: int = 1) -> FusedTuckerConv2d:
    torch.manual_seed(0)
    layer = FusedTuckerConv2d(
        8, 12, 3, ranks=(4, 6), padding=1, stride=stride, relu=relu, residual=residual
    ).eval()
    with torch.no_grad():
        layer.last.bias.uniform_(-0.5, 0.5)
    return layer


def _generic_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls that reach the generic (unplanned) kernel entry point."""
    calls: list[int] = []
    run = fo.run_kernel

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return run(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(fo, "run_kernel", counted)
    return calls


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(("relu", "residual"), [(False, False), (True, False), (True, True)])
def test_planned_calls_match_the_reference_at_several_sizes(
    monkeypatch: pytest.MonkeyPatch, stride: int, relu: bool, residual: bool
) -> None:
    generic = _generic_calls(monkeypatch)
    layer = _layer(relu, residual, stride)
    with torch.no_grad():
        for n, h, w in [(1, 7, 7), (3, 7, 7), (2, 9, 5), (1, 7, 7)]:
            x = torch.randn(n, 8, h, w)
            res = torch.randn(n, 12, -(-h // stride), -(-w // stride)) if residual else None
            got = layer(x, res) if residual else layer(x)
            torch.testing.assert_close(got, reference_of(layer, x, res), atol=ATOL, rtol=RTOL)
    assert len(layer._plans) == 2  # one plan per input size (7x7, 9x5), reused across batches
    assert not generic  # every call ran a plan


def test_a_changed_weight_is_never_run_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer()
    x, res = torch.randn(2, 8, 7, 7), torch.randn(2, 12, 7, 7)
    with torch.no_grad():
        layer(x, res)
        layer.core.weight.mul_(-1.5)  # in place: the version counter moves
        torch.testing.assert_close(layer(x, res), reference_of(layer, x, res), atol=ATOL, rtol=RTOL)
        layer.last.bias = nn.Parameter(torch.full((12,), 3.0))  # a new tensor
        torch.testing.assert_close(layer(x, res), reference_of(layer, x, res), atol=ATOL, rtol=RTOL)
        layer.first.weight.data = torch.randn_like(layer.first.weight)  # new memory, same object
        torch.testing.assert_close(layer(x, res), reference_of(layer, x, res), atol=ATOL, rtol=RTOL)
        state = {k: torch.randn_like(v) for k, v in layer.state_dict().items()}
        layer.load_state_dict(state)
        torch.testing.assert_close(layer(x, res), reference_of(layer, x, res), atol=ATOL, rtol=RTOL)
        # a change through .data bypasses the version counter: clear_plans makes it seen
        layer.core.weight.data.mul_(2.0)
        layer.clear_plans()
        torch.testing.assert_close(layer(x, res), reference_of(layer, x, res), atol=ATOL, rtol=RTOL)


def test_dtype_changes_leave_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(residual=False)
    x = torch.randn(1, 8, 7, 7)
    with torch.no_grad():
        layer(x)
        layer.double()  # same parameter objects and versions, new memory and dtype
        got = layer(x.double())
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, reference_of(layer, x.double(), None))


def test_copies_start_without_plans_and_agree() -> None:
    layer = _layer()
    x, res = torch.randn(2, 8, 7, 7), torch.randn(2, 12, 7, 7)
    with torch.no_grad():
        y = layer(x, res)
        twin = copy.deepcopy(layer)
        assert len(layer._plans) == 1 and len(twin._plans) == 0
        torch.testing.assert_close(twin(x, res), y)
        with torch.no_grad():
            twin.core.weight.zero_()
        torch.testing.assert_close(layer(x, res), y)  # the original's plan is its own
    assert isinstance(copy.copy(PlanCache()), PlanCache)


def test_bad_inputs_raise_as_on_the_generic_path() -> None:
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(1, 8, 7, 7), torch.randn(1, 12, 7, 7))  # a plan for 7x7 exists
        with pytest.raises(ValueError, match="expects input"):
            layer(torch.randn(1, 5, 7, 7), torch.randn(1, 12, 7, 7))  # wrong channel count
        with pytest.raises(ValueError, match="residual must have the output's shape"):
            layer(torch.randn(1, 8, 7, 7), torch.randn(1, 12, 6, 7))


def test_gradients_use_library_convolutions() -> None:
    layer = _layer()
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    y = layer(x, torch.randn(2, 12, 7, 7))
    y.sum().backward()
    assert x.grad is not None and len(layer._plans) == 0


def test_old_sizes_make_room_for_new_ones() -> None:
    layer = _layer(residual=False)
    with torch.no_grad():
        for h in range(3, 4 + MAX_PLANS):
            layer(torch.randn(1, 8, h, 5))
    assert len(layer._plans) == MAX_PLANS
    assert (3, 5) not in layer._plans._plans and (3 + MAX_PLANS, 5) in layer._plans._plans


def test_concurrent_calls_share_a_plan() -> None:
    layer = _layer()
    inputs = [(torch.randn(2, 8, 7, 7), torch.randn(2, 12, 7, 7)) for _ in range(4)]
    with torch.no_grad():
        expected = [reference_of(layer, x, r) for x, r in inputs]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with torch.no_grad():
                for _ in range(50):
                    x, r = inputs[i]
                    torch.testing.assert_close(layer(x, r), expected[i], atol=ATOL, rtol=RTOL)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(layer._plans) == 1


def test_weights_made_in_inference_mode_run_without_a_plan() -> None:
    with torch.inference_mode():  # inference tensors keep no version counter
        layer = _layer(residual=False)
        x = torch.randn(2, 8, 7, 7)
        y = layer(x)
        torch.testing.assert_close(y, reference_of(layer, x, None), atol=ATOL, rtol=RTOL)
        layer.core.weight.mul_(2.0)  # unseen by any version counter: must still be used
        torch.testing.assert_close(layer(x), reference_of(layer, x, None), atol=ATOL, rtol=RTOL)
    assert len(layer._plans) == 0


def test_planned_calls_return_float32_whatever_the_default_dtype() -> None:
    # the output buffer took the default dtype: under float64 the kernel's float32 values were
    # read as float64 garbage (off by about 1.2)
    layer, x = _layer(residual=False), torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        ref = layer(x)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            got = layer(x)
        finally:
            torch.set_default_dtype(old)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
