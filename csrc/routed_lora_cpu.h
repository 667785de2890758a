// CPU kernels of per-sample routed LoRA (formula: fastft/reference/routed_lora.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastft {

// delta (M, N) in A's dtype: row m = scale_g * (x_m A_g^T) B_g^T with g = route[m], 0 for route -1. The rows are
// grouped by adapter with one counting sort of the route, gathered in that order into an fp32 buffer (fp64 for fp64
// adapters), each adapter's contiguous segment goes through its two rank-r GEMMs (fp32 accumulation), and the
// result rows are written back to their places in one pass.
at::Tensor routed_lora_cpu(const at::Tensor& x, const std::vector<at::Tensor>& as, const std::vector<at::Tensor>& bs,
                           const std::vector<double>& scales, const at::Tensor& route);

// (dx if want_x, [dA_g], [dB_g]) for the gradient dy (M, N) of delta: the same grouping, U_g = x_g A_g^T recomputed,
// dU_g = scale_g dy_g B_g, dB_g = scale_g dy_g^T U_g, dA_g = dU_g^T x_g, dx_g = dU_g A_g (x's dtype).
std::tuple<std::optional<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> routed_lora_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::vector<at::Tensor>& as, const std::vector<at::Tensor>& bs,
    const std::vector<double>& scales, const at::Tensor& route, bool want_x);

}  // namespace fastft
