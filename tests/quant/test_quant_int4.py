"""4-bit Q/DQ weights are saved two per byte and load back exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimtorch.models import create_model, load_model, save_model
from slimtorch.quant import LayerQParams, quantize_weight, to_qdq_
from slimtorch.quant.int4 import pack_int4, unpack_int4
from slimtorch.quant.qdq import PACKED_KEY

CARD = {
    "input_shape": (1, 28, 28),
    "mean": [0.5],
    "std": [0.5],
    "class_names": [str(i) for i in range(10)],
}


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_pack_round_trip_every_value(n: int) -> None:
    q = (torch.arange(n, dtype=torch.int16) % 16 - 8).to(torch.int8).reshape(1, n)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert torch.equal(unpack_int4(packed, q.shape), q)


def test_pack_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match=r"values in \[-8, 7\]"):
        pack_int4(torch.tensor([9], dtype=torch.int8))
    with pytest.raises(ValueError, match="int8 tensor"):
        pack_int4(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="does not match the layer"):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), (2, 4))


def test_four_bit_model_saves_half_the_bytes_and_reloads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=10, in_channels=1, input_size=28).eval()
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    qparams = {}
    for name in layers:
        w = model.get_submodule(name).weight
        qparams[name] = LayerQParams(weight_scale=quantize_weight(w, 4)[1], weight_bits=4)
    eight = {n: LayerQParams(weight_scale=quantize_weight(model.get_submodule(n).weight, 8)[1])
             for n in layers}  # fmt: skip
    m8 = create_model("lenet5", num_classes=10, in_channels=1, input_size=28).eval()
    m8.load_state_dict(model.state_dict())
    to_qdq_(m8, eight)
    to_qdq_(model, qparams)
    state = model.state_dict()
    packed = [k for k in state if k.endswith(PACKED_KEY)]
    assert len(packed) == len(layers) and not any(k.endswith("weight_int8") for k in state)
    bytes4 = sum(v.numel() * v.element_size() for v in state.values())
    bytes8 = sum(v.numel() * v.element_size() for v in m8.state_dict().values())
    assert bytes4 < 0.6 * bytes8

    x = torch.randn(3, 1, 28, 28)
    save_model(model, tmp_path / "m", **CARD)
    loaded, _ = load_model(tmp_path / "m")
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    file4 = (tmp_path / "m" / "model.safetensors").stat().st_size
    save_model(m8, tmp_path / "m8", **CARD)
    assert file4 < 0.6 * (tmp_path / "m8" / "model.safetensors").stat().st_size
