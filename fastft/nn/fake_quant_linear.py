"""FakeQuantLinear: a linear layer for quantization-aware training (torchao's numerics, fastft's one-pass kernels)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastft.fake_quant import fake_quantize, fake_quantize_with_scale, initial_scales
from fastft.ops import qat as qat_ops


class FakeQuantLinear(nn.Linear):
    """y = fq_a(x) @ fq_w(W)^T + b, fq_w: symmetric per-group fake quantization of the weight (weight_bits,
    group_size), fq_a: optional asymmetric per-token fake quantization of the input (activation_bits).

    The matmul is fastft::fake_quant_linear: backward keeps x and W, not their fake-quantized copies (on CUDA
    the fake quantization happens inside the GEMM tiles). When the weight does not require grad (QAT with LoRA or
    other adapters on a frozen base), its fake-quantized form is computed once and reused until the weight changes
    (tracked by its version counter and identity), instead of being recomputed every step. Parameters and state_dict
    keys are nn.Linear's, plus `weight_scale` ((out_features, in_features // group_size), fp32) with
    learn_scales=True: learned per-group scales (LSQ / torchao range learning), initialized from the weight.
    NaN and infinities propagate as in torchao's FakeQuantizedLinear: a NaN weight makes its group of the
    fake-quantized weight NaN, so its output column; a NaN in x makes its row of the output NaN.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, weight_bits: int = 4,
                 group_size: int = 32, activation_bits: Optional[int] = None, learn_scales: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if in_features % group_size:
            raise ValueError(f"in_features ({in_features}) must be a multiple of group_size ({group_size})")
        self.weight_bits, self.group_size, self.activation_bits = weight_bits, group_size, activation_bits
        self._cache: Optional[tuple] = None  # (weight storage pointer, version, fake-quantized weight)
        self.weight_scale = (nn.Parameter(initial_scales(self.weight, weight_bits, group_size)) if learn_scales
                             else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_bits: int = 4, group_size: int = 32,
                    activation_bits: Optional[int] = None, learn_scales: bool = False) -> FakeQuantLinear:
        """A FakeQuantLinear sharing `linear`'s parameters (no copy)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        if linear.in_features % group_size:
            raise ValueError(f"in_features ({linear.in_features}) must be a multiple of group_size ({group_size})")
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.weight_bits, layer.group_size, layer.activation_bits = weight_bits, group_size, activation_bits
        layer._cache = None
        layer.weight_scale = (nn.Parameter(initial_scales(linear.weight, weight_bits, group_size)) if learn_scales
                              else None)
        return layer

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this layer's parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def fake_quantized_weight(self) -> Tensor:
        weight = self.weight
        if self.weight_scale is not None:
            return fake_quantize_with_scale(weight, self.weight_scale, self.weight_bits, self.group_size)
        if weight.requires_grad and torch.is_grad_enabled():
            self._cache = None
            return fake_quantize(weight, self.weight_bits, self.group_size)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, fake_quantize(weight, self.weight_bits, self.group_size))
        return self._cache[1]

    def forward(self, x: Tensor) -> Tensor:
        if self.weight_scale is not None:  # learned scales: their gradient comes from fake_quantize_with_scale
            if self.activation_bits is not None:
                x = fake_quantize(x, self.activation_bits, granularity="per_token", symmetric=False)
            return F.linear(x, self.fake_quantized_weight(), self.bias)
        trainable = self.weight.requires_grad and torch.is_grad_enabled()
        weight = self.weight if trainable else self.fake_quantized_weight()
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.dtype != weight.dtype:
            raise TypeError(f"x must have the weight's dtype ({weight.dtype}), got {x.dtype}")
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y = qat_ops.fake_quant_linear(rows, weight, self.bias, self.weight_bits, self.group_size,
                                      self.activation_bits or 0, trainable)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight_bits={self.weight_bits}, group_size={self.group_size}, "
                f"activation_bits={self.activation_bits}")


class QuantizedLinear(nn.Module):
    """The deployed form of a FakeQuantLinear: integer weight codes and per-group fp32 scales (symmetric, zero point
    0), dequantized to the original weight dtype for the matmul, so its outputs equal the fake-quantized layer's.

    Storage: `weight_codes` uint8 (out_features, in_features // 2) with two 4-bit codes per byte (q + 8, the even
    column in the high nibble) when weight_bits <= 4, else int8 (out_features, in_features); `weight_scales` fp32
    (out_features, in_features // group_size). This is fastft's own layout; torchao's Int4WeightOnlyConfig uses
    asymmetric scales with float zero points and tinygemm packing, so it does not load these weights as they are.
    Activations keep their per-token fake quantization when the layer had one (as torchao's convert does).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, weight_bits: int = 4,
                 group_size: int = 32, activation_bits: Optional[int] = None, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits, self.group_size, self.activation_bits = weight_bits, group_size, activation_bits
        self.dtype = dtype or torch.float32
        packed = weight_bits <= 4
        codes_shape = (out_features, in_features // 2) if packed else (out_features, in_features)
        self.register_buffer("weight_codes", torch.zeros(codes_shape, dtype=torch.uint8 if packed else torch.int8,
                                                         device=device))
        self.register_buffer("weight_scales", torch.ones(out_features, in_features // group_size,
                                                         dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.dtype, device=device)) if bias else None

    @classmethod
    def from_fake_quant(cls, layer: FakeQuantLinear) -> QuantizedLinear:
        weight = layer.weight.detach()
        out = cls(layer.in_features, layer.out_features, layer.bias is not None, weight_bits=layer.weight_bits,
                  group_size=layer.group_size, activation_bits=layer.activation_bits, dtype=weight.dtype,
                  device=weight.device)
        qmin, qmax = qat_ops.qrange(layer.weight_bits)
        if layer.weight_scale is not None:
            scale = layer.weight_scale.detach().reshape(-1, 1)
        else:
            scale, _ = qat_ops.qparams(weight, layer.weight_bits, layer.group_size, True)
        groups = weight.reshape(-1, layer.group_size)
        q = torch.clamp(torch.round(groups * (1.0 / scale)), qmin, qmax).reshape(weight.shape).to(torch.int16)
        if layer.weight_bits <= 4:
            nibbles = (q + 8).to(torch.uint8)
            out.weight_codes.copy_((nibbles[:, 0::2] << 4) | nibbles[:, 1::2])
        else:
            out.weight_codes.copy_(q.to(torch.int8))
        out.weight_scales.copy_(scale.reshape(layer.out_features, -1))
        if layer.bias is not None:
            out.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        return out

    def codes(self) -> Tensor:
        """The integer codes as int16 (out_features, in_features)."""
        if self.weight_bits > 4:
            return self.weight_codes.to(torch.int16)
        high = (self.weight_codes >> 4).to(torch.int16) - 8
        low = (self.weight_codes & 0xF).to(torch.int16) - 8
        return torch.stack((high, low), dim=-1).reshape(self.out_features, self.in_features)

    def weight(self) -> Tensor:
        groups = self.codes().reshape(-1, self.group_size).to(self.dtype)
        return (groups * self.weight_scales.reshape(-1, 1)).reshape(self.out_features, self.in_features).to(
            self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.activation_bits is not None:
            x = fake_quantize(x, self.activation_bits, granularity="per_token", symmetric=False)
        return F.linear(x, self.weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight_bits={self.weight_bits}, "
                f"group_size={self.group_size}, activation_bits={self.activation_bits}")
