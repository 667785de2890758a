// CPU kernel of fastft's bottleneck adapter op.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastft {

// residual + alpha * (a @ b + bias) for residual (T, N), a (T, K), b (K, N), bias (N) or none, in one pass over
// residual and the result: the adapter's up-projection with its residual add (and, with bias none and alpha 1,
// backward's dx = dy + dz @ W_down). Float32 with AVX2: a register-tiled kernel for the small K of a bottleneck;
// other dtypes or CPUs: ATen (result = residual + alpha * bias, then an in-place GEMM).
at::Tensor residual_addmm_cpu(const at::Tensor& residual, const at::Tensor& a, const at::Tensor& b,
                              const std::optional<at::Tensor>& bias, double alpha);

}  // namespace fastft
