"""torch.library op of the EWC penalty pass (formula: fastft/reference/ewc.py).

- fastft::ewc_penalty(params, grads, fisher, anchor, lam): for lists of tensors (one entry per trainable
  parameter, each Fisher and anchor shaped like its parameter), adds lam * F * (theta - theta*) into each grad in
  place and returns the penalty lam / 2 * sum F (theta - theta*)^2. It is the penalty's value and gradient in one
  pass over memory, with no autograd graph: nothing is saved, nothing the size of the model is allocated. CPU: one
  parallel C++ loop over segments of all the tensors (csrc/ewc.cpp); CUDA: one Triton launch per dtype pair over a
  multi-tensor work list (kernels/ewc.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastft.ops.routing import dispatch

__all__ = ["ewc_penalty"]


@torch.library.custom_op("fastft::ewc_penalty", mutates_args=("grads",))
def ewc_penalty(params: list[Tensor], grads: list[Tensor], fisher: list[Tensor], anchor: list[Tensor],
                lam: float) -> Tensor:
    return dispatch("ewc_penalty", params[0].device.type, params, grads, fisher, anchor, lam)


@ewc_penalty.register_fake
def _(params, grads, fisher, anchor, lam):
    dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    return params[0].new_empty((), dtype=dtype)
