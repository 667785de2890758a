// LoRA's counter-based dropout on CPU: keep element e iff mix(low(e) ^ mix(high(e) ^ mix(seed))) >= threshold,
// kept values scaled by 1/(1-p). The mask is never stored: backward regenerates it from the seed.
// AVX2: 8 elements at a time (the mixer's 32-bit multiplies with vpmulld), fp32 / fp16 / bf16; ~1.5 ns per
// element in scalar code, where the pass should be memory bound.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
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

template <typename T>
void dropout_range(const T* x, T* out, int64_t begin, int64_t end, uint32_t seed_mix, uint32_t threshold,
                   at::opmath_type<T> scale) {
  int64_t e = begin;
  while (e < end) {
    // Elements sharing the high 32 bits of their index share the inner mix.
    const int64_t stop = std::min(end, ((e >> 32) + 1) << 32);
    const uint32_t inner = mix32(static_cast<uint32_t>(e >> 32) ^ seed_mix);
    for (; e < stop; ++e) {
      const uint32_t h = mix32(static_cast<uint32_t>(e) ^ inner);
      out[e] = h >= threshold ? static_cast<T>(static_cast<at::opmath_type<T>>(x[e]) * scale) : static_cast<T>(0);
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

// Elements [e, stop) sharing the high 32 bits of their index (inner = their inner mix); returns where it stopped
// (a multiple of 8 elements done, the rest left to the scalar loop).
template <typename T>
FASTFT_AVX2 int64_t dropout_range_avx2(const T* x, T* out, int64_t e, int64_t stop, uint32_t inner,
                                       uint32_t threshold, float scale) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i inner8 = _mm256_set1_epi32(static_cast<int>(inner));
  const __m256i threshold8 = _mm256_set1_epi32(static_cast<int>(threshold));
  const __m256 scale8 = _mm256_set1_ps(scale);
  for (; e + 8 <= stop; e += 8) {
    const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(e))), lanes);
    const __m256i h = mix32x8(_mm256_xor_si256(index, inner8));
    // unsigned h >= threshold  <=>  max_u32(h, threshold) == h
    const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(h, threshold8), h);
    const __m256 kept = _mm256_mul_ps(load8(x + e), scale8);
    store8(out + e, _mm256_and_ps(kept, _mm256_castsi256_ps(keep)));
  }
  return e;
}
#endif

template <typename T>
void dropout_range_fast(const T* x, T* out, int64_t begin, int64_t end, uint32_t seed_mix, uint32_t threshold,
                        at::opmath_type<T> scale) {
#ifdef FASTFT_X86
  if constexpr (!std::is_same_v<T, double>) {
    if (cpu_has_avx2()) {
      int64_t e = begin;
      while (e < end) {
        const int64_t stop = std::min(end, ((e >> 32) + 1) << 32);
        const uint32_t inner = mix32(static_cast<uint32_t>(e >> 32) ^ seed_mix);
        e = dropout_range_avx2<T>(x, out, e, stop, inner, threshold, static_cast<float>(scale));
        dropout_range<T>(x, out, e, stop, seed_mix, threshold, scale);  // the < 8 left before stop
        e = stop;
      }
      return;
    }
  }
#endif
  dropout_range<T>(x, out, begin, end, seed_mix, threshold, scale);
}

}  // namespace

at::Tensor lora_dropout_cpu(const at::Tensor& x, double p, int64_t seed) {
  const at::Tensor input = x.contiguous();
  at::Tensor out = empty_huge_pages(input.sizes(), input.options());
  const uint32_t seed_mix = mix32(static_cast<uint32_t>(seed & 0xFFFFFFFF));
  const double scaled = p * 4294967296.0;
  const uint32_t threshold = scaled >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(std::llround(scaled));
  const double scale = 1.0 / (1.0 - p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lora_dropout_cpu", [&] {
    const scalar_t* src = input.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, input.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      dropout_range_fast<scalar_t>(src, dst, begin, end, seed_mix, threshold,
                                   static_cast<at::opmath_type<scalar_t>>(scale));
    });
  });
  return out;
}

}  // namespace fastft
