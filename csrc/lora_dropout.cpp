// LoRA's counter-based dropout on CPU: keep element e iff mix(low(e) ^ mix(high(e) ^ mix(seed))) >= threshold,
// kept values scaled by 1/(1-p). The mask is never stored: backward regenerates it from the seed.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "lora_cpu.h"

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

}  // namespace

at::Tensor lora_dropout_cpu(const at::Tensor& x, double p, int64_t seed) {
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input);
  const uint32_t seed_mix = mix32(static_cast<uint32_t>(seed & 0xFFFFFFFF));
  const double scaled = p * 4294967296.0;
  const uint32_t threshold = scaled >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(std::llround(scaled));
  const double scale = 1.0 / (1.0 - p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lora_dropout_cpu", [&] {
    const scalar_t* src = input.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, input.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      dropout_range<scalar_t>(src, dst, begin, end, seed_mix, threshold, static_cast<at::opmath_type<scalar_t>>(scale));
    });
  });
  return out;
}

}  // namespace fastft
