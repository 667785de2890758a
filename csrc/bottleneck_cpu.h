// CPU kernels of fastft's bottleneck adapter op (fp32; formulas in fastft/reference/bottleneck.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastft {

// Forward over rows v (T, H): z = v @ w_down^T + b_down (T, r) and
// out = residual + scale * (act(z) @ w_up^T + b_up) (T, H). Returns (out, z).
std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_cpu(const at::Tensor& v, const at::Tensor& residual,
                                                          const at::Tensor& w_down,
                                                          const std::optional<at::Tensor>& b_down,
                                                          const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                                                          const std::string& activation, double scale);

// (dv, dw_down, db_down, dw_up, db_up) of out = residual + scale * (act(z) @ w_up^T + b_up), z = v @ w_down^T + b_down,
// for the output gradient dy (T, H): dv = [dy +] dz @ w_down with dz = act'(z) * scale * (dy @ w_up), the dy term
// when add_dy (a sequential adapter without a norm, whose input is also its residual); dv is empty unless need_dv,
// the four weight gradients empty unless need_weights.
using BottleneckGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
BottleneckGrads bottleneck_backward_cpu(const at::Tensor& dy, const at::Tensor& v, const at::Tensor& z,
                                        const at::Tensor& w_down, const at::Tensor& w_up,
                                        const std::string& activation, double scale, bool add_dy, bool need_dv,
                                        bool need_weights);

}  // namespace fastft
