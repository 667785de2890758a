"""Plain-torch ground truth of per-sample routed LoRA: in one batch, each row through its own adapter.

For rows x_m (M, K) and route[m] = g in [0, G) (or -1: no adapter), delta_m = scale_g * (x_m A_g^T) B_g^T, in A's
dtype; rows of route -1 get 0. The rows are grouped by adapter once (a stable sort of the route), so each adapter
runs two GEMMs on its contiguous block of rows: G pairs of rank-r GEMMs whose row counts add up to M, the same
FLOPs as one adapter over the whole batch. Backward, for dy: dU_g = scale_g dy_g B_g, dB_g = scale_g dy_g^T U_g,
dA_g = dU_g^T x_g, dx_g = dU_g A_g, with U_g = x_g A_g^T recomputed (nothing but x and the route is saved).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def groups(route: Tensor, count: int) -> tuple[Tensor, list[int]]:
    """(order, sizes): the row indices sorted by adapter (rows of route -1 dropped) and each adapter's row count."""
    order = torch.argsort(route, stable=True)
    sizes = torch.bincount(route.clamp(min=-1) + 1, minlength=count + 1).tolist()
    return order[sizes[0]:], sizes[1:]


def routed_lora_ref(x: Tensor, lora_As: list[Tensor], lora_Bs: list[Tensor], scales: list[float],
                    route: Tensor) -> Tensor:
    """delta (M, N) in A's dtype for rows x (M, K)."""
    dtype = lora_As[0].dtype
    out = x.new_zeros(x.shape[0], lora_Bs[0].shape[0], dtype=dtype)
    order, sizes = groups(route, len(lora_As))
    rows = x.index_select(0, order).to(dtype)
    parts = []
    for block, A, B, scale in zip(rows.split(sizes), lora_As, lora_Bs, scales):
        parts.append((block @ A.t()) @ B.t() * scale)
    return out.index_copy_(0, order, torch.cat(parts)) if parts else out


def routed_lora_backward_ref(dy: Tensor, x: Tensor, lora_As: list[Tensor], lora_Bs: list[Tensor],
                             scales: list[float], route: Tensor,
                             want_x: bool) -> tuple[Optional[Tensor], list[Tensor], list[Tensor]]:
    """(dx or None, [dA_g], [dB_g])."""
    dtype = lora_As[0].dtype
    order, sizes = groups(route, len(lora_As))
    rows = x.index_select(0, order).to(dtype).split(sizes)
    grads = dy.index_select(0, order).to(dtype).split(sizes)
    dAs, dBs, dxs = [], [], []
    for block, d, A, B, scale in zip(rows, grads, lora_As, lora_Bs, scales):
        du = (d @ B) * scale
        dBs.append((d.t() @ (block @ A.t())) * scale)
        dAs.append(du.t() @ block)
        if want_x:
            dxs.append(du @ A)
    dx = None
    if want_x:
        dx = x.new_zeros(x.shape, dtype=dtype).index_copy_(0, order, torch.cat(dxs)).to(x.dtype)
    return dx, dAs, dBs
