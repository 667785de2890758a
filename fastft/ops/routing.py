"""The routing table: for each op (or kernel step inside an op), its implementation per backend and the inputs each
backend declines.

Backends register their implementations in their own files (fastft/ops/backends/native.py, triton.py,
reference.py), in the spirit of bitsandbytes' `backends/<device>/ops.py` + `register_kernel`:

    @register_kernel("nf4_linear", "native")
    def nf4_linear(x, packed, ...): ...

    @register_kernel("bottleneck_backward", "native", supports=all_fp32, declines="inputs other than fp32")
    def bottleneck_backward(dy, v, z, ...): ...

An op file (fastft/ops/<feature>.py) names no backend: its custom op calls `dispatch(name, device_type, *args)`,
which runs the implementation of the backend `fastft.ops.backend.backend_for(device_type)` picks (the C++
extension on CPU, Triton on CUDA, or the one FASTFT_BACKEND / `set_backend` forces), unless that backend has no
implementation of the op or its `supports(*args)` predicate declines these inputs: then the "reference"
implementation (plain torch) runs. Every entry has a reference implementation. `routes()` lists the table for
`fastft info`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastft.ops.backend import BACKENDS, backend_for


@dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    fn: Callable
    supports: Optional[Callable[..., bool]] = None  # None: every input the op accepts
    declines: str = ""  # what `supports` turns down, in words (for `fastft info`)


_TABLE: dict[str, dict[str, Implementation]] = {}


def register_kernel(op: str, backend: str, *, supports: Optional[Callable[..., bool]] = None, declines: str = ""):
    """Decorator: `fn` implements `op` (its name without the `fastft::` namespace, or a kernel step such as
    "distill_soft_rows") on `backend`, for the inputs `supports(*args)` accepts (None: all of them)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def register(fn: Callable) -> Callable:
        implementations = _TABLE.setdefault(op, {})
        if backend in implementations:
            raise RuntimeError(f"{op} already has a {backend} implementation ({implementations[backend].fn})")
        implementations[backend] = Implementation(op, backend, fn, supports, declines)
        return fn

    return register


def select(op: str, device_type: str, *args) -> Implementation:
    """The implementation of `op` that runs for these arguments on tensors of `device_type`."""
    implementations = _TABLE.get(op)
    if implementations is None:
        raise KeyError(f"no implementation of {op!r} is registered (fastft.ops.backends registers them)")
    chosen = implementations.get(backend_for(device_type))
    if chosen is not None and (chosen.supports is None or chosen.supports(*args)):
        return chosen
    return implementations["reference"]


def dispatch(op: str, device_type: str, *args):
    """Run `op` on `args` with the implementation `select` picks."""
    return select(op, device_type, *args).fn(*args)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def runs_directly(*tensors) -> bool:
    """Whether a call of an op on `tensors` may run its implementation directly instead of through the custom op:
    nothing would see the op (autograd records nothing: grad mode off or no input requiring grad; no torch.compile
    or FX tracing; no dispatch mode such as fake tensors or op counters; plain tensors, no subclass). The custom op
    and its autograd wrapper cost ~30 us a call on CPU, as much as a decode step's whole GEMM of a small layer."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    grad = torch.is_grad_enabled()
    for tensor in tensors:
        if tensor is not None and (type(tensor) not in _PLAIN or (grad and tensor.requires_grad)):
            return False
    return True


def routes() -> dict[str, dict[str, Implementation]]:
    """{op: {backend: Implementation}}, in registration order."""
    return {op: dict(implementations) for op, implementations in _TABLE.items()}


def describe_routes(device_types: tuple[str, ...] = ("cpu",)) -> list[str]:
    """One line per op: the implementations registered (with what each declines) and, per device type, which one
    runs here for inputs every backend supports."""
    import torch

    lines = []
    for op, implementations in _TABLE.items():
        ordered = sorted(implementations.values(),
                         key=lambda impl: ("native", "triton", "reference").index(impl.backend))
        registered = ", ".join(impl.backend + (f" (not for {impl.declines})" if impl.declines else "")
                               for impl in ordered)
        name = f"fastft::{op}" if hasattr(torch.ops.fastft, op) else f"{op} (a step inside an op)"
        here = []
        for device_type in device_types:
            try:
                backend = backend_for(device_type)
            except RuntimeError as error:
                here.append(f"{device_type}: {error}")
                continue
            here.append(f"{device_type}: {backend if backend in implementations else 'reference'}")
        lines.append(f"{name}: {registered}; runs here -> {', '.join(here)}")
    return lines
