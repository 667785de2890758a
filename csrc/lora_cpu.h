// CPU kernels of fastft's LoRA ops.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastft {

// x * keep / (1 - p) with keep a function of (seed, flat index); x any float dtype, result in x's dtype.
at::Tensor lora_dropout_cpu(const at::Tensor& x, double p, int64_t seed);

// The rank-r GEMMs of a group of adapters with dropout (p > 0), adapter g with rank ranks[g] (its rows of the
// concatenated A) and seed seeds[g], over row chunks of about 2 MiB (dropout(x) is never written whole):
// u (M, sum of ranks) = [dropout_g(x.to(A.dtype)) @ A_g^T]_g, in A's dtype;
at::Tensor lora_down_cpu(const at::Tensor& x, const at::Tensor& a_cat, const std::vector<int64_t>& ranks, double p,
                         const std::vector<int64_t>& seeds);
// and its backward, each part when asked for:
// dx (M, K) = sum_g dropout_g(du_g @ A_g), in x's dtype (du in A's dtype), the adapters' terms added in order;
// dA (sum of ranks, K) = [du_g^T @ dropout_g(x.to(du.dtype))]_g, in du's dtype.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> lora_down_backward_cpu(
    const at::Tensor& du, const at::Tensor& x, const at::Tensor& a_cat, const std::vector<int64_t>& ranks, double p,
    const std::vector<int64_t>& seeds, bool want_x, bool want_a);

}  // namespace fastft
