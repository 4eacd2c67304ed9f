"""Conversion of a trained LSQ model into int8 Q/DQ layers: the same runtime path as PTQ.

The learned per-channel weight steps become the weight scales and the learned activation steps
the input scales of :func:`slimtorch.quant.to_qdq_` (integer-arithmetic inference as in Jacob et
al. 2018, arXiv:1712.05877). Quantizing a weight ``w`` with scale ``s`` in the Q/DQ layer is the
same ``clamp(round(w / s), -2^(b-1), 2^(b-1) - 1) * s`` the LSQ layer computed, so outputs agree
up to float rounding (which can flip an occasional activation level in deep networks).

Example:
    >>> from slimtorch.models import create_model
    >>> model = create_model("lenet5", in_channels=1, input_size=28)
    >>> _ = prepare_qat_(model, QATConfig())
    >>> _ = model(torch.randn(8, 1, 28, 28))  # as training would: sets the activation steps
    >>> report = convert_qat_(model)
    >>> {r.mode for r in report.rows}
    {'static'}
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimtorch.core.errors import SlimtorchError
from slimtorch.quant.fold import FoldReport, find_conv_bn_pairs, fold_bn_
from slimtorch.quant.qat import TRANSFORM_NAME, qat_layers

if TYPE_CHECKING:
    from slimtorch.quant.convert import QuantReport

logger = logging.getLogger(__name__)


def qat_qparams(model: nn.Module) -> dict[str, Any]:
    """:class:`~slimtorch.quant.qdq.LayerQParams` of every LSQ layer, from its learned steps.

    Raises:
        SlimtorchError: An activation quantizer never saw data (run a batch first) or a step
            is not finite and positive.

    Example:
        >>> from slimtorch.models import create_model
        >>> model = create_model("lenet5", in_channels=1, input_size=28)
        >>> _ = prepare_qat_(model, QATConfig(weight_bits=4))
        >>> _ = model(torch.randn(8, 1, 28, 28))  # one batch sets the activation steps
        >>> qp = qat_qparams(model)
        >>> qp["features.0"].input_zero_point, qp["fc1"].input_zero_point  # signed, unsigned
        (128, 0)
        >>> qp["features.0"].input_dtype, qp["fc1"].weight_bits
        ('uint8', 4)
    """
    from slimtorch.quant.qdq import LayerQParams

    out: dict[str, Any] = {}
    for name, layer in qat_layers(model).items():
        w_step = layer.weight_quant.scale().detach().float().cpu()
        if not bool(torch.isfinite(w_step).all()):
            raise SlimtorchError(
                f"{name}: learned weight steps hold NaN/Inf; training diverged: lower the "
                "learning rate and train again"
            )
        aq = layer.input_quant
        in_scale = None
        in_zero_point = 0
        if aq is not None:
            if not bool(aq.initialized):
                raise SlimtorchError(
                    f"{name}: the activation quantizer never saw data, so its step is unset; "
                    "run at least one batch through the model (train or eval) before converting"
                )
            in_scale = float(aq.scale().detach())
            if not torch.isfinite(torch.tensor(in_scale)):
                raise SlimtorchError(f"{name}: learned activation step is not finite")
            # a signed input's int8 grid [-128, 127] * s is exactly uint8 [0, 255] with zero
            # point 128: the form oneDNN's int8 convolutions take (inductor refuses int8
            # inputs) and ONNX Runtime's faster u8s8 kernels run
            in_zero_point = 128 if bool(aq.signed) else 0
        out[name] = LayerQParams(
            weight_scale=w_step,
            weight_bits=layer.weight_quant.bits,
            input_scale=in_scale,
            input_zero_point=in_zero_point,
            input_dtype="uint8",
        )
    return out


def _fold_remaining_bn(model: nn.Module, qparams: dict[str, Any]) -> FoldReport | None:
    """Fold batch norms still in ``model``; rescale the folded convs' weight scales to match."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    try:
        pairs = find_conv_bn_pairs(model)
    except TypeError as exc:  # untraceable: the batch norms stay float ops after the int8 convs,
        # which computes what the fake-quant model computed (it trained them unfolded)
        logger.warning("convert_qat_: batch norms left unfolded: %s", exc)
        return FoldReport(rows=[], reason=f"batch norms left unfolded: {exc}")
    factors: dict[str, torch.Tensor] = {}
    for conv_name, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        assert isinstance(bn, nn.BatchNorm2d)
        if bn.running_var is None:
            continue
        gamma = torch.ones_like(bn.running_var) if bn.weight is None else bn.weight.detach()
        factors[conv_name] = (gamma / torch.sqrt(bn.running_var + bn.eps)).abs().float().cpu()
    fold = fold_bn_(model)
    for row in fold.folded:
        if row.conv in qparams:
            qp = qparams[row.conv]
            qp.weight_scale = (qp.weight_scale * factors[row.conv]).clamp_min(1e-12)
    return fold


def convert_qat_(model: nn.Module, *, widen_4bit_activations: bool = False) -> QuantReport:
    """Convert a QAT model's LSQ layers into int8 Q/DQ layers (the PTQ runtime path), in place.

    Weight scales are the learned per-channel weight steps, input scales the learned
    activation steps (``uint8`` inputs, zero point 0 for unsigned and 128 for signed ones: the
    same grid as signed int8, in the form both int8 runtimes take). The
    converted layers compute what the fake-quant layers computed, up to float rounding. Batch
    norms left by ``fold_bn=False`` (or by a model torch.fx cannot trace) are folded first where
    the model can be traced, and otherwise stay float ops after the int8 convolutions, as they
    ran in training (recorded in ``report.info["fold_bn"]``). The model is unchanged when
    anything fails.

    4-bit activations have no Q/DQ runtime form (its inputs are 8-bit): converting them is
    refused unless ``widen_4bit_activations=True``, which keeps the learned step on an 8-bit
    grid (values beyond the 4-bit range are no longer clipped, so outputs drift; a warning
    says so).

    Args:
        model: A model prepared with :func:`prepare_qat_` (and trained), changed in place.
        widen_4bit_activations: Accept 4-bit activation quantizers (see above).

    Returns:
        The :class:`~slimtorch.quant.convert.QuantReport` of :func:`~slimtorch.quant.to_qdq_`,
        with ``method="qat"``.

    Raises:
        ValueError: The model has no LSQ layers, or has 4-bit activations without
            ``widen_4bit_activations``.
        SlimtorchError: A quantizer is uninitialised or a learned step is not finite.

    Example:
        >>> from slimtorch.models import create_model
        >>> model = create_model("lenet5", in_channels=1, input_size=28)
        >>> _ = prepare_qat_(model, QATConfig())
        >>> x = torch.randn(8, 1, 28, 28)
        >>> fake_quant = model.eval()(x)  # (after training) the LSQ model's outputs
        >>> report = convert_qat_(model)
        >>> {r.mode for r in report.rows}, type(model.fc1).__name__
        ({'static'}, 'QDQLinear')
        >>> torch.allclose(model(x), fake_quant, atol=1e-4)
        True
    """
    from slimtorch.quant.convert import to_qdq_

    if not qat_layers(model):
        raise ValueError(
            "the model has no LSQ fake-quant layers; prepare_qat_ and train it first (or use "
            "post-training quantization for a float model)"
        )
    work = copy.deepcopy(model)
    layers = qat_layers(work)
    qparams = qat_qparams(work)
    narrow = [n for n, m in layers.items() if m.input_quant is not None and m.input_quant.bits < 8]
    if narrow and not widen_4bit_activations:
        raise ValueError(
            f"{len(narrow)} layer(s) ({', '.join(narrow[:4])}...) quantize inputs to 4 bits, "
            "which the int8 Q/DQ runtime cannot represent; train with act_bits=8 for a "
            "deployable model, or pass widen_4bit_activations=True to accept an 8-bit grid"
        )
    if narrow:
        warnings.warn(
            "4-bit activations convert to 8-bit Q/DQ inputs with the learned step: values "
            "beyond the 4-bit range are no longer clipped, so outputs may differ slightly",
            stacklevel=2,
        )
    for name, layer in layers.items():
        work.set_submodule(name, layer.to_float().train(layer.training))
    arch = getattr(work, "slimtorch_arch", None)
    if isinstance(arch, dict):
        kept = [t for t in arch.get("transforms", []) if t.get("name") != TRANSFORM_NAME]
        arch["transforms"] = kept
    fold = _fold_remaining_bn(work, qparams)
    report = to_qdq_(work, qparams, method="qat")
    if fold is not None:
        report.info["fold_bn"] = fold.to_dict()
    model.__dict__.update(work.__dict__)  # commit: the model now is the converted copy
    return report
