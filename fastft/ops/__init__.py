"""torch.library custom ops (`torch.ops.fastft.*`): one file per feature holds its ops, fake and autograd
registrations; their implementations per backend (C++, Triton, plain torch) are registered in fastft/ops/backends/
and picked by the routing table (fastft/ops/routing.py)."""

from fastft.ops import bottleneck, distillation, ewc, grad_reverse, logprobs, lora, nf4, policy_logprobs, qat, routed_bottleneck, routed_lora  # noqa: F401  (registers the fastft:: ops)
from fastft.ops import backends  # noqa: F401  (registers their implementations)
from fastft.ops.backend import backend_for, describe, set_backend, use_backend

__all__ = ["backend_for", "describe", "set_backend", "use_backend"]
