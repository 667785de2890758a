// CPU kernels of fastft's bottleneck adapter op (fp32; formulas in fastft/reference/bottleneck.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastft {

// Forward over rows v (T, H): z = v @ w_down^T + b_down (T, r) and
// out = residual + scale * (act(z) @ w_up^T + b_up) (T, H). Returns (out, z).
std::tuple<at::Tensor, at::Tensor> bottleneck_forward_cpu(const at::Tensor& v, const at::Tensor& residual,
                                                          const at::Tensor& w_down,
                                                          const std::optional<at::Tensor>& b_down,
                                                          const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                                                          const std::string& activation, double scale);

// Backward to the input: dz = act'(z) * scale * (dy @ w_up) (T, r) and dv = [dy +] dz @ w_down (T, H), the dy
// term when add_dy (a sequential adapter without a norm, whose input is also its residual). Returns (dz, dv).
std::tuple<at::Tensor, at::Tensor> bottleneck_input_grad_cpu(const at::Tensor& dy, const at::Tensor& z,
                                                             const at::Tensor& w_up, const at::Tensor& w_down,
                                                             const std::string& activation, double scale,
                                                             bool add_dy);

}  // namespace fastft
