"""torch.library custom ops (`torch.ops.fastft.*`) with CPU (C++), CUDA (Triton), fake and autograd registrations."""

from fastft.ops import bottleneck, distillation, lora, nf4, qat  # noqa: F401  (registers the fastft:: ops)
from fastft.ops.backend import backend_for, describe, set_backend, use_backend

__all__ = ["backend_for", "describe", "set_backend", "use_backend"]
