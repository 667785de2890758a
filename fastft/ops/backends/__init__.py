"""The implementations of fastft's ops per backend; importing this package registers them in the routing table
(fastft/ops/routing.py).

- native.py: the C++ CPU kernels of the extension `fastft._C` (csrc/).
- triton.py: the Triton kernels (kernels/, installed as fastft.kernels), for CUDA tensors (and CPU tensors under the
  Triton interpreter, in the tests).
- reference.py: plain torch, from the specification in fastft/reference/: what runs where no other backend does or
  where the chosen backend declines the inputs.

An implementation takes the arguments the op file passes to `dispatch` (the op's own arguments, sometimes reshaped
to rows) and returns what the op returns.
"""

from fastft.ops.backends import native, reference, triton  # noqa: F401  (registers the implementations)
