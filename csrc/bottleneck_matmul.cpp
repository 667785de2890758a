// result = residual + alpha * (a @ b + bias) with a small inner dimension K (a bottleneck's width).
//
// The fp32 AVX2 path packs b into 16-column panels ([N / 16][K][16], 4 KiB per panel at K = 64, held in L1/L2),
// then each thread takes blocks of 6 rows: 12 ymm accumulators per 6 x 16 tile, one broadcast of a per row and two
// panel loads per k, and the epilogue reads the residual tile and writes the result once. Bytes moved per element of
// the result: read residual, write result (8), against 16 for ATen's copy-then-GEMM(beta = 1).
#include <ATen/Parallel.h>

#include <algorithm>

#include "bottleneck_cpu.h"
#include "nf4_codec.h"

namespace fastft {
namespace {

constexpr int64_t kPanel = 16;
constexpr int kRowBlock = 6;

at::Tensor residual_addmm_aten(const at::Tensor& residual, const at::Tensor& a, const at::Tensor& b,
                               const std::optional<at::Tensor>& bias, double alpha) {
  at::Tensor result = bias.has_value() ? at::add(residual, *bias, alpha) : residual.clone(at::MemoryFormat::Contiguous);
  return result.addmm_(a, b, 1.0, alpha);
}

#ifdef FASTFT_X86
// b (K, N), rows contiguous -> panels [ceil(N / 16)][K][16], the last panel zero-padded.
at::Tensor pack_panels(const at::Tensor& b) {
  const int64_t K = b.size(0), N = b.size(1), panels = (N + kPanel - 1) / kPanel;
  at::Tensor packed = at::zeros({panels, K, kPanel}, b.options());
  const float* src = b.const_data_ptr<float>();
  float* dst = packed.mutable_data_ptr<float>();
  const int64_t ldb = b.stride(0);
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t cols = std::min(kPanel, N - p * kPanel);
      for (int64_t k = 0; k < K; ++k) std::copy_n(src + k * ldb + p * kPanel, cols, dst + (p * K + k) * kPanel);
    }
  });
  return packed;
}

// Epilogue of one row: result = residual + alpha * (acc + bias), for the first `cols` of 16 columns.
FASTFT_AVX2 inline void store_row(__m256 acc0, __m256 acc1, __m256 bias0, __m256 bias1, __m256 scale,
                                  const float* residual, float* result, int64_t cols) {
  const __m256 v0 = _mm256_mul_ps(scale, _mm256_add_ps(acc0, bias0));
  const __m256 v1 = _mm256_mul_ps(scale, _mm256_add_ps(acc1, bias1));
  if (cols == kPanel) {
    _mm256_storeu_ps(result, _mm256_add_ps(_mm256_loadu_ps(residual), v0));
    _mm256_storeu_ps(result + 8, _mm256_add_ps(_mm256_loadu_ps(residual + 8), v1));
    return;
  }
  alignas(32) float tmp[kPanel];
  _mm256_store_ps(tmp, v0);
  _mm256_store_ps(tmp + 8, v1);
  for (int64_t j = 0; j < cols; ++j) result[j] = residual[j] + tmp[j];
}

// One tile of MR (<= 6) rows x 16 columns (the first `cols` of them stored). The accumulators are named
// variables, not an array, so they stay in registers across the k loop.
template <int MR>
FASTFT_AVX2 inline void tile(const float* a, int64_t lda, const float* panel, int64_t K, const float* bias16,
                             float alpha, const float* residual, float* result, int64_t ld, int64_t cols) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(panel + k * kPanel), b1 = _mm256_loadu_ps(panel + k * kPanel + 8);
#define FASTFT_ROW(r)                                             \
  if constexpr (MR > r) {                                         \
    const __m256 ar = _mm256_broadcast_ss(a + r * lda + k);       \
    c##r##0 = _mm256_fmadd_ps(ar, b0, c##r##0);                   \
    c##r##1 = _mm256_fmadd_ps(ar, b1, c##r##1);                   \
  }
    FASTFT_ROW(0) FASTFT_ROW(1) FASTFT_ROW(2) FASTFT_ROW(3) FASTFT_ROW(4) FASTFT_ROW(5)
#undef FASTFT_ROW
  }
  const __m256 scale = _mm256_set1_ps(alpha);
  const __m256 bias0 = _mm256_loadu_ps(bias16), bias1 = _mm256_loadu_ps(bias16 + 8);
#define FASTFT_STORE(r) \
  if constexpr (MR > r) store_row(c##r##0, c##r##1, bias0, bias1, scale, residual + r * ld, result + r * ld, cols);
  FASTFT_STORE(0) FASTFT_STORE(1) FASTFT_STORE(2) FASTFT_STORE(3) FASTFT_STORE(4) FASTFT_STORE(5)
#undef FASTFT_STORE
}

template <int MR>
FASTFT_AVX2 void row_block(const float* a, int64_t lda, const float* packed, const float* bias_padded, int64_t K,
                           int64_t N, float alpha, const float* residual, float* result, int64_t ld) {
  for (int64_t p = 0; p * kPanel < N; ++p) {
    tile<MR>(a, lda, packed + p * K * kPanel, K, bias_padded + p * kPanel, alpha, residual + p * kPanel,
             result + p * kPanel, ld, std::min(kPanel, N - p * kPanel));
  }
}

void residual_addmm_avx2(const at::Tensor& residual, const at::Tensor& a, const at::Tensor& b,
                         const std::optional<at::Tensor>& bias, float alpha, at::Tensor& result) {
  const int64_t T = a.size(0), K = a.size(1), N = b.size(1);
  const at::Tensor packed = pack_panels(b);
  const int64_t padded = packed.size(0) * kPanel;
  at::Tensor bias_padded = at::zeros({padded}, b.options());
  if (bias.has_value()) bias_padded.narrow(0, 0, N).copy_(*bias);
  const float* a_ptr = a.const_data_ptr<float>();
  const float* p_ptr = packed.const_data_ptr<float>();
  const float* bias_ptr = bias_padded.const_data_ptr<float>();
  const float* res_ptr = residual.const_data_ptr<float>();
  float* out_ptr = result.mutable_data_ptr<float>();
  const int64_t lda = a.stride(0), blocks = (T + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t row = blk * kRowBlock, rows = std::min<int64_t>(kRowBlock, T - row);
      const float* ar = a_ptr + row * lda;
      const float* rr = res_ptr + row * N;
      float* orow = out_ptr + row * N;
      switch (rows) {
        case 6: row_block<6>(ar, lda, p_ptr, bias_ptr, K, N, alpha, rr, orow, N); break;
        case 5: row_block<5>(ar, lda, p_ptr, bias_ptr, K, N, alpha, rr, orow, N); break;
        case 4: row_block<4>(ar, lda, p_ptr, bias_ptr, K, N, alpha, rr, orow, N); break;
        case 3: row_block<3>(ar, lda, p_ptr, bias_ptr, K, N, alpha, rr, orow, N); break;
        case 2: row_block<2>(ar, lda, p_ptr, bias_ptr, K, N, alpha, rr, orow, N); break;
        default: row_block<1>(ar, lda, p_ptr, bias_ptr, K, N, alpha, rr, orow, N); break;
      }
    }
  });
}
#endif

}  // namespace

at::Tensor residual_addmm_cpu(const at::Tensor& residual, const at::Tensor& a, const at::Tensor& b,
                              const std::optional<at::Tensor>& bias, double alpha) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && residual.dim() == 2, "residual_addmm: residual, a and b must be 2-D");
  TORCH_CHECK(a.size(1) == b.size(0) && residual.size(0) == a.size(0) && residual.size(1) == b.size(1),
              "residual_addmm: shapes ", residual.sizes(), ", ", a.sizes(), ", ", b.sizes(), " do not chain");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == b.size(1)),
              "residual_addmm: bias must have shape (", b.size(1), ")");
#ifdef FASTFT_X86
  const bool fp32 = residual.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
                    b.scalar_type() == at::kFloat && (!bias.has_value() || bias->scalar_type() == at::kFloat);
  if (fp32 && cpu_has_avx2() && a.size(1) > 0) {
    const at::Tensor res = residual.contiguous();
    const at::Tensor rows = a.stride(1) == 1 ? a : a.contiguous();
    at::Tensor result = at::empty_like(res);
    residual_addmm_avx2(res, rows, b.stride(1) == 1 ? b : b.contiguous(), bias, static_cast<float>(alpha), result);
    return result;
  }
#endif
  return residual_addmm_aten(residual, a, b, bias, alpha);
}

}  // namespace fastft
