"""Plain-torch ground truth of fastft's bottleneck adapter op.

    out = residual + scale * (act(down(norm(x))) @ W_up^T + b_up),   down(v) = v @ W_down^T + b_down

with `norm` an optional LayerNorm over the last dim and `residual` = x for a sequential (Houlsby / Pfeiffer) adapter,
or the sublayer's output for a parallel adapter. The branch is computed in the adapter weights' dtype and added to
the residual in the residual's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastft.formats.bottleneck import ACTIVATIONS, check_activation  # noqa: F401  (re-exported)


def activate(z: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_grad(grad: Tensor, z: Tensor, activation: str) -> Tensor:
    """grad * act'(z), with torch's own derivative formulas (relu' = 0 at 0)."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, z, 0)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, z)
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, z, approximate="tanh")
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def bottleneck_adapter_ref(x: Tensor, w_down: Tensor, b_down: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor],
                           activation: str = "relu", scale: float = 1.0, residual: Optional[Tensor] = None,
                           ln_weight: Optional[Tensor] = None, ln_bias: Optional[Tensor] = None,
                           layer_norm: bool = False, ln_eps: float = 1e-5) -> Tensor:
    """x, residual: (..., hidden); w_down: (bottleneck, hidden); w_up: (hidden, bottleneck); returns (..., hidden)."""
    v = x.to(w_down.dtype)
    if layer_norm:
        v = F.layer_norm(v, (v.shape[-1],), ln_weight, ln_bias, ln_eps)
    branch = F.linear(activate(F.linear(v, w_down, b_down), activation), w_up, b_up)
    base = x if residual is None else residual
    return base + (branch * scale).to(base.dtype)
