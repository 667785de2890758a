// y = x @ W^T and dx = dy @ W with W stored as packed 4-bit codes, on CPU.
//
// Few rows (fp32/fp16/bf16, K % 8 == 0, AVX2; 16 lanes on AVX-512 when K and the blocksize are multiples of 16):
// the kernels read the packed bytes directly and never write a dequantized weight; per block they accumulate
// sum(lut * x) and scale once by absmax.
// More rows: the weight is dequantized one cache-sized tile at a time (rows of W for y, columns of W for dx)
// into a reused buffer and each tile goes through ATen's GEMM, so the full dequantized W never exists.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "nf4_cpu.h"

namespace fastft {
namespace {

constexpr int64_t kDirectRows = 4;           // rows of x one pass of a direct kernel handles (registers)
// Beyond these, decoding W once per 4 rows costs more than dequantizing tiles for a GEMM (measured on AVX2).
constexpr int64_t kDirectMaxRowsForward = 16;
constexpr int64_t kDirectMaxRowsBackward = 4;
constexpr int64_t kTileBytes = 1 << 22;      // size of one dequantized tile of W (L2/L3-resident)
constexpr int64_t kGradColumns = 256;        // columns of dx one task of the direct backward owns

int64_t tile_extent(int64_t other_dim, int64_t element_size, int64_t limit) {
  const int64_t extent = std::max<int64_t>(64, kTileBytes / std::max<int64_t>(1, other_dim * element_size));
  return std::min(limit, extent / 16 * 16);
}

bool use_direct(const at::Tensor& x, int64_t rows, int64_t max_rows, int64_t K, const Packed4bit& w) {
  return rows <= max_rows && x.scalar_type() != at::kDouble && K % 8 == 0 && w.blocksize % 8 == 0 &&
         cpu_has_avx2();
}

#ifdef FASTFT_X86
FASTFT_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m, n] for rows n in [n0, n1) and MR rows of x.
template <int MR, typename T>
FASTFT_AVX2 void linear_direct_rows(const Packed4bit& w, const T* x, int64_t K, int64_t N, int64_t n0, int64_t n1,
                                    const T* bias, T* y) {
  const __m256 lut_lo = _mm256_loadu_ps(w.lut);
  const __m256 lut_hi = _mm256_loadu_ps(w.lut + 8);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t base = n * K;
    __m256 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K;) {
      const int64_t block = (base + k) / w.blocksize;
      const int64_t stop = std::min(K, (block + 1) * w.blocksize - base);
      __m256 part[MR];
      for (int m = 0; m < MR; ++m) part[m] = _mm256_setzero_ps();
      for (; k < stop; k += 8) {
        uint32_t four_bytes;
        std::memcpy(&four_bytes, w.bytes + (base + k) / 2, 4);
        const __m256 values = lut8(four_bytes, lut_lo, lut_hi);
        for (int m = 0; m < MR; ++m) part[m] = _mm256_fmadd_ps(values, load8(x + m * K + k), part[m]);
      }
      const __m256 scale = _mm256_set1_ps(w.scales(block));
      for (int m = 0; m < MR; ++m) acc[m] = _mm256_fmadd_ps(part[m], scale, acc[m]);
    }
    const float b = bias != nullptr ? static_cast<float>(bias[n]) : 0.f;
    for (int m = 0; m < MR; ++m) y[m * N + n] = from_float<T>(hsum(acc[m]) + b);
  }
}

// dx[m, k] for columns k in [k0, k1) (multiples of 8) and MR rows of dy, accumulated in fp32 over all N rows of W.
template <int MR, typename T>
FASTFT_AVX2 void grad_input_direct_columns(const Packed4bit& w, const T* dy, int64_t N, int64_t K, int64_t k0,
                                           int64_t k1, T* dx) {
  const __m256 lut_lo = _mm256_loadu_ps(w.lut);
  const __m256 lut_hi = _mm256_loadu_ps(w.lut + 8);
  const int64_t width = k1 - k0;
  alignas(32) float acc[MR * kGradColumns];
  std::fill(acc, acc + MR * width, 0.f);
  for (int64_t n = 0; n < N; ++n) {
    __m256 dy_n[MR];
    for (int m = 0; m < MR; ++m) dy_n[m] = _mm256_set1_ps(static_cast<float>(dy[m * N + n]));
    const int64_t base = n * K + k0;
    for (int64_t j = 0; j < width;) {
      const int64_t block = (base + j) / w.blocksize;
      const int64_t stop = std::min(width, (block + 1) * w.blocksize - base);
      const __m256 scale = _mm256_set1_ps(w.scales(block));
      for (; j < stop; j += 8) {
        uint32_t four_bytes;
        std::memcpy(&four_bytes, w.bytes + (base + j) / 2, 4);
        const __m256 values = _mm256_mul_ps(lut8(four_bytes, lut_lo, lut_hi), scale);
        for (int m = 0; m < MR; ++m) {
          float* a = acc + m * width + j;
          _mm256_storeu_ps(a, _mm256_fmadd_ps(values, dy_n[m], _mm256_loadu_ps(a)));
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int64_t j = 0; j < width; ++j) dx[m * K + k0 + j] = from_float<T>(acc[m * width + j]);
}

// The fp32 LUT values of the 64 codes held in 32 consecutive bytes, as four vectors of 16 elements in order.
FASTFT_AVX512 inline void lut64(const uint8_t* bytes, __m512 lut, __m512 values[4]) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i high = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);  // element 2i of byte i
  const __m256i low = _mm256_and_si256(raw, mask);                         // element 2i + 1
  // per 128-bit lane, unpacklo interleaves bytes 0-7 (elements 0-15 of the lane), unpackhi bytes 8-15
  const __m256i first = _mm256_unpacklo_epi8(high, low);   // elements 0-15 | 32-47
  const __m256i second = _mm256_unpackhi_epi8(high, low);  // elements 16-31 | 48-63
  values[0] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(first)), lut);
  values[1] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(second)), lut);
  values[2] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(first, 1)), lut);
  values[3] = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(second, 1)), lut);
}

// linear_direct_rows, 16 lanes (K and the blocksize multiples of 16).
template <int MR, typename T>
FASTFT_AVX512 void linear_direct_rows_avx512(const Packed4bit& w, const T* x, int64_t K, int64_t N, int64_t n0,
                                             int64_t n1, const T* bias, T* y) {
  const __m512 lut = _mm512_loadu_ps(w.lut);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t base = n * K;
    __m512 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K;) {
      const int64_t block = (base + k) / w.blocksize;
      const int64_t stop = std::min(K, (block + 1) * w.blocksize - base);
      // Four sums per row of x, one per 16-element quarter of each 64-element run: four independent FMA chains
      // (one chain waits on the FMA latency at M = 1), and 32 bytes of codes decoded per load.
      __m512 part[MR][4];
      for (int m = 0; m < MR; ++m)
        for (int q = 0; q < 4; ++q) part[m][q] = _mm512_setzero_ps();
      for (; k + 64 <= stop; k += 64) {
        __m512 values[4];
        lut64(w.bytes + (base + k) / 2, lut, values);
        for (int q = 0; q < 4; ++q)
          for (int m = 0; m < MR; ++m)
            part[m][q] = _mm512_fmadd_ps(values[q], load16(x + m * K + k + 16 * q), part[m][q]);
      }
      for (; k < stop; k += 16) {
        uint64_t eight_bytes;
        std::memcpy(&eight_bytes, w.bytes + (base + k) / 2, 8);
        const __m512 values = lut16(eight_bytes, lut);
        for (int m = 0; m < MR; ++m) part[m][0] = _mm512_fmadd_ps(values, load16(x + m * K + k), part[m][0]);
      }
      const __m512 scale = _mm512_set1_ps(w.scales(block));
      for (int m = 0; m < MR; ++m) {
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(part[m][0], part[m][1]), _mm512_add_ps(part[m][2], part[m][3]));
        acc[m] = _mm512_fmadd_ps(sum, scale, acc[m]);
      }
    }
    const float b = bias != nullptr ? static_cast<float>(bias[n]) : 0.f;
    for (int m = 0; m < MR; ++m) y[m * N + n] = from_float<T>(_mm512_reduce_add_ps(acc[m]) + b);
  }
}

// grad_input_direct_columns, 16 lanes (K, k0, k1 and the blocksize multiples of 16), with the sums in registers:
// 64 columns at a time (MR x 4 zmm) across all N rows of W, rather than a buffer in L1 updated per row (whose
// 512-bit store-to-load round trips ran at half the AVX2 kernel's speed on Zen 4).
template <int MR, typename T>
FASTFT_AVX512 void grad_input_direct_columns_avx512(const Packed4bit& w, const T* dy, int64_t N, int64_t K,
                                                    int64_t k0, int64_t k1, T* dx) {
  constexpr int kVectors = 4;
  const __m512 lut = _mm512_loadu_ps(w.lut);
  for (int64_t j0 = k0; j0 < k1; j0 += 16 * kVectors) {
    const int vectors = static_cast<int>(std::min<int64_t>(kVectors, (k1 - j0) / 16));
    __m512 acc[MR][kVectors];
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < kVectors; ++v) acc[m][v] = _mm512_setzero_ps();
    for (int64_t n = 0; n < N; ++n) {
      __m512 dy_n[MR];
      for (int m = 0; m < MR; ++m) dy_n[m] = _mm512_set1_ps(static_cast<float>(dy[m * N + n]));
      const int64_t base = n * K + j0;
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) {
        if (v >= vectors) break;
        const int64_t e = base + 16 * v;  // 16 elements inside one block
        uint64_t eight_bytes;
        std::memcpy(&eight_bytes, w.bytes + e / 2, 8);
        const __m512 values = _mm512_mul_ps(lut16(eight_bytes, lut), _mm512_set1_ps(w.scales(e / w.blocksize)));
        for (int m = 0; m < MR; ++m) acc[m][v] = _mm512_fmadd_ps(values, dy_n[m], acc[m][v]);
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < vectors; ++v) {
        alignas(64) float sums[16];
        _mm512_store_ps(sums, acc[m][v]);
        for (int i = 0; i < 16; ++i) dx[m * K + j0 + 16 * v + i] = from_float<T>(sums[i]);
      }
  }
}

// The 16-lane kernels need K and the blocksize to be whole 16-element runs.
bool wide_direct(int64_t K, const Packed4bit& w) { return cpu_has_avx512() && K % 16 == 0 && w.blocksize % 16 == 0; }

template <int MR, typename T>
void linear_direct(const Packed4bit& w, const T* x, int64_t K, int64_t N, const T* bias, T* y) {
  const bool wide = wide_direct(K, w);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (wide) {
      linear_direct_rows_avx512<MR, T>(w, x, K, N, n0, n1, bias, y);
    } else {
      linear_direct_rows<MR, T>(w, x, K, N, n0, n1, bias, y);
    }
  });
}

template <int MR, typename T>
void grad_input_direct(const Packed4bit& w, const T* dy, int64_t N, int64_t K, T* dx) {
  const bool wide = wide_direct(K, w);
  at::parallel_for(0, (K + kGradColumns - 1) / kGradColumns, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k0 = c * kGradColumns, k1 = std::min(K, (c + 1) * kGradColumns);
      if (wide) {
        grad_input_direct_columns_avx512<MR, T>(w, dy, N, K, k0, k1, dx);
      } else {
        grad_input_direct_columns<MR, T>(w, dy, N, K, k0, k1, dx);
      }
    }
  });
}

// Dispatches rows of x / dy in groups of at most kDirectRows to the kernel instantiated for that group size.
template <typename T, template <int, typename> class Kernel, typename... Args>
void for_row_groups(int64_t rows, int64_t in_stride, int64_t out_stride, const T* in, T* out, Args... args) {
  for (int64_t r = 0; r < rows; r += kDirectRows) {
    const T* src = in + r * in_stride;
    T* dst = out + r * out_stride;
    switch (std::min<int64_t>(kDirectRows, rows - r)) {
      case 1: Kernel<1, T>::run(src, dst, args...); break;
      case 2: Kernel<2, T>::run(src, dst, args...); break;
      case 3: Kernel<3, T>::run(src, dst, args...); break;
      default: Kernel<4, T>::run(src, dst, args...); break;
    }
  }
}

template <int MR, typename T>
struct LinearDirect {
  static void run(const T* x, T* y, const Packed4bit& w, int64_t K, int64_t N, const T* bias) {
    linear_direct<MR, T>(w, x, K, N, bias, y);
  }
};

template <int MR, typename T>
struct GradInputDirect {
  static void run(const T* dy, T* dx, const Packed4bit& w, int64_t N, int64_t K) {
    grad_input_direct<MR, T>(w, dy, N, K, dx);
  }
};
#endif

// Dequantizes W[rows, k0:k0+width] into tile (rows.size() x width, contiguous), rows in parallel.
void dequantize_tile(const Packed4bit& w, int64_t K, int64_t row0, int64_t rows, int64_t k0, int64_t width,
                     at::Tensor& tile) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tile.scalar_type(), "dequantize_tile", [&] {
    scalar_t* dst = tile.mutable_data_ptr<scalar_t>();
    if (k0 == 0 && width == K) {  // whole rows are one contiguous range
      at::parallel_for(0, rows * K, 1 << 13, [&](int64_t e0, int64_t e1) {
        dequantize_range<scalar_t>(w, row0 * K + e0, e1 - e0, dst + e0);
      });
    } else {
      at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) dequantize_range<scalar_t>(w, (row0 + r) * K + k0, width, dst + r * width);
      });
    }
  });
}

}  // namespace

at::Tensor nf4_linear_cpu(const at::Tensor& x, const PackedArgs& args, int64_t N,
                          const std::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  const Packed4bit w = args.view();
#ifdef FASTFT_X86
  if (use_direct(x, M, kDirectMaxRowsForward, K, w)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nf4_linear_direct", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
        for_row_groups<scalar_t, LinearDirect>(M, K, N, x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                               w, K, N, b);
      }
    });
    return y;
  }
#endif
  const int64_t rows = tile_extent(K, x.element_size(), N);
  at::Tensor tile = at::empty({rows, K}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nt = std::min(rows, N - n0);
    at::Tensor w_tile = tile.narrow(0, 0, nt);
    dequantize_tile(w, K, n0, nt, 0, K, w_tile);
    at::Tensor y_tile = y.narrow(1, n0, nt);
    if (bias.has_value()) {
      at::addmm_out(y_tile, bias->narrow(0, n0, nt), x, w_tile.t());
    } else {
      at::mm_out(y_tile, x, w_tile.t());
    }
  }
  return y;
}

at::Tensor nf4_linear_grad_input_cpu(const at::Tensor& dy, const PackedArgs& args, int64_t K) {
  const int64_t M = dy.size(0), N = dy.size(1);
  at::Tensor dx = at::empty({M, K}, dy.options());
  const Packed4bit w = args.view();
#ifdef FASTFT_X86
  if (use_direct(dy, M, kDirectMaxRowsBackward, K, w)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "nf4_linear_grad_input_direct", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        for_row_groups<scalar_t, GradInputDirect>(M, N, K, dy.const_data_ptr<scalar_t>(),
                                                  dx.mutable_data_ptr<scalar_t>(), w, N, K);
      }
    });
    return dx;
  }
#endif
  const int64_t width = tile_extent(N, dy.element_size(), K);
  at::Tensor tile = at::empty({N, width}, dy.options());
  for (int64_t k0 = 0; k0 < K; k0 += width) {
    const int64_t kt = std::min(width, K - k0);
    at::Tensor w_tile = kt == width ? tile : at::empty({N, kt}, dy.options());
    dequantize_tile(w, K, 0, N, k0, kt, w_tile);
    at::Tensor dx_tile = dx.narrow(1, k0, kt);
    at::mm_out(dx_tile, dy, w_tile);
  }
  return dx;
}

}  // namespace fastft
