"""Plain-torch ground truth of fastft's EWC penalty pass (Kirkpatrick et al. 2017).

For parameters theta_i with diagonal Fisher F_i and anchors theta*_i (each F_i, theta*_i shaped like theta_i,
stored in fp32, bf16 or fp64), one pass does, for every element:

    d = theta - theta*;  fd = F * d;  grad += lambda * fd;  penalty += fd * d

and returns lambda / 2 * penalty. Arithmetic is in fp32 (fp64 when theta or its storage is fp64); each .grad
element is rounded once to its dtype; the penalty is summed in fp64 and returned as a 0-d tensor in the compute
dtype of the first parameter (fp64 if it is fp64, else fp32).
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(param: Tensor, storage: Tensor) -> torch.dtype:
    """fp64 when the parameter or its stored Fisher / anchor is fp64, else fp32."""
    return torch.float64 if torch.float64 in (param.dtype, storage.dtype) else torch.float32


def ewc_penalty_ref(params: list[Tensor], grads: list[Tensor], fisher: list[Tensor], anchor: list[Tensor],
                    lam: float) -> Tensor:
    """Adds lambda * F * (theta - theta*) into each grads[i] in place; returns lambda / 2 * sum F (theta - theta*)^2.
    This loop over parameters is the specification; fastft::ewc_penalty_ runs it as one pass."""
    total = torch.zeros((), dtype=torch.float64, device=params[0].device if params else "cpu")
    for p, g, f, a in zip(params, grads, fisher, anchor):
        dtype = compute_dtype(p, f)
        d = p.to(dtype) - a.to(dtype)
        fd = f.to(dtype) * d
        g.copy_(g.to(dtype) + lam * fd)
        total += (fd * d).double().sum()
    out_dtype = torch.float64 if params and params[0].dtype == torch.float64 else torch.float32
    return (total * (lam / 2)).to(out_dtype)
