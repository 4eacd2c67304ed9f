"""check_options names every key a method takes, its own flags included."""

from __future__ import annotations

import pytest

from slimtorch.pipeline.methods import check_options


@pytest.mark.parametrize(
    ("method", "own"),
    [
        ("prune", ["gradual", "sparse_check"]),
        ("nm", ["sparse_check"]),
        ("ptq", ["runtime_check"]),
        ("qat", ["runtime_check", "widen_4bit_activations"]),
        ("mixed", ["runtime_check"]),
        ("fp16", ["check_batches", "fold_bn", "profile"]),
        ("direct-conv", ["compiled_check"]),
        ("conv-gemm", ["compiled_check", "direct_stem"]),
    ],
)
def test_unknown_option_lists_method_flags(method, own):
    with pytest.raises(ValueError, match=f"unknown {method} option") as info:
        check_options(method, {"no_such_key": 1})
    message = str(info.value)
    assert "no_such_key" in message
    for key in own:
        assert key in message.split("valid options:")[1]
    valid = {key: False for key in own if key not in ("profile", "check_batches")}
    check_options(method, {**valid, **({"size_ratio": 4} if method == "mixed" else {})})


def test_method_flags_must_be_booleans():
    with pytest.raises(TypeError, match="'direct_stem' must be true or false"):
        check_options("conv-gemm", {"direct_stem": "yes"})


@pytest.mark.parametrize(("method", "other"), [("fp16", "bf16"), ("bf16", "fp16")])
def test_cast_dtype_comes_from_method(method, other):
    with pytest.raises(ValueError, match=f"method {method} casts to {method}"):
        check_options(method, {"dtype": other})
    check_options(method, {"dtype": method})


def test_qat_with_4bit_activations_is_refused_before_the_fine_tune():
    # it trained the whole fine-tune, then failed in the conversion and wrote no model
    with pytest.raises(ValueError, match="act_bits=4 converts to int8 only with --set widen_4bit"):
        check_options("qat", {"act_bits": 4})
    check_options("qat", {"act_bits": 4, "widen_4bit_activations": True})
    check_options("qat", {"act_bits": 8})
