"""torchao interop: `patch_torchao` (run by `fastft.patch`) makes a torchao-prepared model's FakeQuantizedLinears use
fastft's fake quantization kernels. fastft's own QAT recipe (prepare / convert) is fastft/methods/qat.py."""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastft.fake_quant import fake_quantize, fake_quantize_with_scale
from fastft.integrations.class_swap import original_class, swap_class

_BITS = {getattr(torch, f"int{bits}"): bits for bits in range(2, 9)}


def _config_reason(quantizer, weight: bool) -> Optional[str]:
    """Why fastft cannot run this torchao fake quantizer exactly (None: it can)."""
    from torchao.quantization.granularity import PerAxis, PerGroup, PerToken
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
    from torchao.quantization.quant_primitives import MappingType, ZeroPointDomain

    if not isinstance(quantizer, IntxFakeQuantizer):
        return f"{type(quantizer).__name__} is not an IntxFakeQuantizer"
    config = quantizer.config
    if config.dtype not in _BITS:
        return f"dtype {config.dtype} is not a signed 2..8-bit integer"
    if config.scale_precision != torch.float32 or config.zero_point_domain != ZeroPointDomain.INT:
        return "only fp32 scales with integer-domain zero points are fused"
    symmetric = config.mapping_type == MappingType.SYMMETRIC
    if not weight:
        if not (isinstance(config.granularity, PerToken) and not symmetric and config.is_dynamic):
            return "activations: only dynamic asymmetric per-token fake quantization is fused"
        return None
    if not isinstance(config.granularity, (PerGroup, PerAxis)):
        return "weights: only per-group / per-channel fake quantization is fused"
    if config.is_dynamic and not symmetric:
        return ("weights: dynamic asymmetric per-group / per-channel: torchao's IntxFakeQuantizer uses "
                "unsigned-range qparams in a signed range here (see fastft/reference/qat.py); kept on torchao's "
                "path so training is unchanged")
    return None


def _fake_quantize_as(quantizer, x):
    """x fake-quantized as `quantizer` does: dynamic qparams computed by fastft's kernels (torchao's formulas), or
    static / learned ones (range learning) taken from the quantizer, which computes them on its first call."""
    from torchao.quantization.granularity import PerGroup, PerToken

    if not quantizer.enabled:
        return x
    config = quantizer.config
    granularity = config.granularity
    bits = _BITS[config.dtype]
    group_size = granularity.group_size if isinstance(granularity, PerGroup) else x.shape[-1]
    if not config.is_dynamic:
        if quantizer.scale is None:  # torchao's first call sets the qparams (and checks range learning's setup)
            return quantizer(x)
        zero_point = None if config.is_symmetric else quantizer.zero_point
        if zero_point is not None and zero_point.dtype != torch.float32:
            zero_point = zero_point.to(torch.float32)  # static integer zero points: exact in fp32
        return fake_quantize_with_scale(x, quantizer.scale, bits, group_size, zero_point=zero_point)
    if isinstance(granularity, PerToken):
        return fake_quantize(x, bits, granularity="per_token", symmetric=False, eps=config.eps)
    if isinstance(granularity, PerGroup):
        return fake_quantize(x, bits, group_size, eps=config.eps)
    return fake_quantize(x, bits, granularity="per_channel", eps=config.eps)


def _fused_forward(self, x):
    if self.activation_fake_quantizer is not None:
        x = _fake_quantize_as(self.activation_fake_quantizer, x)
    return F.linear(x, _fake_quantize_as(self.weight_fake_quantizer, self.weight), self.bias)


def patch_torchao(model: nn.Module, report) -> None:
    """Swap the class of torchao's FakeQuantizedLinear instances (from torchao's QAT prepare) for a subclass whose
    forward runs fastft's fake quantization (bit-exact with torchao's; with static or learned qparams, range
    learning, the quantizer's own scale and zero point parameters are used and get their gradients), recording
    what was and was not swapped in `report` (a PatchReport)."""
    if "torchao" not in sys.modules:  # a model cannot hold torchao modules unless torchao was imported
        return
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    for name, module in model.named_modules():
        if original_class(module) is FakeQuantizedLinear:
            report.fused["torchao.FakeQuantizedLinear"] += 1
            continue
        if type(module) is not FakeQuantizedLinear:
            continue
        reason = _config_reason(module.weight_fake_quantizer, weight=True)
        if reason is None and module.activation_fake_quantizer is not None:
            reason = _config_reason(module.activation_fake_quantizer, weight=False)
        if reason is not None:
            report.unfused[name] = reason
            continue
        swap_class(module, _fused_forward, "fastft's one-pass fake quantization kernels")
        report.fused["torchao.FakeQuantizedLinear"] += 1

