"""NF4Linear: a linear layer whose frozen weight is stored in bitsandbytes' 4-bit format, with a fused
dequantize + matmul forward and backward (no dense copy of the weight in either pass on the fused paths).

Its state_dict has exactly bitsandbytes' `Linear4bit` keys (weight, bias, weight.absmax, weight.quant_map,
weight.nested_absmax, weight.nested_quant_map, weight.quant_state.bitsandbytes__nf4), so checkpoints move both ways.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastft import nf4

_STATE_TENSORS = ("absmax", "code", "nested_absmax", "nested_code")


def nf4_linear_forward(x: Tensor, packed: Tensor, state: nf4.NF4State, bias: Tensor | None,
                       compute_dtype: torch.dtype | None) -> Tensor:
    """x @ W^T + bias with the 4-bit W, bitsandbytes' dtype rule: x is cast to compute_dtype (None: x's dtype) for
    the matmul, the bias to that dtype, and the output back to x's dtype."""
    input_dtype = x.dtype
    if compute_dtype is not None:
        x = x.to(compute_dtype)
    bias = None if bias is None else bias.to(x.dtype)
    return nf4.matmul(x, packed, state, bias).to(input_dtype)


class NF4Linear(nn.Module):
    """y = x @ W^T + b with W (out_features, in_features) held as packed 4-bit codes.

    weight: frozen uint8 Parameter ((out*in+1)//2, 1), as bitsandbytes stores it; bias: optional, trainable.
    compute_dtype: x is cast to it for the matmul and the output cast back to x's dtype (bitsandbytes' rule);
    None computes in x's dtype. The weight's statistics live in non-persistent buffers (they follow `.to()`)
    and are serialized under bitsandbytes' keys.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 double_quant: bool = True, quant_type: str = "nf4", compute_dtype: torch.dtype | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        # A zero weight of the requested layout; real values come from from_linear / from_bnb / load_state_dict.
        packed, state = nf4.quantize(torch.zeros(out_features, in_features, dtype=dtype, device=device), blocksize,
                                     double_quant, quant_type)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._set_state(state)

    def _set_state(self, state: nf4.NF4State) -> None:
        for name in _STATE_TENSORS:
            self.register_buffer(name, getattr(state, name), persistent=False)
        self.blocksize, self.quant_type = state.blocksize, state.quant_type
        self.weight_dtype, self.nested_offset = state.dtype, state.nested_offset
        self.nested_blocksize = state.nested_blocksize

    @property
    def quant_state(self) -> nf4.NF4State:
        """The weight's NF4State (a view of this module's buffers)."""
        return nf4.NF4State(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                            dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                            code=self.code, nested_absmax=self.nested_absmax, nested_code=self.nested_code,
                            nested_offset=self.nested_offset, nested_blocksize=self.nested_blocksize)

    # construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_packed(cls, packed: Tensor, state: nf4.NF4State, bias: nn.Parameter | Tensor | None = None,
                    compute_dtype: torch.dtype | None = None) -> NF4Linear:
        """Wrap an already quantized weight (no copy): `packed` and `state` as fastft.nf4.quantize returns them."""
        state.validate(packed)
        if len(state.shape) != 2:
            raise ValueError(f"state.shape must be (out_features, in_features), got {tuple(state.shape)}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.out_features, module.in_features = state.shape
        module.compute_dtype = compute_dtype
        module.weight = nn.Parameter(packed, requires_grad=False)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias)
        module.bias = bias
        module._set_state(state)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, quant_type: str = "nf4") -> NF4Linear:
        """Quantize an nn.Linear's weight; its bias Parameter is reused as is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        packed, state = nf4.quantize(linear.weight.detach(), blocksize, double_quant, quant_type)
        return cls.from_packed(packed, state, linear.bias, compute_dtype)

    @classmethod
    def from_bnb(cls, linear4bit) -> NF4Linear:
        """Take over a bitsandbytes Linear4bit's storage (packed codes, statistics and bias are shared); a weight that
        bitsandbytes repacked for its CPU kernel is converted back to its standard layout first
        (`NF4State.from_bnb_weight`)."""
        import bitsandbytes as bnb

        if not isinstance(linear4bit, bnb.nn.Linear4bit):
            raise TypeError(f"linear4bit must be a bitsandbytes.nn.Linear4bit, got {type(linear4bit).__name__}")
        packed, state = nf4.NF4State.from_bnb_weight(linear4bit.weight)
        return cls.from_packed(packed, state, linear4bit.bias, linear4bit.compute_dtype)

    @torch.no_grad()
    def set_weight(self, weight: Tensor) -> None:
        """Quantize a dense (out_features, in_features) weight into this layer, in its format (blocksize, double
        quant, quant type, original dtype); the weight Parameter keeps its identity (e.g. after a LoRA merge)."""
        if not isinstance(weight, Tensor) or weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight must have shape ({self.out_features}, {self.in_features}), got "
                             f"{tuple(getattr(weight, 'shape', ()))}")
        packed, state = nf4.quantize(weight.to(self.weight_dtype), self.blocksize, self.nested_absmax is not None,
                                     self.quant_type)
        self.weight.data = packed
        self._set_state(state)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense nn.Linear with the dequantized weight (in the original weight dtype unless `dtype` is given)."""
        weight = nf4.dequantize(self.weight, self.quant_state, dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device,
                           dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # forward -----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return nf4_linear_forward(x, self.weight, self.quant_state, self.bias, self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.nested_absmax is not None}")

    # bitsandbytes-compatible serialization ----------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, tensor in self.quant_state.state_dict().items():
            destination[prefix + "weight." + key] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        quant_prefix = prefix + "weight."
        quant_keys = [k for k in state_dict if k.startswith(quant_prefix)]
        if quant_keys:
            device = self.weight.device
            state = nf4.NF4State.from_state_dict({k[len(quant_prefix):]: state_dict[k].to(device) for k in quant_keys})
            if tuple(state.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{quant_prefix}quant_state has shape {tuple(state.shape)}, this layer is "
                                  f"({self.out_features}, {self.in_features})")
                return
            incoming = state_dict.get(prefix + "weight")
            if incoming is not None and incoming.shape != self.weight.shape:
                self.weight.data = torch.empty_like(incoming, device=device)
            self._set_state(state)
        elif strict:
            missing_keys.append(quant_prefix + "quant_state.bitsandbytes__" + self.quant_type)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key in quant_keys:
            if key in unexpected_keys:
                unexpected_keys.remove(key)


__all__ = ["NF4Linear", "nf4_linear_forward"]
