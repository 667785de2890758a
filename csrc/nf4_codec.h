// Decoding of bitsandbytes' packed 4-bit weights, shared by the CPU kernels.
//
// Element e of the row-major flattened weight lives in byte e / 2 (high nibble when e is even) and belongs to
// block e / blocksize. Its value is fp32(lut[code] * absmax[block]). With double quant, absmax[block] is itself
// fp32(fp32(nested_code[q] * nested_absmax[block / nested_blocksize]) + offset): two roundings, never an FMA
// (the extension is compiled with -ffp-contract=off).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTFT_X86 1
#endif

namespace fastft {

struct BlockScales {
  const float* absmax = nullptr;         // fp32 per block (no double quant)
  const uint8_t* absmax_codes = nullptr;  // 8-bit codes per block (double quant)
  const float* nested_code = nullptr;     // 256-entry dynamic map
  const float* nested_absmax = nullptr;   // fp32 per nested block
  int64_t nested_blocksize = 256;
  float nested_offset = 0.f;

  inline float operator()(int64_t block) const {
    if (absmax != nullptr) return absmax[block];
    const float scaled = nested_code[absmax_codes[block]] * nested_absmax[block / nested_blocksize];
    return scaled + nested_offset;
  }
};

struct Packed4bit {
  const uint8_t* bytes;
  const float* lut;  // 16 fp32 values, indexed by code
  int64_t blocksize;
  BlockScales scales;

  inline int code_at(int64_t e) const {
    const uint8_t b = bytes[e >> 1];
    return (e & 1) ? (b & 0xF) : (b >> 4);
  }
  inline float value_at(int64_t e) const { return lut[code_at(e)] * scales(e / blocksize); }
};

template <typename T>
inline T from_float(float v) {
  return static_cast<T>(v);  // c10::Half / c10::BFloat16 round to nearest even
}

bool cpu_has_avx2();
// AVX-512 (F, DQ, BW, VL) on top of AVX2; FASTFT_NO_AVX512=1 (or FASTFT_NO_AVX2=1) turns it off, e.g. to test the
// AVX2 paths on such a CPU.
bool cpu_has_avx512();

#ifdef FASTFT_X86
#define FASTFT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FASTFT_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")))

// The 8 fp32 LUT values of the 8 codes held in 4 consecutive bytes (elements 2i, 2i+1 of byte i in order).
FASTFT_AVX2 inline __m256 lut8(uint32_t four_bytes, __m256 lut_lo, __m256 lut_hi) {
  // byte i sits at bits 8i..8i+7; element 2i is its high nibble, element 2i+1 its low nibble.
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  const __m256i codes =
      _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(four_bytes)), shifts),
                       _mm256_set1_epi32(0xF));
  const __m256 low = _mm256_permutevar8x32_ps(lut_lo, codes);
  const __m256 high = _mm256_permutevar8x32_ps(lut_hi, codes);
  return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
}

FASTFT_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FASTFT_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
FASTFT_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// fp32 -> bf16 with round-to-nearest-even (inputs are finite).
FASTFT_AVX2 inline __m128i to_bf16x8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}
FASTFT_AVX2 inline __m128i to_fp16x8(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }

FASTFT_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
FASTFT_AVX2 inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_fp16x8(v));
}
FASTFT_AVX2 inline void store8(c10::BFloat16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16x8(v));
}

// Non-temporal stores for large outputs not read again soon; p aligned to 8 elements.
FASTFT_AVX2 inline void stream8(float* p, __m256 v) { _mm256_stream_ps(p, v); }
FASTFT_AVX2 inline void stream8(c10::Half* p, __m256 v) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_fp16x8(v));
}
FASTFT_AVX2 inline void stream8(c10::BFloat16* p, __m256 v) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16x8(v));
}

// AVX-512: the 16-entry LUT fits one register, so one permute decodes 16 codes (AVX2 needs two and a blend).

// The 16 fp32 LUT values of the 16 codes held in 8 consecutive bytes (elements 2i, 2i+1 of byte i in order).
FASTFT_AVX512 inline __m512 lut16(uint64_t eight_bytes, __m512 lut) {
  const __m128i bytes = _mm_cvtsi64_si128(static_cast<long long>(eight_bytes));
  // each byte twice, widened to 32 bits; the even lane takes the high nibble (>> 4), the odd lane the low one
  // (permutexvar reads only the low 4 bits of an index)
  const __m512i doubled = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes));
  const __m512i shifts = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(doubled, shifts), lut);
}

FASTFT_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
FASTFT_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
FASTFT_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// fp32 -> bf16 with round-to-nearest-even (inputs are finite), as to_bf16x8.
FASTFT_AVX512 inline __m256i to_bf16x16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_cvtepi32_epi16(
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16));
}
FASTFT_AVX512 inline __m256i to_fp16x16(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }

FASTFT_AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
FASTFT_AVX512 inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_fp16x16(v));
}
FASTFT_AVX512 inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16x16(v));
}

// Non-temporal stores; p aligned to 16 elements.
FASTFT_AVX512 inline void stream16(float* p, __m512 v) { _mm512_stream_ps(p, v); }
FASTFT_AVX512 inline void stream16(c10::Half* p, __m512 v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_fp16x16(v));
}
FASTFT_AVX512 inline void stream16(c10::BFloat16* p, __m512 v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16x16(v));
}
#endif

}  // namespace fastft
