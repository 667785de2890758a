// LoRA's counter-based dropout on CPU: keep element e iff mix(low(e) ^ mix(high(e) ^ mix(seed))) >= threshold,
// kept values scaled by 1/(1-p). The mask is never stored: backward regenerates it from the seed.
// The rank-r GEMMs with dropout run over row chunks of about 2 MiB: each chunk is dropped into a cache-sized buffer
// and multiplied there, so dropout(x) (or dropout(du A)) is never written whole.
// AVX-512: 16 elements at a time, AVX2: 8 (the mixer's 32-bit multiplies with vpmulld), fp32 / fp16 / bf16;
// ~1.5 ns per element in scalar code, where the pass should be memory bound.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>

#include "lora_cpu.h"
#include "memory.h"
#include "nf4_codec.h"

namespace fastft {
namespace {

inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  return h ^ (h >> 16);
}

// Elements [begin, end) of a chunk whose first element has flat index `offset` in the whole tensor (the mask is a
// function of the flat index): out = x * keep * scale, or out += that (ACCUMULATE, rounded to T first, as an
// out-of-place dropout followed by add_).
template <typename T, bool ACCUMULATE>
void dropout_range(const T* x, T* out, int64_t begin, int64_t end, int64_t offset, uint32_t seed_mix,
                   uint32_t threshold, at::opmath_type<T> scale) {
  using acc_t = at::opmath_type<T>;
  int64_t e = begin;
  while (e < end) {
    // Elements sharing the high 32 bits of their flat index share the inner mix.
    const int64_t stop = std::min(end, ((((offset + e) >> 32) + 1) << 32) - offset);
    const uint32_t inner = mix32(static_cast<uint32_t>((offset + e) >> 32) ^ seed_mix);
    for (; e < stop; ++e) {
      const uint32_t h = mix32(static_cast<uint32_t>(offset + e) ^ inner);
      const T v = h >= threshold ? static_cast<T>(static_cast<acc_t>(x[e]) * scale) : static_cast<T>(0);
      out[e] = ACCUMULATE ? static_cast<T>(static_cast<acc_t>(out[e]) + static_cast<acc_t>(v)) : v;
    }
  }
}

#ifdef FASTFT_X86
FASTFT_AVX2 inline __m256i mix32x8(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x7FEB352D));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x846CA68Bu)));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

// Elements [e, stop) sharing the high 32 bits of their flat index (inner = their inner mix); returns where it
// stopped (a multiple of 8 elements done, the rest left to the scalar loop). Accumulation: fp32 only.
template <typename T, bool ACCUMULATE>
FASTFT_AVX2 int64_t dropout_range_avx2(const T* x, T* out, int64_t e, int64_t stop, int64_t offset, uint32_t inner,
                                       uint32_t threshold, float scale) {
  static_assert(!ACCUMULATE || std::is_same_v<T, float>);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i inner8 = _mm256_set1_epi32(static_cast<int>(inner));
  const __m256i threshold8 = _mm256_set1_epi32(static_cast<int>(threshold));
  const __m256 scale8 = _mm256_set1_ps(scale);
  for (; e + 8 <= stop; e += 8) {
    const __m256i index =
        _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset + e))), lanes);
    const __m256i h = mix32x8(_mm256_xor_si256(index, inner8));
    // unsigned h >= threshold  <=>  max_u32(h, threshold) == h
    const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(h, threshold8), h);
    const __m256 kept = _mm256_and_ps(_mm256_mul_ps(load8(x + e), scale8), _mm256_castsi256_ps(keep));
    store8(out + e, ACCUMULATE ? _mm256_add_ps(load8(out + e), kept) : kept);
  }
  return e;
}

FASTFT_AVX512 inline __m512i mix32x16(__m512i h) {
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7FEB352D));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(0x846CA68Bu)));
  return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
}

// dropout_range_avx2, 16 elements at a time.
template <typename T, bool ACCUMULATE>
FASTFT_AVX512 int64_t dropout_range_avx512(const T* x, T* out, int64_t e, int64_t stop, int64_t offset,
                                           uint32_t inner, uint32_t threshold, float scale) {
  static_assert(!ACCUMULATE || std::is_same_v<T, float>);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i inner16 = _mm512_set1_epi32(static_cast<int>(inner));
  const __m512i threshold16 = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512 scale16 = _mm512_set1_ps(scale);
  for (; e + 16 <= stop; e += 16) {
    const __m512i index =
        _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset + e))), lanes);
    const __m512i h = mix32x16(_mm512_xor_si512(index, inner16));
    const __mmask16 keep = _mm512_cmpge_epu32_mask(h, threshold16);
    const __m512 kept = _mm512_maskz_mul_ps(keep, load16(x + e), scale16);
    store16(out + e, ACCUMULATE ? _mm512_add_ps(load16(out + e), kept) : kept);
  }
  return e;
}
#endif

template <typename T, bool ACCUMULATE>
void dropout_range_fast(const T* x, T* out, int64_t begin, int64_t end, int64_t offset, uint32_t seed_mix,
                        uint32_t threshold, at::opmath_type<T> scale) {
#ifdef FASTFT_X86
  if constexpr (!std::is_same_v<T, double> && (!ACCUMULATE || std::is_same_v<T, float>)) {
    if (cpu_has_avx2()) {
      const bool wide = cpu_has_avx512();
      const float scale32 = static_cast<float>(scale);
      int64_t e = begin;
      while (e < end) {
        const int64_t stop = std::min(end, ((((offset + e) >> 32) + 1) << 32) - offset);
        const uint32_t inner = mix32(static_cast<uint32_t>((offset + e) >> 32) ^ seed_mix);
        if (wide) e = dropout_range_avx512<T, ACCUMULATE>(x, out, e, stop, offset, inner, threshold, scale32);
        e = dropout_range_avx2<T, ACCUMULATE>(x, out, e, stop, offset, inner, threshold, scale32);
        dropout_range<T, ACCUMULATE>(x, out, e, stop, offset, seed_mix, threshold, scale);  // the < 8 left
        e = stop;
      }
      return;
    }
  }
#endif
  dropout_range<T, ACCUMULATE>(x, out, begin, end, offset, seed_mix, threshold, scale);
}

struct DropoutParams {
  uint32_t seed_mix, threshold;
  double scale;

  DropoutParams(double p, int64_t seed) {
    TORCH_CHECK(p >= 0.0 && p < 1.0, "lora dropout: p must be in [0, 1), got ", p);
    seed_mix = mix32(static_cast<uint32_t>(seed & 0xFFFFFFFF));
    const double scaled = p * 4294967296.0;
    threshold = scaled >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(std::llround(scaled));
    scale = 1.0 / (1.0 - p);
  }
};

// dropout of contiguous x into contiguous out (same numel and dtype), x's first element having flat index offset.
template <bool ACCUMULATE>
void dropout_into(const at::Tensor& x, const at::Tensor& out, int64_t offset, const DropoutParams& params) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      dropout_range_fast<scalar_t, ACCUMULATE>(src, dst, begin, end, offset, params.seed_mix, params.threshold,
                                               static_cast<at::opmath_type<scalar_t>>(params.scale));
    });
  });
}

// Rows per chunk: about 2 MiB of a (rows, K) tensor, so a dropped chunk is still in cache for its GEMM.
int64_t chunk_rows(int64_t K, int64_t itemsize) {
  return std::max<int64_t>(1, (int64_t{2} << 20) / std::max<int64_t>(1, K * itemsize));
}

// A group's ranks (one per adapter, one seed each) must add up to `rows`, the concatenated A's rows (du's columns).
void check_ranks(int64_t rows, const std::vector<int64_t>& ranks, const std::vector<int64_t>& seeds) {
  TORCH_CHECK(std::accumulate(ranks.begin(), ranks.end(), int64_t{0}) == rows && ranks.size() == seeds.size(),
              "lora group: the ranks must sum to ", rows, " (the concatenated A's rows), one seed per adapter");
}

// For each row chunk [r0, r0 + n) of x (2-D, taken to `dtype`) and each adapter g (ranks[g] columns of the
// concatenated ranks, from col), calls use(r0, n, col, ranks[g], dropped) with dropped = dropout_g(chunk) in a
// cache-sized buffer.
template <typename Use>
void for_each_dropped_chunk(const at::Tensor& x, at::ScalarType dtype, const std::vector<int64_t>& ranks, double p,
                            const std::vector<int64_t>& seeds, const Use& use) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t rows = chunk_rows(K, c10::elementSize(dtype));
  at::Tensor buffer = at::empty({std::min(rows, M), K}, x.options().dtype(dtype));
  for (int64_t r0 = 0; r0 < M; r0 += rows) {
    const int64_t n = std::min(rows, M - r0);
    const at::Tensor chunk = x.narrow(0, r0, n).to(dtype).contiguous();
    const at::Tensor dropped = buffer.narrow(0, 0, n);
    int64_t col = 0;
    for (size_t g = 0; g < ranks.size(); ++g) {
      dropout_into<false>(chunk, dropped, r0 * K, DropoutParams(p, seeds[g]));
      use(r0, n, col, ranks[g], dropped);
      col += ranks[g];
    }
  }
}

}  // namespace

at::Tensor lora_dropout_cpu(const at::Tensor& x, double p, int64_t seed) {
  const DropoutParams params(p, seed);
  const at::Tensor input = x.contiguous();
  at::Tensor out = empty_huge_pages(input.sizes(), input.options());
  dropout_into<false>(input, out, 0, params);
  return out;
}

at::Tensor lora_down_cpu(const at::Tensor& x_in, const at::Tensor& a_cat_in, const std::vector<int64_t>& ranks,
                         double p, const std::vector<int64_t>& seeds) {
  const at::Tensor a_cat = a_cat_in.contiguous();
  const at::Tensor x = x_in.reshape({-1, x_in.size(-1)}).contiguous();
  check_ranks(a_cat.size(0), ranks, seeds);
  TORCH_CHECK(a_cat.dim() == 2 && a_cat.size(1) == x.size(1), "lora_down: A must have x's last dim ", x.size(1),
              " columns, got ", a_cat.size(1));
  at::Tensor u = at::empty({x.size(0), a_cat.size(0)}, a_cat.options());
  for_each_dropped_chunk(x, a_cat.scalar_type(), ranks, p, seeds,
                         [&](int64_t r0, int64_t n, int64_t col, int64_t rank, const at::Tensor& dropped) {
                           u.narrow(0, r0, n).narrow(1, col, rank).copy_(
                               at::mm(dropped, a_cat.narrow(0, col, rank).t()));
                         });
  return u;
}

namespace {

at::Tensor lora_down_grad_a(const at::Tensor& du_in, const at::Tensor& x_in, const std::vector<int64_t>& ranks,
                            double p, const std::vector<int64_t>& seeds) {
  const at::Tensor du = du_in.contiguous();
  const at::Tensor x = x_in.reshape({-1, x_in.size(-1)}).contiguous();
  TORCH_CHECK(du.dim() == 2 && du.size(0) == x.size(0), "lora grad A: du must be (", x.size(0), ", sum of ranks)");
  check_ranks(du.size(1), ranks, seeds);
  at::Tensor grad = at::zeros({du.size(1), x.size(1)}, du.options());
  for_each_dropped_chunk(x, du.scalar_type(), ranks, p, seeds,
                         [&](int64_t r0, int64_t n, int64_t col, int64_t rank, const at::Tensor& dropped) {
                           grad.narrow(0, col, rank).addmm_(du.narrow(0, r0, n).narrow(1, col, rank).t(), dropped);
                         });
  return grad;
}

at::Tensor lora_down_grad_x(const at::Tensor& du_in, const at::Tensor& a_cat_in, const std::vector<int64_t>& ranks,
                            double p, const std::vector<int64_t>& seeds) {
  const at::Tensor du = du_in.contiguous(), a_cat = a_cat_in.contiguous();
  check_ranks(a_cat.size(0), ranks, seeds);
  TORCH_CHECK(du.dim() == 2 && du.size(1) == a_cat.size(0) && du.scalar_type() == a_cat.scalar_type(),
              "lora grad x: du must be (rows, sum of ranks) in A's dtype");
  const int64_t M = du.size(0), K = a_cat.size(1);
  at::Tensor grad = empty_huge_pages({M, K}, a_cat.options());
  const int64_t rows = chunk_rows(K, a_cat.element_size());
  at::Tensor buffer = at::empty({std::min(rows, M), K}, a_cat.options());
  for (int64_t r0 = 0; r0 < M; r0 += rows) {
    const int64_t n = std::min(rows, M - r0);
    at::Tensor product = buffer.narrow(0, 0, n);
    const at::Tensor out = grad.narrow(0, r0, n);
    int64_t col = 0;
    for (size_t g = 0; g < ranks.size(); ++g) {
      at::mm_out(product, du.narrow(0, r0, n).narrow(1, col, ranks[g]), a_cat.narrow(0, col, ranks[g]));
      if (g == 0) {
        dropout_into<false>(product, out, r0 * K, DropoutParams(p, seeds[g]));
      } else {
        dropout_into<true>(product, out, r0 * K, DropoutParams(p, seeds[g]));
      }
      col += ranks[g];
    }
  }
  return grad;
}

}  // namespace

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> lora_down_backward_cpu(
    const at::Tensor& du, const at::Tensor& x, const at::Tensor& a_cat, const std::vector<int64_t>& ranks, double p,
    const std::vector<int64_t>& seeds, bool want_x, bool want_a) {
  std::optional<at::Tensor> grad_x, grad_a;
  if (want_x) grad_x = lora_down_grad_x(du, a_cat, ranks, p, seeds).to(x.scalar_type());
  if (want_a) grad_a = lora_down_grad_a(du, x, ranks, p, seeds);
  return {grad_x, grad_a};
}

}  // namespace fastft
