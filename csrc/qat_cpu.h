// CPU kernels of fastft's fake quantization (torchao's numerics: fastft/reference/qat.py).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fastft {

// Fake-quantizes contiguous groups of `group` elements of x (fp32 / fp16 / bf16, numel a multiple of group) in one
// pass per group: min/max, scale (and zero point when asymmetric), then q and the dequantized value. NaN and
// infinities give torchao's outputs: a NaN in a group makes its scale, so all of its outputs, NaN.
at::Tensor fake_quantize_cpu(const at::Tensor& x, int64_t group, int64_t qmin, int64_t qmax, bool symmetric,
                             double eps);

// dx for dy: (x_dtype(dy * scale) where the clamp was inactive, else 0) * (1 / scale), as torchao's autograd (a NaN
// scale gives NaN everywhere in its group); scales and the clamp mask are recomputed from x (no mask stored).
at::Tensor fake_quantize_backward_cpu(const at::Tensor& grad, const at::Tensor& x, int64_t group, int64_t qmin,
                                      int64_t qmax, bool symmetric, double eps);

// Fake quantization with given fp32 scales (one per group) and, for the asymmetric form, fp32 zero points
// (learned, so not necessarily integers): q = clamp(round(x / s) + zp), out = (T(q) - T(zp)) * s; the clamp keeps
// NaN, so an output is NaN where x (or its group's scale or zero point) is.
at::Tensor fake_quantize_with_scale_cpu(const at::Tensor& x, const at::Tensor& scale,
                                        const std::optional<at::Tensor>& zero_point, int64_t group, int64_t qmin,
                                        int64_t qmax);

// (dx, dscale, dzero_point) of fake_quantize_with_scale (dzero_point empty without zero points), torchao's autograd
// in closed form with p = T(dy * s) and p_in = p inside the range (0 at the clamp): dx = T(p_in / s);
// dscale = sum dy * (T(q) - T(zp)) - (1 / s)^2 * sum p_in * x; dzero_point = sum p_in - T(sum p). Sums in fp64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_with_scale_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
    int64_t group, int64_t qmin, int64_t qmax);

}  // namespace fastft
