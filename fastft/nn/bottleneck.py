"""BottleneckAdapter: out = residual + scale * up(act(down(norm?(h)))) on the fused bottleneck op."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from fastft.ops import bottleneck as bottleneck_ops
from fastft.ops.bottleneck import check_activation

INITS = ("near_identity", "default")


class BottleneckAdapter(nn.Module):
    """A bottleneck adapter over the last dim of h (..., hidden_size): h + scale * up(act(down(norm(h)))).

    down: nn.Linear(hidden_size, bottleneck_size), up: nn.Linear(bottleneck_size, hidden_size), norm: an optional
    nn.LayerNorm(hidden_size) before down. bottleneck_size defaults to hidden_size // reduction_factor.
    init="near_identity" draws down from N(0, 0.01^2) (Houlsby); "default" keeps nn.Linear's init for down. Either
    way up's weight and bias start at zero, so a new adapter returns h unchanged.
    forward(h, residual=None): with `residual` (a parallel adapter) the result is residual + scale * branch(h).
    Parameters may have another dtype than h (e.g. fp32 adapters on a bf16 model): the branch runs in the
    parameters' dtype and is added in h's (or residual's) dtype. h and residual must be floating tensors
    (TypeError otherwise) on the parameters' device (ValueError naming both devices otherwise).
    Saved for backward: see fastft.ops.bottleneck.
    """

    def __init__(self, hidden_size: int, reduction_factor: Optional[int] = 16, bottleneck_size: Optional[int] = None,
                 activation: str = "relu", init: str = "near_identity", layer_norm: bool = False,
                 scale: float = 1.0, bias: bool = True, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if bottleneck_size is None:
            if not isinstance(reduction_factor, int) or not 0 < reduction_factor <= hidden_size:
                raise ValueError(f"reduction_factor must be an int in [1, hidden_size={hidden_size}], "
                                 f"got {reduction_factor!r}")
            bottleneck_size = hidden_size // reduction_factor
        if not isinstance(bottleneck_size, int) or bottleneck_size <= 0:
            raise ValueError(f"bottleneck_size must be a positive int, got {bottleneck_size!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be a finite float, got {scale!r}")
        self.hidden_size, self.bottleneck_size = hidden_size, bottleneck_size
        self.activation, self.scale = check_activation(activation), float(scale)
        factory = {"dtype": dtype, "device": device}
        self.norm = nn.LayerNorm(hidden_size, **factory) if layer_norm else None
        self.down = nn.Linear(hidden_size, bottleneck_size, bias=bias, **factory)
        self.up = nn.Linear(bottleneck_size, hidden_size, bias=bias, **factory)
        with torch.no_grad():
            if init == "near_identity":
                nn.init.normal_(self.down.weight, std=1e-2)
                if bias:
                    self.down.bias.zero_()
            nn.init.zeros_(self.up.weight)
            if bias:
                self.up.bias.zero_()

    def forward(self, h: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        norm = self.norm
        bottleneck_ops.check_inputs(h, residual, {
            "down.weight": self.down.weight, "down.bias": self.down.bias, "up.weight": self.up.weight,
            "up.bias": self.up.bias, "norm.weight": norm.weight if norm is not None else None,
            "norm.bias": norm.bias if norm is not None else None}, x_name="h")
        if h.shape[-1:] != (self.hidden_size,):
            raise ValueError(f"h must have last dim hidden_size={self.hidden_size}, got shape {tuple(h.shape)}")
        if residual is not None and residual.shape != h.shape:
            raise ValueError(f"residual must have h's shape {tuple(h.shape)}, got {tuple(residual.shape)}")
        return bottleneck_ops.bottleneck_adapter(
            h, self.down.weight, self.down.bias, self.up.weight, self.up.bias, self.activation, self.scale, residual,
            norm.weight if norm is not None else None, norm.bias if norm is not None else None, norm is not None,
            norm.eps if norm is not None else 1e-5)[0]

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
                f"activation={self.activation!r}, scale={self.scale}")
