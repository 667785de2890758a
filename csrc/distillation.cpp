// Per-row soft term of the distillation loss and its gradient with respect to the student logits, in four passes
// over a row held in cache: maxima, normalizers, terms (+ the centring sum), gradient. AVX-512 or AVX2 (chosen at run
// time) with polynomial exp/log (Cephes-style, ~1e-7 relative); scalar libm elsewhere. Formulas:
// fastft/reference/distillation.py.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "distillation_cpu.h"
#include "nf4_codec.h"
#include "vec_math.h"

namespace fastft {
namespace {

struct RowOut {
  double soft = 0, centre = 0;
};

// Scalar pieces, shared by the scalar path (from element 0) and the vector path's tail (from the last multiple of 8).
inline void tail_max(const float* zs, const float* zt, int64_t j0, int64_t V, float inv_t, float& max_s,
                     float& max_t) {
  for (int64_t j = j0; j < V; ++j) {
    max_s = std::max(max_s, zs[j] * inv_t);
    max_t = std::max(max_t, zt[j] * inv_t);
  }
}

inline void tail_sums(const float* zs, const float* zt, int64_t j0, int64_t V, float inv_t, float max_s, float max_t,
                      double& total_s, double& total_t) {
  for (int64_t j = j0; j < V; ++j) {
    total_s += std::exp(zs[j] * inv_t - max_s);
    total_t += std::exp(zt[j] * inv_t - max_t);
  }
}

inline void tail_centre(float* zs, const float* zt, int64_t j0, int64_t V, float scale, float centre) {
  for (int64_t j = j0; j < V; ++j) zs[j] = scale * zt[j] * (zs[j] - centre);
}

inline float log_or_zero(float beta, bool complement) {  // log(beta) / log(1 - beta) for 0 < beta < 1
  if (!(beta > 0.f && beta < 1.f)) return 0.f;
  return complement ? std::log1p(-beta) : std::log(beta);
}

// The per-element terms (the scalar path, and the vector path's tail).
inline void terms_scalar(float* zs, float* zt, int64_t j0, int64_t V, float inv_t, float lse_s, float lse_t, float beta,
                         float log_b, float log_1mb, float scale, RowOut& out) {
  for (int64_t j = j0; j < V; ++j) {
    const float s = zs[j] * inv_t - lse_s, t = zt[j] * inv_t - lse_t;
    const float q = std::exp(s), p = std::exp(t);
    if (beta == 0.f) {
      out.soft += static_cast<double>(p * (t - s));
      zs[j] = scale * (q - p);
      continue;
    }
    float g;
    if (beta == 1.f) {
      g = s - t;
      out.soft += static_cast<double>(q * g);
    } else {
      const float a = s + log_1mb, b = t + log_b;
      const float log_m = std::max(a, b) + std::log1p(std::exp(-std::fabs(a - b)));
      out.soft += static_cast<double>(beta * p * (t - log_m) + (1.f - beta) * q * (s - log_m));
      g = (1.f - beta) * (s - log_m);
    }
    out.centre += static_cast<double>(q * g);
    zs[j] = g;
    zt[j] = q;
  }
}

#ifdef FASTFT_X86
// log(x) for x in [1, 2] (the argument of log1p(exp(-|d|)))
FASTFT_AVX2 inline __m256 log_1_2(__m256 x) {
  // x = m * 2^e with m in [sqrt(1/2), sqrt(2)); log x = e ln2 + log(m), log(1 + f) by a polynomial in f = m - 1
  const __m256 sqrt2 = _mm256_set1_ps(1.41421356f);
  const __m256 big = _mm256_cmp_ps(x, sqrt2, _CMP_GE_OQ);
  const __m256 e = _mm256_and_ps(big, _mm256_set1_ps(1.f));
  const __m256 m = _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(0.5f)), big);
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.f));
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(3.3333331174e-1f));
  const __m256 f2 = _mm256_mul_ps(f, f);
  y = _mm256_mul_ps(_mm256_mul_ps(y, f), f2);                       // f^3 P(f)
  y = _mm256_fnmadd_ps(f2, _mm256_set1_ps(0.5f), y);                // - f^2 / 2
  y = _mm256_add_ps(y, f);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693147180559945f), y);
}

FASTFT_AVX2 void soft_row_avx2(float* zs, float* zt, int64_t V, float inv_t, float beta, float scale, float& loss) {
  const int64_t body = V / 8 * 8;
  const __m256 vinv = _mm256_set1_ps(inv_t);
  __m256 vms = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), vmt = vms;
  for (int64_t j = 0; j < body; j += 8) {
    vms = _mm256_max_ps(vms, _mm256_mul_ps(_mm256_loadu_ps(zs + j), vinv));
    vmt = _mm256_max_ps(vmt, _mm256_mul_ps(_mm256_loadu_ps(zt + j), vinv));
  }
  float max_s = hmax(vms), max_t = hmax(vmt);
  tail_max(zs, zt, body, V, inv_t, max_s, max_t);
  __m256d sum_s = _mm256_setzero_pd(), sum_t = _mm256_setzero_pd();
  const __m256 vmax_s = _mm256_set1_ps(max_s), vmax_t = _mm256_set1_ps(max_t);
  for (int64_t j = 0; j < body; j += 8) {
    sum_s = add8_pd(sum_s, exp8(_mm256_fmsub_ps(_mm256_loadu_ps(zs + j), vinv, vmax_s)));
    sum_t = add8_pd(sum_t, exp8(_mm256_fmsub_ps(_mm256_loadu_ps(zt + j), vinv, vmax_t)));
  }
  double total_s = hsum_pd(sum_s), total_t = hsum_pd(sum_t);
  tail_sums(zs, zt, body, V, inv_t, max_s, max_t, total_s, total_t);
  const float lse_s = max_s + static_cast<float>(std::log(total_s));
  const float lse_t = max_t + static_cast<float>(std::log(total_t));
  const float log_b = log_or_zero(beta, false), log_1mb = log_or_zero(beta, true);
  const __m256 vlse_s = _mm256_set1_ps(lse_s), vlse_t = _mm256_set1_ps(lse_t), vscale = _mm256_set1_ps(scale);
  const __m256 vbeta = _mm256_set1_ps(beta), v1mb = _mm256_set1_ps(1.f - beta);
  const __m256 vlog_b = _mm256_set1_ps(log_b), vlog_1mb = _mm256_set1_ps(log_1mb);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256d soft = _mm256_setzero_pd(), centre = _mm256_setzero_pd();
  for (int64_t j = 0; j < body; j += 8) {
    const __m256 s = _mm256_fmsub_ps(_mm256_loadu_ps(zs + j), vinv, vlse_s);
    const __m256 t = _mm256_fmsub_ps(_mm256_loadu_ps(zt + j), vinv, vlse_t);
    const __m256 q = exp8(s), p = exp8(t);
    if (beta == 0.f) {
      soft = add8_pd(soft, _mm256_mul_ps(p, _mm256_sub_ps(t, s)));
      _mm256_storeu_ps(zs + j, _mm256_mul_ps(vscale, _mm256_sub_ps(q, p)));
      continue;
    }
    __m256 g;
    if (beta == 1.f) {
      g = _mm256_sub_ps(s, t);
      soft = add8_pd(soft, _mm256_mul_ps(q, g));
    } else {
      const __m256 a = _mm256_add_ps(s, vlog_1mb), b = _mm256_add_ps(t, vlog_b);
      const __m256 gap = _mm256_and_ps(_mm256_sub_ps(a, b), abs_mask);
      const __m256 log_m = _mm256_add_ps(_mm256_max_ps(a, b),
                                         log_1_2(_mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gap)))));
      const __m256 teacher_term = _mm256_mul_ps(_mm256_mul_ps(vbeta, p), _mm256_sub_ps(t, log_m));
      const __m256 student_term = _mm256_mul_ps(_mm256_mul_ps(v1mb, q), _mm256_sub_ps(s, log_m));
      soft = add8_pd(soft, _mm256_add_ps(teacher_term, student_term));
      g = _mm256_mul_ps(v1mb, _mm256_sub_ps(s, log_m));
    }
    centre = add8_pd(centre, _mm256_mul_ps(q, g));
    _mm256_storeu_ps(zs + j, g);
    _mm256_storeu_ps(zt + j, q);
  }
  RowOut rest;
  terms_scalar(zs, zt, body, V, inv_t, lse_s, lse_t, beta, log_b, log_1mb, scale, rest);
  loss = static_cast<float>(hsum_pd(soft) + rest.soft);
  if (beta == 0.f) return;
  const float total_centre = static_cast<float>(hsum_pd(centre) + rest.centre);
  const __m256 vcentre = _mm256_set1_ps(total_centre);
  for (int64_t j = 0; j < body; j += 8) {
    const __m256 g = _mm256_loadu_ps(zs + j), q = _mm256_loadu_ps(zt + j);
    _mm256_storeu_ps(zs + j, _mm256_mul_ps(vscale, _mm256_mul_ps(q, _mm256_sub_ps(g, vcentre))));
  }
  tail_centre(zs, zt, body, V, scale, total_centre);
}

// The same four passes on 16 lanes (the same polynomials, so the two paths agree to their rounding). The ragged end
// of a row runs on masked loads and stores instead of the scalar tail.
FASTFT_AVX512 inline __m512 log16_1_2(__m512 x) {  // log(x) for x in [1, 2], as log_1_2
  const __mmask16 big = _mm512_cmp_ps_mask(x, _mm512_set1_ps(1.41421356f), _CMP_GE_OQ);
  const __m512 e = _mm512_maskz_mov_ps(big, _mm512_set1_ps(1.f));
  const __m512 m = _mm512_mask_mul_ps(x, big, x, _mm512_set1_ps(0.5f));
  const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.f));
  __m512 y = _mm512_set1_ps(7.0376836292e-2f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.1514610310e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.1676998740e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.2420140846e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.4249322787e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.6668057665e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.0000714765e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-2.4999993993e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(3.3333331174e-1f));
  const __m512 f2 = _mm512_mul_ps(f, f);
  y = _mm512_mul_ps(_mm512_mul_ps(y, f), f2);
  y = _mm512_fnmadd_ps(f2, _mm512_set1_ps(0.5f), y);
  y = _mm512_add_ps(y, f);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693147180559945f), y);
}

FASTFT_AVX512 void soft_row_avx512(float* zs, float* zt, int64_t V, float inv_t, float beta, float scale,
                                   float& loss) {
  const __m512 vinv = _mm512_set1_ps(inv_t), minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vms = minus_inf, vmt = minus_inf;
  for (int64_t j = 0; j < V; j += 16) {
    const __mmask16 k = lanes(j, V);
    vms = _mm512_max_ps(vms, _mm512_mul_ps(_mm512_mask_loadu_ps(minus_inf, k, zs + j), vinv));
    vmt = _mm512_max_ps(vmt, _mm512_mul_ps(_mm512_mask_loadu_ps(minus_inf, k, zt + j), vinv));
  }
  const float max_s = _mm512_reduce_max_ps(vms), max_t = _mm512_reduce_max_ps(vmt);
  __m512d sum_s = _mm512_setzero_pd(), sum_t = _mm512_setzero_pd();
  const __m512 vmax_s = _mm512_set1_ps(max_s), vmax_t = _mm512_set1_ps(max_t);
  for (int64_t j = 0; j < V; j += 16) {
    const __mmask16 k = lanes(j, V);
    const __m512 es = _mm512_maskz_mov_ps(k, exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, zs + j), vinv, vmax_s)));
    const __m512 et = _mm512_maskz_mov_ps(k, exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, zt + j), vinv, vmax_t)));
    sum_s = add16_pd(sum_s, es);
    sum_t = add16_pd(sum_t, et);
  }
  const float lse_s = max_s + static_cast<float>(std::log(_mm512_reduce_add_pd(sum_s)));
  const float lse_t = max_t + static_cast<float>(std::log(_mm512_reduce_add_pd(sum_t)));
  const float log_b = log_or_zero(beta, false), log_1mb = log_or_zero(beta, true);
  const __m512 vlse_s = _mm512_set1_ps(lse_s), vlse_t = _mm512_set1_ps(lse_t), vscale = _mm512_set1_ps(scale);
  const __m512 vbeta = _mm512_set1_ps(beta), v1mb = _mm512_set1_ps(1.f - beta);
  const __m512 vlog_b = _mm512_set1_ps(log_b), vlog_1mb = _mm512_set1_ps(log_1mb);
  __m512d soft = _mm512_setzero_pd(), centre = _mm512_setzero_pd();
  for (int64_t j = 0; j < V; j += 16) {
    const __mmask16 k = lanes(j, V);
    const __m512 s = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, zs + j), vinv, vlse_s);
    const __m512 t = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, zt + j), vinv, vlse_t);
    const __m512 q = exp16(s), p = exp16(t);
    if (beta == 0.f) {
      soft = add16_pd(soft, _mm512_maskz_mul_ps(k, p, _mm512_sub_ps(t, s)));
      _mm512_mask_storeu_ps(zs + j, k, _mm512_mul_ps(vscale, _mm512_sub_ps(q, p)));
      continue;
    }
    __m512 g;
    if (beta == 1.f) {
      g = _mm512_sub_ps(s, t);
      soft = add16_pd(soft, _mm512_maskz_mul_ps(k, q, g));
    } else {
      const __m512 a = _mm512_add_ps(s, vlog_1mb), b = _mm512_add_ps(t, vlog_b);
      const __m512 gap = _mm512_abs_ps(_mm512_sub_ps(a, b));
      const __m512 log_m = _mm512_add_ps(_mm512_max_ps(a, b),
                                         log16_1_2(_mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gap)))));
      const __m512 teacher_term = _mm512_mul_ps(_mm512_mul_ps(vbeta, p), _mm512_sub_ps(t, log_m));
      const __m512 student_term = _mm512_mul_ps(_mm512_mul_ps(v1mb, q), _mm512_sub_ps(s, log_m));
      soft = add16_pd(soft, _mm512_maskz_add_ps(k, teacher_term, student_term));
      g = _mm512_mul_ps(v1mb, _mm512_sub_ps(s, log_m));
    }
    centre = add16_pd(centre, _mm512_maskz_mul_ps(k, q, g));
    _mm512_mask_storeu_ps(zs + j, k, g);
    _mm512_mask_storeu_ps(zt + j, k, q);
  }
  loss = static_cast<float>(_mm512_reduce_add_pd(soft));
  if (beta == 0.f) return;
  const __m512 vcentre = _mm512_set1_ps(static_cast<float>(_mm512_reduce_add_pd(centre)));
  for (int64_t j = 0; j < V; j += 16) {
    const __mmask16 k = lanes(j, V);
    const __m512 g = _mm512_maskz_loadu_ps(k, zs + j), q = _mm512_maskz_loadu_ps(k, zt + j);
    _mm512_mask_storeu_ps(zs + j, k, _mm512_mul_ps(vscale, _mm512_mul_ps(q, _mm512_sub_ps(g, vcentre))));
  }
}
#endif

void soft_row_scalar(float* zs, float* zt, int64_t V, float inv_t, float beta, float scale, float& loss) {
  float max_s = -std::numeric_limits<float>::infinity(), max_t = max_s;
  tail_max(zs, zt, 0, V, inv_t, max_s, max_t);
  double total_s = 0, total_t = 0;
  tail_sums(zs, zt, 0, V, inv_t, max_s, max_t, total_s, total_t);
  const float lse_s = max_s + static_cast<float>(std::log(total_s));
  const float lse_t = max_t + static_cast<float>(std::log(total_t));
  RowOut out;
  terms_scalar(zs, zt, 0, V, inv_t, lse_s, lse_t, beta, log_or_zero(beta, false), log_or_zero(beta, true), scale,
               out);
  loss = static_cast<float>(out.soft);
  if (beta == 0.f) return;
  tail_centre(zs, zt, 0, V, scale, static_cast<float>(out.centre));
}

}  // namespace

at::Tensor distill_soft_rows_cpu(at::Tensor& student_logits, at::Tensor& teacher_logits, double temperature,
                                 double beta, double grad_scale) {
  TORCH_CHECK(student_logits.scalar_type() == at::kFloat && teacher_logits.scalar_type() == at::kFloat,
              "distill_soft_rows: logits must be float32");
  TORCH_CHECK(student_logits.is_contiguous() && teacher_logits.is_contiguous(), "logits must be contiguous");
  const int64_t rows = student_logits.size(0), V = student_logits.size(1);
  at::Tensor loss = at::empty({rows}, student_logits.options());
  float* zs = student_logits.mutable_data_ptr<float>();
  float* zt = teacher_logits.mutable_data_ptr<float>();
  float* out = loss.mutable_data_ptr<float>();
  const float inv_t = static_cast<float>(1.0 / temperature), b = static_cast<float>(beta);
  const float scale = static_cast<float>(grad_scale);
  const bool vector = cpu_has_avx2(), wide = cpu_has_avx512();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
#ifdef FASTFT_X86
      if (wide) {
        soft_row_avx512(zs + r * V, zt + r * V, V, inv_t, b, scale, out[r]);
        continue;
      }
      if (vector) {
        soft_row_avx2(zs + r * V, zt + r * V, V, inv_t, b, scale, out[r]);
        continue;
      }
#endif
      soft_row_scalar(zs + r * V, zt + r * V, V, inv_t, b, scale, out[r]);
    }
  });
  return loss;
}

}  // namespace fastft
