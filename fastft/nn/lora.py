"""LoRA on fastft's ops: the pieces of a fused LoRA forward (rank-r products of a group of adapters in one
fastft::lora_down call, up-projections accumulated into the base output in place, DoRA's weight norm and output,
input groups of sibling projections) and `LoraLinear`, a LoRA layer built from them.

fastft.patch runs peft's LoRA layers through these same functions (fastft/integrations/peft.py reads peft's
parameters and hands them over as terms); `LoraLinear` is the module for models without peft.

A term is one adapter's (lora_A (r, in), lora_B (out, r), scale, dropout p, lora bias or None).
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastft.ops import lora as lora_ops


def new_seed() -> int:
    """A dropout seed drawn from torch's CPU generator: torch.manual_seed makes runs reproducible, and activation
    checkpointing (which restores the RNG state) replays the same dropout masks."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))


def lora_products(x: Tensor, terms: list[tuple]) -> list[Tensor]:
    """The rank-r product u_g of each term (lora_A, lora_B, scale, p, bias): one fastft::lora_down call per
    (A dtype, p)."""
    products: list = [None] * len(terms)
    calls: dict[tuple, list[int]] = {}
    for index, (lora_A, _, _, p, _) in enumerate(terms):
        calls.setdefault((lora_A.dtype, p), []).append(index)
    for (_, p), indices in calls.items():
        As = [terms[i][0] for i in indices]
        # Without dropout the seeds are unused: none is drawn, so torch's random stream advances as with peft (whose
        # dropout is then an nn.Identity) and torch.compile has no host sync to break its graph on.
        u = lora_ops.lora_down(x, As, p, [new_seed() if p > 0 else 0 for _ in indices])
        for i, u_g in zip(indices, u.split([A.shape[0] for A in As], dim=1)):
            products[i] = u_g
    return products


def add_lora_terms(result: Tensor, terms: list[tuple], products: list[Tensor], cast_result_per_adapter: bool,
                   in_place: bool) -> Tensor:
    """result + every term's up-projection scale * (u_g @ B^T + bias). in_place (result is private to the caller, a
    base output computed on x's rows): the up-projections accumulate into result (addmm_: one pass over it, no
    (tokens, out) temporary) when it is a 2-D tensor of their dtype (peft's out-of-place sum would otherwise promote)
    and not a view (autograd forbids in-place changes of views made inside custom ops, and a view's in-place change
    costs a copy of its gradient). Under torch.compile the sum stays out of place (the compiler fuses it)."""
    if (in_place and not torch.compiler.is_compiling() and result.dim() == 2 and result.is_contiguous()
            and not result._is_view() and all(lora_B.dtype == result.dtype for _, lora_B, *_ in terms)):
        for (_, lora_B, scale, _, bias), u_g in zip(terms, products):
            lora_ops.add_lora_up(result, u_g, lora_B, scale, bias)
        return result
    for (_, lora_B, scale, _, bias), u_g in zip(terms, products):
        delta = lora_ops.lora_up(u_g, lora_B, scale, bias).view(*result.shape[:-1], lora_B.shape[0])
        result = result + (delta.to(result.dtype) if cast_result_per_adapter else delta)
    return result


# DoRA -----------------------------------------------------------------------------------------------------------
def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """Row norms of weight + scale * B @ A (out, in) without forming it: |W_i|^2 + 2 s B_i (W A^T)_i^T +
    s^2 B_i (A A^T) B_i^T, accumulated in fp32: W is read twice (its row norms, one rank-r GEMM) and no out x in
    tensor is allocated."""
    a, b = lora_A.float(), lora_B.float()
    squared = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square_()
    squared += 2 * scale * (b * (weight @ lora_A.t().to(weight.dtype)).float()).sum(1)
    squared += scale**2 * ((b @ (a @ a.t())) * b).sum(1)
    return squared.clamp_(min=0).sqrt_()


def dora_output(x: Tensor, dropped: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                scale: float, magnitude: Tensor, base_forward: Callable[[Tensor], Tensor]) -> Tensor:
    """DoRA's output for one adapter: base(x) + (g - 1) W drop(x) + g s B A drop(x), g = m / |W + s B A|_row (the
    norm detached, as in peft), computed as g * (W drop(x) + s B A drop(x)) (+ base(x) - W drop(x) with dropout):
    one base GEMM without dropout, no out x in matrix for the norm, the LoRA term from fastft's op.
    x: the input in A's dtype; dropped: dropout(x), or x itself without dropout; weight (out, in) in x's dtype."""
    with torch.no_grad():
        norm = dora_weight_norm(weight, lora_A, lora_B, scale).to(x.dtype)
    gain = (magnitude / norm).view(1, -1)
    product = F.linear(dropped, weight)
    delta, _ = lora_ops.lora_delta(dropped, lora_A, lora_B, scale, 0.0, 0, None)
    scaled = (product + delta.to(product.dtype)) * gain
    if dropped is x:
        return scaled if bias is None else scaled + bias
    return base_forward(x) - product + scaled


# Input groups ---------------------------------------------------------------------------------------------------
class _PendingProducts(threading.local):
    """One thread's round of an input group: the x its first member was called with (and x's version then), and
    the rank-r products of the members that have not taken theirs yet."""

    def __init__(self):
        self.x: Tensor | None = None
        self.version = -1
        self.pending: dict[int, list] = {}  # id(member) -> its rank-r products, for x


class InputGroup:
    """Sibling LoRA layers reading one input (q/k/v of an attention block, gate/up of an MLP). The first member
    called with x computes every eligible member's rank-r products in one fastft::lora_down call per (A dtype, p);
    the others take theirs when called with the same, unmodified x (same object, same version). A group whose
    members turn out to read different inputs stops grouping and records why in `report.input_groups[name]`. A round
    is per thread, so forwards of one model running in several threads each group their own calls; a copy of the
    group (pickle, deepcopy) starts with no round in progress."""

    def __init__(self, name: str, members: list, report):
        self.name, self.members, self.report = name, members, report
        self.active = True
        self._round = _PendingProducts()

    @property
    def x(self) -> Tensor | None:
        return self._round.x

    @property
    def pending(self) -> dict[int, list]:
        return self._round.pending

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_round"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._round = _PendingProducts()

    def take(self, layer, x: Tensor, terms_of: Callable) -> list[Tensor] | None:
        """layer's rank-r products for x, or None where the group does not serve this call (then layer computes
        its own): under torch.compile, once the group stopped, and for a module that is none of the members (a
        copy of one, e.g. nn.DataParallel's replicas, which share the group object). terms_of(member, x, caller)
        gives a member's terms (checking x against them), or None for a member other than the caller that does not
        take the fused path now."""
        if torch.compiler.is_compiling() or not any(m is layer for m in self.members):
            return None
        current = self._round
        if not self.active:
            if current.pending:  # the group stopped during this thread's round: release x
                current.x, current.version, current.pending = None, -1, {}
            return None
        if x is current.x and x._version == current.version and id(layer) in current.pending:
            mine = current.pending.pop(id(layer))
            if not current.pending:  # every member took its own: release x
                current.x, current.version = None, -1
            return mine
        if current.pending:  # a member left its term unused, or was called with another input: stop grouping
            self.active = False
            current.x, current.version, current.pending = None, -1, {}
            self.report.input_groups[self.name] = "stopped: the members read different inputs (each runs alone)"
            return None
        members, terms = [], []
        for member in self.members:
            member_terms = terms_of(member, x, member is layer)
            if member_terms is not None:
                members.append(member)
                terms.append(member_terms)
        flat = lora_products(x, [term for member_terms in terms for term in member_terms])
        start = 0
        for member, member_terms in zip(members, terms):
            if member is not layer:
                current.pending[id(member)] = flat[start:start + len(member_terms)]
            else:
                mine = flat[start:start + len(member_terms)]
            start += len(member_terms)
        if current.pending:
            current.x, current.version = x, x._version
        return mine


# The module -----------------------------------------------------------------------------------------------------
class LoraLinear(nn.Module):
    """y = base(x) + scale * B A dropout(x) (LoRA), or with use_dora DoRA's magnitude-rescaled form, on a frozen
    `base` (an nn.Linear, or fastft's NF4Linear when use_dora is False). scale = alpha / r (alpha / sqrt(r) with
    use_rslora), as in peft. Parameters: lora_A (r, in_features), initialized as peft's default (Kaiming-uniform),
    lora_B (out_features, r), zero, so a new layer returns base(x); with DoRA, magnitude (out_features,), the row
    norms of the base weight. The LoRA term runs on fastft::lora_down (dropout masks regenerated from a seed in
    backward, never stored) and is added into the base output in place."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 use_dora: bool = False, use_rslora: bool = False):
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        weight = getattr(base, "weight", None)
        if not hasattr(base, "in_features") or not hasattr(base, "out_features") or weight is None:
            raise TypeError(f"base must be a linear layer with in_features, out_features and a weight, got "
                            f"{type(base).__name__}")
        if use_dora and type(base) is not nn.Linear:
            raise TypeError(f"use_dora needs a dense nn.Linear base, got {type(base).__name__}")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features, self.r = base.in_features, base.out_features, r
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = dropout
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        factory = {"dtype": dtype, "device": weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.magnitude = None
        if use_dora:
            with torch.no_grad():
                norm = dora_weight_norm(weight.detach(), self.lora_A, self.lora_B, self.scale).to(dtype)
            self.magnitude = nn.Parameter(norm)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x's last dim must be in_features={self.in_features}, got shape {tuple(x.shape)}")
        p = self.dropout if self.training else 0.0
        if self.magnitude is not None:
            rows = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)
            dropped = F.dropout(rows, p) if p > 0 else rows
            out = dora_output(rows, dropped, self.base.weight.to(rows.dtype), self.base.bias, self.lora_A,
                              self.lora_B, self.scale, self.magnitude, self.base)
            return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        result = self.base(x.reshape(-1, x.shape[-1]))
        terms = [(self.lora_A, self.lora_B, self.scale, p, None)]
        result = add_lora_terms(result, terms, lora_products(x, terms), cast_result_per_adapter=True, in_place=True)
        return result.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scale={self.scale:g}, dropout={self.dropout}, dora={self.magnitude is not None}")


__all__ = ["InputGroup", "LoraLinear", "add_lora_terms", "dora_output", "dora_weight_norm", "lora_products",
           "new_seed"]
