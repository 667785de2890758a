// Per-row step of the fused linear log-probabilities: for each row of a logits tile, an online (one-pass)
// log-sum-exp over the vocabulary that also carries sum_j e^(z_j - m) (z_j - m) for the entropy (both rescaled
// whenever the running maximum m grows), then, for the backward, one pass writing the gradient over the row.
// AVX-512 (masked ragged end) or AVX2 (scalar tail), chosen at run time, else scalar; lanes accumulate in fp32 and
// are combined in fp64. Formulas: fastft/reference/logprobs.py.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "logprobs_cpu.h"
#include "vec_math.h"

namespace fastft {
namespace {

// Running statistics of a row (or of one lane): max m, s = sum e^(z - m), t = sum e^(z - m) (z - m).
struct Stats {
  double m = -DBL_MAX, s = 0, t = 0;

  void merge(double m2, double s2, double t2) {
    if (s2 == 0) return;
    const double top = std::max(m, m2);
    const double c1 = std::exp(m - top), c2 = std::exp(m2 - top);
    t = c1 * (t + s * (m - top)) + c2 * (t2 + s2 * (m2 - top));
    s = s * c1 + s2 * c2;
    m = top;
  }
};

void stats_scalar(const float* z, int64_t j0, int64_t V, Stats& st) {
  for (int64_t j = j0; j < V; ++j) st.merge(z[j], 1.0, 0.0);
}

// dz over [j0, V): -p (g + e (log p + H)), log p = z - lse.
void grad_scalar(float* z, int64_t j0, int64_t V, float lse, float g, float e, float h) {
  for (int64_t j = j0; j < V; ++j) {
    const float lp = z[j] - lse;
    z[j] = -std::exp(lp) * (g + e * (lp + h));
  }
}

#ifdef FASTFT_X86
template <bool kEntropy>
FASTFT_AVX512 void stats_avx512(const float* z, int64_t V, Stats& st) {
  __m512 vm = _mm512_set1_ps(-FLT_MAX), vs = _mm512_setzero_ps(), vt = _mm512_setzero_ps();
  for (int64_t j = 0; j < V; j += 16) {
    const __mmask16 k = lanes(j, V);
    const __m512 x = _mm512_maskz_loadu_ps(k, z + j);
    const __m512 top = _mm512_mask_max_ps(vm, k, vm, x);  // lanes past the row keep their max: d = 0, c = 1
    const __m512 d = _mm512_sub_ps(vm, top);
    const __m512 c = exp16(d);
    const __m512 xm = _mm512_sub_ps(x, top);
    const __m512 e = _mm512_maskz_mov_ps(k, exp16(xm));
    if (kEntropy) vt = _mm512_fmadd_ps(e, xm, _mm512_mul_ps(c, _mm512_fmadd_ps(vs, d, vt)));
    vs = _mm512_fmadd_ps(vs, c, e);
    vm = top;
  }
  alignas(64) float m[16], s[16], t[16];
  _mm512_store_ps(m, vm);
  _mm512_store_ps(s, vs);
  _mm512_store_ps(t, vt);
  for (int l = 0; l < 16; ++l) st.merge(m[l], s[l], t[l]);
}

FASTFT_AVX512 void grad_avx512(float* z, int64_t V, float lse, float g, float e, float h) {
  const __m512 vlse = _mm512_set1_ps(lse), vg = _mm512_set1_ps(g), ve = _mm512_set1_ps(e), vh = _mm512_set1_ps(h);
  for (int64_t j = 0; j < V; j += 16) {
    const __mmask16 k = lanes(j, V);
    const __m512 lp = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, z + j), vlse);
    const __m512 w = _mm512_fmadd_ps(ve, _mm512_add_ps(lp, vh), vg);
    _mm512_mask_storeu_ps(z + j, k, _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(exp16(lp), w)));
  }
}

template <bool kEntropy>
FASTFT_AVX2 void stats_avx2(const float* z, int64_t V, Stats& st) {
  const int64_t body = V / 8 * 8;
  __m256 vm = _mm256_set1_ps(-FLT_MAX), vs = _mm256_setzero_ps(), vt = _mm256_setzero_ps();
  for (int64_t j = 0; j < body; j += 8) {
    const __m256 x = _mm256_loadu_ps(z + j);
    const __m256 top = _mm256_max_ps(vm, x);
    const __m256 d = _mm256_sub_ps(vm, top);
    const __m256 c = exp8(d);
    const __m256 xm = _mm256_sub_ps(x, top);
    const __m256 e = exp8(xm);
    if (kEntropy) vt = _mm256_fmadd_ps(e, xm, _mm256_mul_ps(c, _mm256_fmadd_ps(vs, d, vt)));
    vs = _mm256_fmadd_ps(vs, c, e);
    vm = top;
  }
  alignas(32) float m[8], s[8], t[8];
  _mm256_store_ps(m, vm);
  _mm256_store_ps(s, vs);
  _mm256_store_ps(t, vt);
  for (int l = 0; l < 8; ++l) st.merge(m[l], s[l], t[l]);
  stats_scalar(z, body, V, st);
}

FASTFT_AVX2 void grad_avx2(float* z, int64_t V, float lse, float g, float e, float h) {
  const int64_t body = V / 8 * 8;
  const __m256 vlse = _mm256_set1_ps(lse), vg = _mm256_set1_ps(g), ve = _mm256_set1_ps(e), vh = _mm256_set1_ps(h);
  for (int64_t j = 0; j < body; j += 8) {
    const __m256 lp = _mm256_sub_ps(_mm256_loadu_ps(z + j), vlse);
    const __m256 w = _mm256_fmadd_ps(ve, _mm256_add_ps(lp, vh), vg);
    _mm256_storeu_ps(z + j, _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(exp8(lp), w)));
  }
  grad_scalar(z, body, V, lse, g, e, h);
}
#endif

Stats row_stats(const float* z, int64_t V, bool entropy, bool wide, bool vector) {
  Stats st;
#ifdef FASTFT_X86
  if (wide) {
    entropy ? stats_avx512<true>(z, V, st) : stats_avx512<false>(z, V, st);
    return st;
  }
  if (vector) {
    entropy ? stats_avx2<true>(z, V, st) : stats_avx2<false>(z, V, st);
    return st;
  }
#endif
  stats_scalar(z, 0, V, st);
  return st;
}

void row_grad(float* z, int64_t V, float lse, float g, float e, float h, bool wide, bool vector) {
#ifdef FASTFT_X86
  if (wide) return grad_avx512(z, V, lse, g, e, h);
  if (vector) return grad_avx2(z, V, lse, g, e, h);
#endif
  grad_scalar(z, 0, V, lse, g, e, h);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_rows_cpu(at::Tensor& z, const at::Tensor& labels, bool want_entropy,
                                                                const std::optional<at::Tensor>& grad_logprob,
                                                                const std::optional<at::Tensor>& grad_entropy) {
  TORCH_CHECK(z.scalar_type() == at::kFloat && z.dim() == 2 && z.is_contiguous(),
              "logprob_rows: z must be a contiguous 2-D float32 tensor");
  const int64_t rows = z.size(0), V = z.size(1);
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.numel() == rows, "logprob_rows: labels must be int64 (rows,)");
  const bool with_grad = grad_logprob.has_value();
  const bool grad_ent = grad_entropy.has_value();
  TORCH_CHECK(!grad_ent || with_grad, "logprob_rows: grad_entropy needs grad_logprob");
  at::Tensor g_lp, g_ent;
  if (with_grad) g_lp = grad_logprob->to(at::kFloat).contiguous();
  if (grad_ent) g_ent = grad_entropy->to(at::kFloat).contiguous();
  const bool entropy = want_entropy || grad_ent;
  at::Tensor logprob = at::empty({rows}, z.options());
  at::Tensor ent = at::empty({want_entropy ? rows : 0}, z.options());
  at::Tensor top = at::empty({rows}, z.options());
  const at::Tensor y = labels.contiguous();
  float* zp = z.mutable_data_ptr<float>();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  float* lp_out = logprob.mutable_data_ptr<float>();
  float* ent_out = want_entropy ? ent.mutable_data_ptr<float>() : nullptr;
  float* top_out = top.mutable_data_ptr<float>();
  const float* gp = with_grad ? g_lp.const_data_ptr<float>() : nullptr;
  const float* ep = grad_ent ? g_ent.const_data_ptr<float>() : nullptr;
  const bool vector = cpu_has_avx2(), wide = cpu_has_avx512();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = zp + r * V;
      const int64_t label = yp[r];
      TORCH_CHECK(label >= 0 && label < V, "logprob_rows: label ", label, " outside [0, ", V, ")");
      const Stats st = row_stats(row, V, entropy, wide, vector);
      const double log_s = std::log(st.s);
      const float lse = static_cast<float>(st.m + log_s);
      const float h = entropy ? static_cast<float>(log_s - st.t / st.s) : 0.f;
      lp_out[r] = row[label] - lse;
      top_out[r] = static_cast<float>(st.m) - lse;  // rounded as logprob is: equal when the label is the argmax
      if (want_entropy) ent_out[r] = h;
      if (!with_grad) continue;
      const float g = gp[r], e = grad_ent ? ep[r] : 0.f;
      row_grad(row, V, lse, g, e, h, wide, vector);
      row[label] += g;
    }
  });
  return {logprob, ent, top};
}

}  // namespace fastft
