// The bottleneck adapter's GEMMs whose output is (tokens, hidden), with the residual in their epilogue:
//   forward:  out = residual + s * (act(z) @ W_up^T + b_up),  z = v @ W_down^T + b_down  (ATen GEMM)
//   backward: dv = [dy +] dz @ W_down,  dz = act'(z) * s * (dy @ W_up)                   (ATen GEMM)
// Their inner dimension is the bottleneck r, so the (tokens, hidden) tensors are read (residual) and written (out)
// once: 8 bytes per element, where ATen's copy-then-GEMM(beta = 1) moves 16. The GEMMs with inner dimension
// hidden are ATen's (MKL/oneDNN are faster there), as are the activations and their derivatives, which thus round
// exactly as the reference does.
//
// Small-K GEMM kernel (AVX2 + FMA, fp32): B is packed into 16-column panels ([N / 16][K][16], zero-padded, 4 KiB
// per panel at K = 64); a tile of up to 6 rows x 16 columns keeps 12 ymm accumulators across the k loop (one
// broadcast of A per row, two panel loads per k) and its epilogue writes [residual +] alpha * (acc + bias) once.
// Without AVX2 the functions compute the same formulas with ATen ops.
#include <ATen/Parallel.h>

#include <algorithm>

#include "bottleneck_cpu.h"
#include "memory.h"
#include "nf4_codec.h"

namespace fastft {
namespace {

constexpr int64_t kPanel = 16;
constexpr int kRowBlock = 6;

at::Tensor activate(const at::Tensor& z, const std::string& activation) {
  if (activation == "relu") return at::relu(z);
  if (activation == "gelu") return at::gelu(z);
  if (activation == "gelu_tanh") return at::gelu(z, "tanh");
  if (activation == "silu") return at::silu(z);
  TORCH_CHECK(false, "activation must be one of relu, gelu, gelu_tanh, silu; got ", activation);
}

at::Tensor activation_grad(const at::Tensor& grad, const at::Tensor& z, const std::string& activation) {
  if (activation == "relu") return at::threshold_backward(grad, z, 0);
  if (activation == "gelu") return at::gelu_backward(grad, z);
  if (activation == "gelu_tanh") return at::gelu_backward(grad, z, "tanh");
  if (activation == "silu") return at::silu_backward(grad, z);
  TORCH_CHECK(false, "activation must be one of relu, gelu, gelu_tanh, silu; got ", activation);
}

void check_fp32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2, "bottleneck kernels: ", name,
              " must be a 2-D float32 tensor, got ", t.scalar_type(), " of shape ", t.sizes());
}

#ifdef FASTFT_X86
// B (K, N) packed into 16-column panels, with the bias (or zeros) padded to whole panels.
struct Panels {
  at::Tensor packed, bias;
  int64_t K, N;

  Panels(const at::Tensor& b_in, const std::optional<at::Tensor>& bias_in) : K(b_in.size(0)), N(b_in.size(1)) {
    const at::Tensor b = b_in.contiguous();
    const int64_t panels = (N + kPanel - 1) / kPanel;
    packed = at::zeros({panels, K, kPanel}, b.options());
    bias = at::zeros({panels * kPanel}, b.options());
    if (bias_in.has_value()) bias.narrow(0, 0, N).copy_(*bias_in);
    const float* src = b.const_data_ptr<float>();
    float* dst = packed.mutable_data_ptr<float>();
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t cols = std::min(kPanel, N - p * kPanel);
      for (int64_t k = 0; k < K; ++k) std::copy_n(src + k * N + p * kPanel, cols, dst + (p * K + k) * kPanel);
    }
  }
  const float* panel(int64_t p) const { return packed.const_data_ptr<float>() + p * K * kPanel; }
  const float* bias16(int64_t p) const { return bias.const_data_ptr<float>() + p * kPanel; }
};

// One row of a tile's epilogue: out = [residual +] alpha * (acc + bias), the first `cols` of 16 columns.
FASTFT_AVX2 inline void store_row(__m256 acc0, __m256 acc1, __m256 bias0, __m256 bias1, __m256 alpha,
                                  const float* residual, float* out, int64_t cols) {
  __m256 v0 = _mm256_mul_ps(alpha, _mm256_add_ps(acc0, bias0));
  __m256 v1 = _mm256_mul_ps(alpha, _mm256_add_ps(acc1, bias1));
  if (cols == kPanel) {
    if (residual != nullptr) {
      v0 = _mm256_add_ps(_mm256_loadu_ps(residual), v0);
      v1 = _mm256_add_ps(_mm256_loadu_ps(residual + 8), v1);
    }
    _mm256_storeu_ps(out, v0);
    _mm256_storeu_ps(out + 8, v1);
    return;
  }
  alignas(32) float tmp[kPanel];
  _mm256_store_ps(tmp, v0);
  _mm256_store_ps(tmp + 8, v1);
  for (int64_t j = 0; j < cols; ++j) out[j] = (residual != nullptr ? residual[j] : 0.f) + tmp[j];
}

// MR (<= 6) rows of A times one panel. The accumulators are named variables, not an array, so they stay in
// registers across the k loop.
template <int MR>
FASTFT_AVX2 inline void tile(const float* a, int64_t lda, const Panels& b, int64_t p, float alpha,
                             const float* residual, int64_t ldr, float* out, int64_t ldo) {
  const float* panel = b.panel(p);
  const int64_t K = b.K, cols = std::min(kPanel, b.N - p * kPanel);
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(panel + k * kPanel), b1 = _mm256_loadu_ps(panel + k * kPanel + 8);
#define FASTFT_ROW(r)                                       \
  if constexpr (MR > r) {                                   \
    const __m256 ar = _mm256_broadcast_ss(a + r * lda + k); \
    c##r##0 = _mm256_fmadd_ps(ar, b0, c##r##0);             \
    c##r##1 = _mm256_fmadd_ps(ar, b1, c##r##1);             \
  }
    FASTFT_ROW(0) FASTFT_ROW(1) FASTFT_ROW(2) FASTFT_ROW(3) FASTFT_ROW(4) FASTFT_ROW(5)
#undef FASTFT_ROW
  }
  const __m256 scale = _mm256_set1_ps(alpha);
  const __m256 bias0 = _mm256_loadu_ps(b.bias16(p)), bias1 = _mm256_loadu_ps(b.bias16(p) + 8);
  const int64_t col = p * kPanel;
#define FASTFT_STORE(r)                                                                                      \
  if constexpr (MR > r)                                                                                      \
    store_row(c##r##0, c##r##1, bias0, bias1, scale, residual != nullptr ? residual + r * ldr + col : nullptr, \
              out + r * ldo + col, cols);
  FASTFT_STORE(0) FASTFT_STORE(1) FASTFT_STORE(2) FASTFT_STORE(3) FASTFT_STORE(4) FASTFT_STORE(5)
#undef FASTFT_STORE
}

template <int MR>
FASTFT_AVX2 void row_block(const float* a, int64_t lda, const Panels& b, float alpha, const float* residual,
                           int64_t ldr, float* out, int64_t ldo) {
  for (int64_t p = 0; p * kPanel < b.N; ++p) tile<MR>(a, lda, b, p, alpha, residual, ldr, out, ldo);
}

// out[T, N] = [residual +] alpha * (a[T, K] @ B + bias), rows contiguous, blocks of 6 rows over the threads.
FASTFT_AVX2 at::Tensor residual_gemm(const at::Tensor& a, const Panels& b, float alpha,
                                     const std::optional<at::Tensor>& residual) {
  const int64_t T = a.size(0), N = b.N;
  at::Tensor out = empty_huge_pages({T, N}, a.options());
  const float* a_ptr = a.const_data_ptr<float>();
  const float* res_ptr = residual.has_value() ? residual->const_data_ptr<float>() : nullptr;
  float* out_ptr = out.mutable_data_ptr<float>();
  const int64_t lda = a.size(1), blocks = (T + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t row = blk * kRowBlock;
      const float* ar = a_ptr + row * lda;
      const float* rr = res_ptr != nullptr ? res_ptr + row * N : nullptr;
      float* orow = out_ptr + row * N;
      switch (std::min<int64_t>(kRowBlock, T - row)) {
        case 6: row_block<6>(ar, lda, b, alpha, rr, N, orow, N); break;
        case 5: row_block<5>(ar, lda, b, alpha, rr, N, orow, N); break;
        case 4: row_block<4>(ar, lda, b, alpha, rr, N, orow, N); break;
        case 3: row_block<3>(ar, lda, b, alpha, rr, N, orow, N); break;
        case 2: row_block<2>(ar, lda, b, alpha, rr, N, orow, N); break;
        default: row_block<1>(ar, lda, b, alpha, rr, N, orow, N); break;
      }
    }
  });
  return out;
}
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> bottleneck_forward_cpu(const at::Tensor& v_in, const at::Tensor& residual_in,
                                                          const at::Tensor& w_down,
                                                          const std::optional<at::Tensor>& b_down,
                                                          const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                                                          const std::string& activation, double scale) {
  check_fp32(v_in, "v");
  check_fp32(residual_in, "residual");
  check_fp32(w_down, "w_down");
  check_fp32(w_up, "w_up");
  const int64_t H = v_in.size(1), r = w_down.size(0);
  TORCH_CHECK(w_down.size(1) == H && w_up.size(0) == H && w_up.size(1) == r && residual_in.sizes() == v_in.sizes(),
              "bottleneck_forward: shapes v ", v_in.sizes(), ", residual ", residual_in.sizes(), ", w_down ",
              w_down.sizes(), ", w_up ", w_up.sizes(), " do not chain");
  at::Tensor z = b_down.has_value() ? at::addmm(*b_down, v_in, w_down.t()) : at::mm(v_in, w_down.t());
#ifdef FASTFT_X86
  if (cpu_has_avx2()) {
    const at::Tensor a = activate(z, activation).contiguous();
    return {residual_gemm(a, Panels(w_up.t(), b_up), static_cast<float>(scale), residual_in.contiguous()), z};
  }
#endif
  at::Tensor out = b_up.has_value() ? at::add(residual_in, *b_up, scale) : residual_in.clone();
  out.addmm_(activate(z, activation), w_up.t(), 1.0, scale);
  return {out, z};
}

std::tuple<at::Tensor, at::Tensor> bottleneck_input_grad_cpu(const at::Tensor& dy_in, const at::Tensor& z_in,
                                                             const at::Tensor& w_up, const at::Tensor& w_down,
                                                             const std::string& activation, double scale,
                                                             bool add_dy) {
  check_fp32(dy_in, "dy");
  check_fp32(z_in, "z");
  check_fp32(w_up, "w_up");
  check_fp32(w_down, "w_down");
  const int64_t T = dy_in.size(0), H = dy_in.size(1), r = w_up.size(1);
  TORCH_CHECK(w_up.size(0) == H && w_down.size(0) == r && w_down.size(1) == H && z_in.size(0) == T &&
                  z_in.size(1) == r,
              "bottleneck_input_grad: shapes dy ", dy_in.sizes(), ", z ", z_in.sizes(), ", w_up ", w_up.sizes(),
              ", w_down ", w_down.sizes(), " do not chain");
  at::Tensor dz = activation_grad(at::mm(dy_in, w_up).mul_(scale), z_in, activation);
#ifdef FASTFT_X86
  if (cpu_has_avx2()) {
    const std::optional<at::Tensor> residual = add_dy ? std::optional<at::Tensor>(dy_in.contiguous()) : std::nullopt;
    return {dz, residual_gemm(dz.contiguous(), Panels(w_down, std::nullopt), 1.f, residual)};
  }
#endif
  at::Tensor dv = add_dy ? at::addmm(dy_in, dz, w_down) : at::mm(dz, w_down);
  return {dz, dv};
}

}  // namespace fastft
