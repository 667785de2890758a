"""Plain-torch ground truth of per-sample routed bottleneck adapters: in one batch, each row through its own adapter.

Row m of the (M, H) sublayer output y goes through adapter g = route[m] (-1: unchanged):
    sequential adapter: out_m = y_m + scale_g * up_g(act_g(down_g(y_m)))
    parallel adapter:   out_m = y_m + scale_g * up_g(act_g(down_g(s_m)))     (s: the sublayer's input rows)
with the branch computed in the adapter's dtype and added in y's (fastft/reference/bottleneck.py, without norm).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastft.reference.bottleneck import bottleneck_adapter_ref


def routed_bottleneck_ref(output: Tensor, source: Optional[Tensor], w_downs: list[Tensor],
                          b_downs: list[Optional[Tensor]], w_ups: list[Tensor], b_ups: list[Optional[Tensor]],
                          activations: list[str], scales: list[float], parallel: list[bool], route: Tensor) -> Tensor:
    """out (M, H) in output's dtype, row by row as above (differentiable: the spec and the test oracle)."""
    rows = []
    for m, g in enumerate(route.tolist()):
        y = output[m]
        if g < 0:
            rows.append(y)
            continue
        x = source[m] if parallel[g] else y
        rows.append(bottleneck_adapter_ref(x, w_downs[g], b_downs[g], w_ups[g], b_ups[g], activations[g], scales[g],
                                           residual=y))
    return torch.stack(rows) if rows else output.clone()
