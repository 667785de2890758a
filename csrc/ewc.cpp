// The EWC penalty pass on CPU: grads += lambda * F * (theta - theta*) and sum F * (theta - theta*)^2 over all the
// parameters in one parallel loop. The tensors are cut into segments of kSegment elements (a work list built once
// per call from their sizes); each thread takes whole segments and writes one fp64 partial sum per segment. Per
// element it reads theta, theta*, F and grad and writes grad: (2 * itemsize(param) + 2 * itemsize(storage)) bytes
// read and itemsize(param) written, memory-bound. fp32 compute runs 16 lanes at a time with AVX-512, 8 with AVX2
// (sub-block sums of at most kFlush elements in fp32, then fp64), the rest and fp64 compute in scalar code.
#include <ATen/Parallel.h>

#include <type_traits>

#include "ewc_cpu.h"
#include "nf4_codec.h"

namespace fastft {
namespace {

constexpr int64_t kSegment = 1 << 16;
constexpr int64_t kFlush = 1024;

template <typename P, typename S>
using compute_t = std::conditional_t<std::is_same_v<P, double> || std::is_same_v<S, double>, double, float>;

// Elements [e, end): the scalar loop (and the tail of the vector loops).
template <typename P, typename S>
double ewc_scalar(const P* p, P* g, const S* f, const S* a, int64_t e, int64_t end, double lam) {
  using C = compute_t<P, S>;
  const C lam_c = static_cast<C>(lam);
  double sum = 0;
  for (; e < end; ++e) {
    const C d = static_cast<C>(p[e]) - static_cast<C>(a[e]);
    const C fd = static_cast<C>(f[e]) * d;
    g[e] = static_cast<P>(static_cast<C>(g[e]) + lam_c * fd);
    sum += static_cast<double>(fd * d);
  }
  return sum;
}

#ifdef FASTFT_X86
template <typename P, typename S>
FASTFT_AVX512 int64_t ewc_avx512(const P* p, P* g, const S* f, const S* a, int64_t e, int64_t end, float lam,
                                 double& sum) {
  const __m512 lam16 = _mm512_set1_ps(lam);
  __m512d total = _mm512_setzero_pd();
  while (e + 16 <= end) {
    const int64_t stop = std::min(end, e + kFlush);
    __m512 acc = _mm512_setzero_ps();
    for (; e + 16 <= stop; e += 16) {
      const __m512 d = _mm512_sub_ps(load16(p + e), load16(a + e));
      const __m512 fd = _mm512_mul_ps(load16(f + e), d);
      acc = _mm512_add_ps(acc, _mm512_mul_ps(fd, d));
      store16(g + e, _mm512_add_ps(load16(g + e), _mm512_mul_ps(lam16, fd)));
    }
    total = _mm512_add_pd(total, _mm512_cvtps_pd(_mm512_castps512_ps256(acc)));
    total = _mm512_add_pd(total, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1))));
  }
  sum += _mm512_reduce_add_pd(total);
  return e;
}

template <typename P, typename S>
FASTFT_AVX2 int64_t ewc_avx2(const P* p, P* g, const S* f, const S* a, int64_t e, int64_t end, float lam,
                             double& sum) {
  const __m256 lam8 = _mm256_set1_ps(lam);
  __m256d total = _mm256_setzero_pd();
  while (e + 8 <= end) {
    const int64_t stop = std::min(end, e + kFlush);
    __m256 acc = _mm256_setzero_ps();
    for (; e + 8 <= stop; e += 8) {
      const __m256 d = _mm256_sub_ps(load8(p + e), load8(a + e));
      const __m256 fd = _mm256_mul_ps(load8(f + e), d);
      acc = _mm256_add_ps(acc, _mm256_mul_ps(fd, d));
      store8(g + e, _mm256_add_ps(load8(g + e), _mm256_mul_ps(lam8, fd)));
    }
    total = _mm256_add_pd(total, _mm256_cvtps_pd(_mm256_castps256_ps128(acc)));
    total = _mm256_add_pd(total, _mm256_cvtps_pd(_mm256_extractf128_ps(acc, 1)));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, total);
  sum += (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  return e;
}
#endif

template <typename P, typename S>
double ewc_segment(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& fisher,
                   const at::Tensor& anchor, int64_t begin, int64_t end, double lam) {
  const P* p = param.const_data_ptr<P>();
  P* g = grad.mutable_data_ptr<P>();
  const S* f = fisher.const_data_ptr<S>();
  const S* a = anchor.const_data_ptr<S>();
  double sum = 0;
  int64_t e = begin;
#ifdef FASTFT_X86
  if constexpr (std::is_same_v<compute_t<P, S>, float>) {
    if (cpu_has_avx512()) {
      e = ewc_avx512(p, g, f, a, e, end, static_cast<float>(lam), sum);
    } else if (cpu_has_avx2()) {
      e = ewc_avx2(p, g, f, a, e, end, static_cast<float>(lam), sum);
    }
  }
#endif
  return sum + ewc_scalar(p, g, f, a, e, end, lam);
}

template <typename P>
double ewc_segment_for(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& fisher,
                       const at::Tensor& anchor, int64_t begin, int64_t end, double lam) {
  switch (fisher.scalar_type()) {
    case at::kFloat: return ewc_segment<P, float>(param, grad, fisher, anchor, begin, end, lam);
    case at::kBFloat16: return ewc_segment<P, c10::BFloat16>(param, grad, fisher, anchor, begin, end, lam);
    case at::kDouble: return ewc_segment<P, double>(param, grad, fisher, anchor, begin, end, lam);
    default: TORCH_CHECK(false, "ewc_penalty: fisher / anchor must be fp32, bf16 or fp64, got ", fisher.scalar_type());
  }
}

double run_segment(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& fisher,
                   const at::Tensor& anchor, int64_t begin, int64_t end, double lam) {
  switch (param.scalar_type()) {
    case at::kFloat: return ewc_segment_for<float>(param, grad, fisher, anchor, begin, end, lam);
    case at::kBFloat16: return ewc_segment_for<c10::BFloat16>(param, grad, fisher, anchor, begin, end, lam);
    case at::kHalf: return ewc_segment_for<c10::Half>(param, grad, fisher, anchor, begin, end, lam);
    case at::kDouble: return ewc_segment_for<double>(param, grad, fisher, anchor, begin, end, lam);
    default: TORCH_CHECK(false, "ewc_penalty: parameters must be fp32, bf16, fp16 or fp64, got ", param.scalar_type());
  }
}

struct Segment {
  int64_t tensor, begin, end;
};

}  // namespace

at::Tensor ewc_penalty_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                           const std::vector<at::Tensor>& fisher, const std::vector<at::Tensor>& anchor,
                           double lam) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && fisher.size() == n && anchor.size() == n,
              "ewc_penalty: params, grads, fisher and anchor must be lists of one length");
  std::vector<Segment> segments;
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    for (const at::Tensor* t : {&params[i], &grads[i], &fisher[i], &anchor[i]}) {
      TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->numel() == numel,
                  "ewc_penalty: entry ", i, " must be contiguous CPU tensors of ", numel, " elements");
    }
    TORCH_CHECK(grads[i].scalar_type() == params[i].scalar_type() &&
                    anchor[i].scalar_type() == fisher[i].scalar_type(),
                "ewc_penalty: entry ", i, ": grad must have its parameter's dtype, anchor its Fisher's");
    for (int64_t b = 0; b < numel; b += kSegment) {
      segments.push_back({static_cast<int64_t>(i), b, std::min(numel, b + kSegment)});
    }
  }
  std::vector<double> partial(segments.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(segments.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) {
      const Segment& seg = segments[s];
      partial[s] = run_segment(params[seg.tensor], grads[seg.tensor], fisher[seg.tensor], anchor[seg.tensor],
                               seg.begin, seg.end, lam);
    }
  });
  double sum = 0;
  for (double v : partial) sum += v;
  const auto dtype = n > 0 && params[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::scalar_tensor(sum * (lam / 2), at::TensorOptions().dtype(dtype));
}

}  // namespace fastft
