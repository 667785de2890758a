// Fake quantization on CPU, one pass over x per group (the group is read twice from L1: min/max, then values).
// The arithmetic repeats torchao's op order exactly (fastft/reference/qat.py): the scale is computed in x's dtype
// and then taken to fp32, x is multiplied by the fp32 reciprocal, rounded half to even, shifted by the zero point
// and clamped, and the dequantized value is rounded to x's dtype. fp32 groups run 16 lanes at a time with AVX-512, 8
// with AVX2.
//
// NaN propagates as in torchao, whose amin / amax / minimum / maximum / clamp all keep NaN: a NaN anywhere in a
// group makes its scale NaN (std::min, std::max and the x86 min/max instructions would drop it, so the scan also
// records whether it saw one), a NaN pre-clamp value stays NaN through the clamp, and the gradient is masked
// before it is multiplied by 1 / scale, so a NaN scale makes every gradient of its group NaN.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "memory.h"
#include "nf4_codec.h"
#include "qat_cpu.h"

namespace fastft {
namespace {

template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

struct GroupParams {
  float scale, inv, zero_point;
};

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// torch.minimum / torch.maximum / torch.clamp: NaN in, NaN out.
inline float min_keep_nan(float a, float b) { return std::isnan(a) || std::isnan(b) ? a + b : std::min(a, b); }
inline float max_keep_nan(float a, float b) { return std::isnan(a) || std::isnan(b) ? a + b : std::max(a, b); }
inline float clamp_keep_nan(float v, float lo, float hi) { return std::isnan(v) ? v : std::min(std::max(v, lo), hi); }

// A zero point through torch's float -> int32 -> float cast: exact for the integers a zero point holds; NaN (a
// group with -inf, whose min / scale is -inf / inf) converts as the platform converts it, INT32_MIN on x86
// (cvttss2si, what torch's CPU cast runs), 0 elsewhere.
inline float through_int32(float v) {
#ifdef FASTFT_X86
  return static_cast<float>(_mm_cvtt_ss2si(_mm_set_ss(v)));
#else
  return std::isnan(v) ? 0.f : v;
#endif
}

// torchao's scale and zero point for one group with minimum lo and maximum hi (values of T, held as float).
template <typename T>
GroupParams group_params(float lo, float hi, float qmin, float qmax, bool symmetric, float eps) {
  const float min_neg = min_keep_nan(lo, 0.f), max_pos = max_keep_nan(hi, 0.f);
  float scale, zero_point = 0.f;
  if (symmetric) {
    scale = round_to<T>(max_keep_nan(-min_neg, max_pos) / ((qmax - qmin) / 2.f));
    scale = max_keep_nan(scale, eps);
  } else {
    scale = round_to<T>(round_to<T>(max_pos - min_neg) / (qmax - qmin));
    scale = max_keep_nan(scale, eps);
    zero_point = round_to<T>(qmin - std::nearbyint(round_to<T>(min_neg / scale)));
    zero_point = through_int32(clamp_keep_nan(zero_point, qmin, qmax));
  }
  return {scale, 1.f / scale, zero_point};
}

template <typename T>
GroupParams scan_group(const T* x, int64_t n, float qmin, float qmax, bool symmetric, float eps) {
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
    nan |= v != v;
  }
  return nan ? group_params<T>(kNaN, kNaN, qmin, qmax, symmetric, eps)
             : group_params<T>(lo, hi, qmin, qmax, symmetric, eps);
}

template <typename T>
void quantize_scalar(const T* x, T* out, int64_t begin, int64_t n, const GroupParams& p, float qmin, float qmax) {
  for (int64_t i = begin; i < n; ++i) {
    const float q = clamp_keep_nan(std::nearbyint(static_cast<float>(x[i]) * p.inv) + p.zero_point, qmin, qmax);
    out[i] = static_cast<T>(round_to<T>(round_to<T>(q) - round_to<T>(p.zero_point)) * p.scale);
  }
}

template <typename T>
void backward_scalar(const T* grad, const T* x, T* out, int64_t begin, int64_t n, const GroupParams& p, float qmin,
                     float qmax) {
  for (int64_t i = begin; i < n; ++i) {
    const float pre = std::nearbyint(static_cast<float>(x[i]) * p.inv) + p.zero_point;
    const float passed = pre >= qmin && pre <= qmax ? round_to<T>(static_cast<float>(grad[i]) * p.scale) : 0.f;
    out[i] = static_cast<T>(passed * p.inv);
  }
}

#ifdef FASTFT_X86
FASTFT_AVX2 GroupParams scan_group_avx2(const float* x, int64_t n, float qmin, float qmax, bool symmetric,
                                        float eps) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  __m256 lo8 = _mm256_set1_ps(inf), hi8 = _mm256_set1_ps(-inf), nan8 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    lo8 = _mm256_min_ps(lo8, v);
    hi8 = _mm256_max_ps(hi8, v);
    nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  // min_ps / max_ps drop NaN
  }
  alignas(32) float los[8], his[8];
  _mm256_store_ps(los, lo8);
  _mm256_store_ps(his, hi8);
  float lo = *std::min_element(los, los + 8), hi = *std::max_element(his, his + 8);
  bool nan = _mm256_movemask_ps(nan8) != 0;
  for (; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    nan |= x[i] != x[i];
  }
  return nan ? group_params<float>(kNaN, kNaN, qmin, qmax, symmetric, eps)
             : group_params<float>(lo, hi, qmin, qmax, symmetric, eps);
}

FASTFT_AVX2 void quantize_avx2(const float* x, float* out, int64_t n, const GroupParams& p, float qmin, float qmax) {
  const __m256 inv = _mm256_set1_ps(p.inv), scale = _mm256_set1_ps(p.scale), zp = _mm256_set1_ps(p.zero_point);
  const __m256 lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // max_ps / min_ps return their second operand when either is NaN: the value goes second so NaN stays NaN
    const __m256 q = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_add_ps(r, zp)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_sub_ps(q, zp), scale));
  }
  quantize_scalar<float>(x, out, i, n, p, qmin, qmax);
}

FASTFT_AVX2 void backward_avx2(const float* grad, const float* x, float* out, int64_t n, const GroupParams& p,
                               float qmin, float qmax) {
  const __m256 inv = _mm256_set1_ps(p.inv), scale = _mm256_set1_ps(p.scale), zp = _mm256_set1_ps(p.zero_point);
  const __m256 lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 pre = _mm256_add_ps(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv),
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zp);
    const __m256 keep = _mm256_and_ps(_mm256_cmp_ps(pre, lo, _CMP_GE_OQ), _mm256_cmp_ps(pre, hi, _CMP_LE_OQ));
    const __m256 passed = _mm256_and_ps(keep, _mm256_mul_ps(_mm256_loadu_ps(grad + i), scale));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(passed, inv));
  }
  backward_scalar<float>(grad, x, out, i, n, p, qmin, qmax);
}

// The AVX2 functions, 16 lanes.
FASTFT_AVX512 GroupParams scan_group_avx512(const float* x, int64_t n, float qmin, float qmax, bool symmetric,
                                            float eps) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  __m512 lo16 = _mm512_set1_ps(inf), hi16 = _mm512_set1_ps(-inf);
  __mmask16 nan16 = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    lo16 = _mm512_min_ps(lo16, v);
    hi16 = _mm512_max_ps(hi16, v);
    nan16 |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);  // min_ps / max_ps drop NaN
  }
  float lo = _mm512_reduce_min_ps(lo16), hi = _mm512_reduce_max_ps(hi16);
  bool nan = nan16 != 0;
  for (; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    nan |= x[i] != x[i];
  }
  return nan ? group_params<float>(kNaN, kNaN, qmin, qmax, symmetric, eps)
             : group_params<float>(lo, hi, qmin, qmax, symmetric, eps);
}

FASTFT_AVX512 void quantize_avx512(const float* x, float* out, int64_t n, const GroupParams& p, float qmin,
                                   float qmax) {
  const __m512 inv = _mm512_set1_ps(p.inv), scale = _mm512_set1_ps(p.scale), zp = _mm512_set1_ps(p.zero_point);
  const __m512 lo = _mm512_set1_ps(qmin), hi = _mm512_set1_ps(qmax);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // as in quantize_avx2: the value goes second so NaN stays NaN
    const __m512 q = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_add_ps(r, zp)));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_sub_ps(q, zp), scale));
  }
  quantize_avx2(x + i, out + i, n - i, p, qmin, qmax);
}

FASTFT_AVX512 void backward_avx512(const float* grad, const float* x, float* out, int64_t n, const GroupParams& p,
                                   float qmin, float qmax) {
  const __m512 inv = _mm512_set1_ps(p.inv), scale = _mm512_set1_ps(p.scale), zp = _mm512_set1_ps(p.zero_point);
  const __m512 lo = _mm512_set1_ps(qmin), hi = _mm512_set1_ps(qmax);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 pre = _mm512_add_ps(_mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv),
                                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zp);
    const __mmask16 keep = _mm512_cmp_ps_mask(pre, lo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(pre, hi, _CMP_LE_OQ);
    const __m512 passed = _mm512_maskz_mul_ps(keep, _mm512_loadu_ps(grad + i), scale);
    _mm512_storeu_ps(out + i, _mm512_mul_ps(passed, inv));
  }
  backward_avx2(grad + i, x + i, out + i, n - i, p, qmin, qmax);
}

GroupParams scan_group_vector(const float* x, int64_t n, float qmin, float qmax, bool symmetric, float eps) {
  return cpu_has_avx512() ? scan_group_avx512(x, n, qmin, qmax, symmetric, eps)
                          : scan_group_avx2(x, n, qmin, qmax, symmetric, eps);
}

void quantize_vector(const float* x, float* out, int64_t n, const GroupParams& p, float qmin, float qmax) {
  if (cpu_has_avx512()) {
    quantize_avx512(x, out, n, p, qmin, qmax);
  } else {
    quantize_avx2(x, out, n, p, qmin, qmax);
  }
}

void backward_vector(const float* grad, const float* x, float* out, int64_t n, const GroupParams& p, float qmin,
                     float qmax) {
  if (cpu_has_avx512()) {
    backward_avx512(grad, x, out, n, p, qmin, qmax);
  } else {
    backward_avx2(grad, x, out, n, p, qmin, qmax);
  }
}
#endif

template <typename T>
void quantize_group(const T* x, T* out, int64_t n, float qmin, float qmax, bool symmetric, float eps) {
  quantize_scalar<T>(x, out, 0, n, scan_group<T>(x, n, qmin, qmax, symmetric, eps), qmin, qmax);
}

template <typename T>
void backward_group(const T* grad, const T* x, T* out, int64_t n, float qmin, float qmax, bool symmetric, float eps) {
  backward_scalar<T>(grad, x, out, 0, n, scan_group<T>(x, n, qmin, qmax, symmetric, eps), qmin, qmax);
}

#ifdef FASTFT_X86
template <>
void quantize_group<float>(const float* x, float* out, int64_t n, float qmin, float qmax, bool symmetric, float eps) {
  if (!cpu_has_avx2()) {
    quantize_scalar<float>(x, out, 0, n, scan_group<float>(x, n, qmin, qmax, symmetric, eps), qmin, qmax);
    return;
  }
  quantize_vector(x, out, n, scan_group_vector(x, n, qmin, qmax, symmetric, eps), qmin, qmax);
}

template <>
void backward_group<float>(const float* grad, const float* x, float* out, int64_t n, float qmin, float qmax,
                           bool symmetric, float eps) {
  if (!cpu_has_avx2()) {
    backward_scalar<float>(grad, x, out, 0, n, scan_group<float>(x, n, qmin, qmax, symmetric, eps), qmin, qmax);
    return;
  }
  backward_vector(grad, x, out, n, scan_group_vector(x, n, qmin, qmax, symmetric, eps), qmin, qmax);
}
#endif

// Forward with known parameters (learned scales).
template <typename T>
void quantize_with(const T* x, T* out, int64_t n, const GroupParams& p, float qmin, float qmax) {
  quantize_scalar<T>(x, out, 0, n, p, qmin, qmax);
}

#ifdef FASTFT_X86
template <>
void quantize_with<float>(const float* x, float* out, int64_t n, const GroupParams& p, float qmin, float qmax) {
  if (cpu_has_avx2()) {
    quantize_vector(x, out, n, p, qmin, qmax);
  } else {
    quantize_scalar<float>(x, out, 0, n, p, qmin, qmax);
  }
}
#endif

void check(const at::Tensor& x, int64_t group, int64_t qmin, int64_t qmax) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "fake_quantize: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(group > 0 && x.numel() % group == 0, "fake_quantize: numel ", x.numel(),
              " is not a multiple of the group length ", group);
  TORCH_CHECK(qmin < qmax, "fake_quantize: need qmin < qmax, got ", qmin, ", ", qmax);
}

}  // namespace

at::Tensor fake_quantize_cpu(const at::Tensor& x_in, int64_t group, int64_t qmin_i, int64_t qmax_i, bool symmetric,
                             double eps_d) {
  check(x_in, group, qmin_i, qmax_i);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = empty_huge_pages(x.sizes(), x.options());
  const float qmin = static_cast<float>(qmin_i), qmax = static_cast<float>(qmax_i), eps = static_cast<float>(eps_d);
  const int64_t groups = x.numel() / group;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quantize_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, groups, std::max<int64_t>(1, 16384 / group), [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        quantize_group<scalar_t>(src + g * group, dst + g * group, group, qmin, qmax, symmetric, eps);
      }
    });
  });
  return out;
}

at::Tensor fake_quantize_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, int64_t group, int64_t qmin_i,
                                      int64_t qmax_i, bool symmetric, double eps_d) {
  check(x_in, group, qmin_i, qmax_i);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes() && grad_in.scalar_type() == x_in.scalar_type(),
              "fake_quantize_backward: grad must have x's shape and dtype");
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  at::Tensor out = empty_huge_pages(x.sizes(), x.options());
  const float qmin = static_cast<float>(qmin_i), qmax = static_cast<float>(qmax_i), eps = static_cast<float>(eps_d);
  const int64_t groups = x.numel() / group;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quantize_backward_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    const scalar_t* gsrc = grad.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, groups, std::max<int64_t>(1, 16384 / group), [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        backward_group<scalar_t>(gsrc + g * group, src + g * group, dst + g * group, group, qmin, qmax, symmetric,
                                 eps);
      }
    });
  });
  return out;
}

namespace {

void check_qparams(const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                   int64_t group) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() * group == x.numel(),
              "fake_quantize_with_scale: scale must be float32 with one value per group");
  TORCH_CHECK(!zero_point.has_value() ||
                  (zero_point->scalar_type() == at::kFloat && zero_point->numel() == scale.numel()),
              "fake_quantize_with_scale: zero_point must be float32 with one value per group");
}

}  // namespace

at::Tensor fake_quantize_with_scale_cpu(const at::Tensor& x_in, const at::Tensor& scale_in,
                                        const std::optional<at::Tensor>& zero_point_in, int64_t group, int64_t qmin_i,
                                        int64_t qmax_i) {
  check(x_in, group, qmin_i, qmax_i);
  check_qparams(x_in, scale_in, zero_point_in, group);
  const at::Tensor x = x_in.contiguous(), scale = scale_in.contiguous();
  const at::Tensor zero_point = zero_point_in.has_value() ? zero_point_in->contiguous() : at::Tensor();
  at::Tensor out = empty_huge_pages(x.sizes(), x.options());
  const float qmin = static_cast<float>(qmin_i), qmax = static_cast<float>(qmax_i);
  const float* scales = scale.const_data_ptr<float>();
  const float* zero_points = zero_point.defined() ? zero_point.const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quantize_with_scale_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel() / group, std::max<int64_t>(1, 16384 / group), [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const GroupParams p{scales[g], 1.f / scales[g], zero_points != nullptr ? zero_points[g] : 0.f};
        quantize_with<scalar_t>(src + g * group, dst + g * group, group, p, qmin, qmax);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_with_scale_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& scale_in,
    const std::optional<at::Tensor>& zero_point_in, int64_t group, int64_t qmin_i, int64_t qmax_i) {
  check(x_in, group, qmin_i, qmax_i);
  check_qparams(x_in, scale_in, zero_point_in, group);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes() && grad_in.scalar_type() == x_in.scalar_type(),
              "fake_quantize_with_scale_backward: grad must have x's shape and dtype");
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous(), scale = scale_in.contiguous();
  const at::Tensor zero_point = zero_point_in.has_value() ? zero_point_in->contiguous() : at::Tensor();
  at::Tensor dx = empty_huge_pages(x.sizes(), x.options());
  at::Tensor dscale = at::empty_like(scale);
  at::Tensor dzero_point = zero_point.defined() ? at::empty_like(zero_point) : at::empty({0}, scale.options());
  const float qmin = static_cast<float>(qmin_i), qmax = static_cast<float>(qmax_i);
  const float* scales = scale.const_data_ptr<float>();
  const float* zero_points = zero_point.defined() ? zero_point.const_data_ptr<float>() : nullptr;
  float* dscales = dscale.mutable_data_ptr<float>();
  float* dzero_points = zero_point.defined() ? dzero_point.mutable_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quantize_with_scale_backward", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    const scalar_t* gsrc = grad.const_data_ptr<scalar_t>();
    scalar_t* dst = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel() / group, std::max<int64_t>(1, 16384 / group), [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const float s = scales[g], inv = 1.f / s;
        const float zp = zero_points != nullptr ? zero_points[g] : 0.f, zp_t = round_to<scalar_t>(zp);
        const scalar_t* xg = src + g * group;
        const scalar_t* gg = gsrc + g * group;
        scalar_t* og = dst + g * group;
        // sum dy * (T(q) - T(zp)), sum p_in * x, sum p_in, sum p (p = T(dy * s), p_in: p inside the range)
        double direct = 0, via_inverse = 0, passed_sum = 0, all_sum = 0;
        for (int64_t i = 0; i < group; ++i) {
          const float xv = static_cast<float>(xg[i]), gv = static_cast<float>(gg[i]);
          const float pre = std::nearbyint(xv * inv) + zp;
          const bool inside = pre >= qmin && pre <= qmax;
          const float p = round_to<scalar_t>(gv * s), passed = inside ? p : 0.f;
          og[i] = static_cast<scalar_t>(passed * inv);
          const float dequantized = round_to<scalar_t>(round_to<scalar_t>(clamp_keep_nan(pre, qmin, qmax)) - zp_t);
          direct += static_cast<double>(gv) * dequantized;
          via_inverse += static_cast<double>(passed) * xv;
          passed_sum += passed;
          all_sum += p;
        }
        dscales[g] = static_cast<float>(direct - via_inverse * static_cast<double>(inv) * inv);
        if (dzero_points != nullptr) {
          dzero_points[g] = static_cast<float>(passed_sum - round_to<scalar_t>(static_cast<float>(all_sum)));
        }
      }
    });
  });
  return {dx, dscale, dzero_point};
}

}  // namespace fastft
