// 4-bit dequantization on CPU: a vectorized decoder for runs of 16 elements inside one block (AVX-512: the
// 16-entry LUT lives in one register, codes select lanes with permutexvar) or of 8 (AVX2: the LUT in two
// registers, permutevar8x32 twice and a blend), a scalar loop for the ragged rest.
#include <ATen/Parallel.h>


#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "memory.h"
#include "nf4_cpu.h"

namespace fastft {

bool cpu_has_avx2() {
#ifdef FASTFT_X86
  // FASTFT_NO_AVX2=1 forces the scalar paths (what CPUs without AVX2 run), e.g. to test them.
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && std::getenv("FASTFT_NO_AVX2") == nullptr;
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#ifdef FASTFT_X86
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && std::getenv("FASTFT_NO_AVX512") == nullptr;
  return has;
#else
  return false;
#endif
}

Packed4bit PackedArgs::view() const {
  Packed4bit w{packed.const_data_ptr<uint8_t>(), code.const_data_ptr<float>(), blocksize, {}};
  if (nested_absmax.has_value()) {
    w.scales.absmax_codes = absmax.const_data_ptr<uint8_t>();
    w.scales.nested_absmax = nested_absmax->const_data_ptr<float>();
    w.scales.nested_code = nested_code->const_data_ptr<float>();
    w.scales.nested_blocksize = nested_blocksize;
    w.scales.nested_offset = static_cast<float>(nested_offset);
  } else {
    w.scales.absmax = absmax.const_data_ptr<float>();
  }
  return w;
}

namespace {

#ifdef FASTFT_X86
// Decodes from `e` (a multiple of 8) while 8 whole elements remain; returns the first element not written.
// Streaming stores bypass the cache; they need out_at_e aligned to 8 elements.
template <bool Stream, typename T>
FASTFT_AVX2 int64_t dequantize_avx2(const Packed4bit& w, int64_t e, int64_t end, T* out_at_e) {
  T* out = out_at_e - e;
  const __m256 lut_lo = _mm256_loadu_ps(w.lut);
  const __m256 lut_hi = _mm256_loadu_ps(w.lut + 8);
  while (e + 8 <= end) {
    const int64_t block = e / w.blocksize;
    const int64_t stop = std::min(end, (block + 1) * w.blocksize);
    const __m256 scale = _mm256_set1_ps(w.scales(block));
    for (; e + 8 <= stop; e += 8) {
      uint32_t four_bytes;
      std::memcpy(&four_bytes, w.bytes + e / 2, 4);
      const __m256 values = _mm256_mul_ps(lut8(four_bytes, lut_lo, lut_hi), scale);
      if constexpr (Stream) {
        stream8(out + e, values);
      } else {
        store8(out + e, values);
      }
    }
    if (e < stop) break;
  }
  return e;
}

// dequantize_avx2 for runs of 16 elements (`e` a multiple of 16, out_at_e aligned to 16 elements when streaming).
template <bool Stream, typename T>
FASTFT_AVX512 int64_t dequantize_avx512(const Packed4bit& w, int64_t e, int64_t end, T* out_at_e) {
  T* out = out_at_e - e;
  const __m512 lut = _mm512_loadu_ps(w.lut);
  while (e + 16 <= end) {
    const int64_t block = e / w.blocksize;
    const int64_t stop = std::min(end, (block + 1) * w.blocksize);
    const __m512 scale = _mm512_set1_ps(w.scales(block));
    for (; e + 16 <= stop; e += 16) {
      uint64_t eight_bytes;
      std::memcpy(&eight_bytes, w.bytes + e / 2, 8);
      const __m512 values = _mm512_mul_ps(lut16(eight_bytes, lut), scale);
      if constexpr (Stream) {
        stream16(out + e, values);
      } else {
        store16(out + e, values);
      }
    }
    if (e < stop) break;
  }
  return e;
}

// Decodes [e, end) with the widest vectors the CPU and the blocksize allow, after scalar elements up to the
// first multiple of the vector width; returns the first element not written (fewer than a vector remain).
template <typename T>
int64_t dequantize_vectors(const Packed4bit& w, int64_t e, int64_t end, T* out_at_e, bool stream) {
  const bool wide = cpu_has_avx512() && w.blocksize % 16 == 0;
  const int64_t width = wide ? 16 : 8;
  T* out = out_at_e - e;
  for (; e < end && e % width != 0; ++e) out[e] = from_float<T>(w.value_at(e));
  const bool aligned = reinterpret_cast<uintptr_t>(out + e) % (width * sizeof(T)) == 0;
  if (stream && aligned) {
    e = wide ? dequantize_avx512<true>(w, e, end, out + e) : dequantize_avx2<true>(w, e, end, out + e);
    _mm_sfence();
  } else {
    e = wide ? dequantize_avx512<false>(w, e, end, out + e) : dequantize_avx2<false>(w, e, end, out + e);
  }
  return e;
}
#endif

}  // namespace

template <typename T>
void dequantize_range(const Packed4bit& w, int64_t start, int64_t count, T* out, bool stream) {
  const int64_t end = start + count;
  int64_t e = start;
#ifdef FASTFT_X86
  if constexpr (!std::is_same_v<T, double>) {
    if (cpu_has_avx2() && w.blocksize % 8 == 0) e = dequantize_vectors<T>(w, e, end, out, stream);
  }
#endif
  for (; e < end; ++e) out[e - start] = from_float<T>(w.value_at(e));
}

template void dequantize_range<float>(const Packed4bit&, int64_t, int64_t, float*, bool);
template void dequantize_range<double>(const Packed4bit&, int64_t, int64_t, double*, bool);
template void dequantize_range<c10::Half>(const Packed4bit&, int64_t, int64_t, c10::Half*, bool);
template void dequantize_range<c10::BFloat16>(const Packed4bit&, int64_t, int64_t, c10::BFloat16*, bool);

at::Tensor nf4_dequantize_cpu(const PackedArgs& args, at::IntArrayRef shape, at::ScalarType dtype,
                              const std::optional<at::Tensor>& out_buffer) {
  at::Tensor out = out_buffer.has_value() ? *out_buffer : empty_huge_pages(shape, args.packed.options().dtype(dtype));
  const Packed4bit w = args.view();
  const int64_t n = out.numel();
  // Outputs much larger than the caches go around them; smaller ones stay cached for their consumer.
  const bool stream = out.nbytes() >= (int64_t{16} << 20);
  constexpr int64_t kChunk = 1 << 14;  // elements per task: a multiple of every blocksize's 8-element runs
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nf4_dequantize_cpu", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
      const int64_t start = c0 * kChunk;
      dequantize_range<scalar_t>(w, start, std::min(n, c1 * kChunk) - start, dst + start, /*stream=*/stream);
    });
  });
  return out;
}

}  // namespace fastft
