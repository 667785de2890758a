// The bottleneck adapter's forward and backward on CPU, fp32, over blocks of 48 token rows (formulas in
// fastft/reference/bottleneck.py; s is the adapter's scale):
//   forward:  z = v W_down^T + b_down,  out = residual + s (act(z) W_up^T + b_up)   (two passes, act(z) between)
//   backward: u = s dy W_up,  dz = act'(z) u,  dv = [dy +] dz W_down,                (one pass)
//             dW_up = s dy^T act(z),  db_up = s sum dy,  dW_down = dz^T v,  db_down = sum dz
// In the backward a block's rows of dy and v (192 KiB at hidden 1024) are copied once from memory and stay in L2
// across every GEMM that reads them, and dv is written once. Run as separate ATen GEMMs, the backward reads dy three
// times and v once more, and the residual adds write and read (tokens, hidden) products. Every GEMM has the
// bottleneck r as one dimension; they all run on one micro-kernel (AVX-512 or AVX2). The weight gradients
// accumulate per chunk of blocks (threads take chunks as they finish) and are summed in chunk order at the end, so
// results do not depend on scheduling.
// act(z) and act'(z) are ATen's, over all rows at once (per block, ATen's per-call cost would dominate).
//
// Micro-kernel (bottleneck_tiles.inc): a tile of up to 6 rows x 16 columns in 12 ymm accumulators (AVX2 + FMA) or
// of 12 rows x 16 columns in 12 zmm (AVX-512), one broadcast of A per row and one 16-float row of B per k. A is
// addressed through a row and a k stride (rows of v, dy or act(z), or their transposes); B is rows of 16 floats:
// weights packed into 16-column panels, or a block of act(z) / dz whose rows are padded to whole panels. Without
// AVX2, for bottlenecks wider than kMaxRank and for calls of fewer than kMinTokens, the functions compute the same
// formulas with ATen ops.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>

#include "bottleneck_cpu.h"
#include "memory.h"
#include "nf4_codec.h"

namespace fastft {
namespace {

constexpr int64_t kPanel = 16;
constexpr int64_t kRowBlock = 48;  // a multiple of every tile's rows
// Widest bottleneck the kernels take. Above it MKL's GEMMs, whose inner dimension grows with r, run as fast as the
// micro-kernel, and the per-thread weight-gradient sums (hidden x r) no longer stay in cache across blocks
// (measured: r = 128 and 256 at hidden 2048-4096 were 0.7-1.0x the ATen composition, r <= 64 1.2-2x).
constexpr int64_t kMaxRank = 64;
// Fewest tokens the kernels take. Each call packs both weights and (backward) sums per-thread weight-gradient parts,
// a fixed ~0.3-1 ms at hidden 1024; measured against the ATen composition at hidden 1024, r = 64: 0.4-0.7x at 128
// tokens, 1.0x at 512, 1.1-1.2x at 1024, 1.2-1.4x at 4096.
constexpr int64_t kMinTokens = 1024;
constexpr int64_t kMinChunkBlocks = 8;

bool use_kernels(int64_t tokens, int64_t rank) {
  return cpu_has_avx2() && rank <= kMaxRank && tokens >= kMinTokens;
}

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

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

void check_shapes(const char* fn, const at::Tensor& rows, const at::Tensor& w_down, const at::Tensor& w_up) {
  const int64_t H = rows.size(1), r = w_down.size(0);
  TORCH_CHECK(w_down.size(1) == H && w_up.size(0) == H && w_up.size(1) == r, fn, ": shapes ", rows.sizes(),
              ", w_down ", w_down.sizes(), ", w_up ", w_up.sizes(), " do not chain");
}

// Row stride of a block copy of (rows, H): whole panels, and an odd number of cache lines so the rows of a block
// fall into different L1 sets (at H = 1024 an unpadded block's column is 48 lines in one 8-way set).
int64_t padded_stride(int64_t H) {
  const int64_t ld = round_up(std::max<int64_t>(H, 1), kPanel);
  return (ld / kPanel) % 2 == 0 ? ld + kPanel : ld;
}

// work(worker, item) for items [0, items) on up to `workers` threads, each taking the next item when done with
// its last: a thread slowed by another process on its core takes fewer (a static split would wait for it).
template <class Work>
void for_each_dynamic(int64_t items, int64_t workers, const Work& work) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(1, std::min(workers, items)), 1, [&](int64_t worker, int64_t) {
    for (int64_t item = next++; item < items; item = next++) work(worker, item);
  });
}

#ifdef FASTFT_X86
// B (K, N) packed into 16-column panels [N / 16][K][16], zero-padded, with the bias (or zeros) padded likewise.
struct Panels {
  at::Tensor packed, bias;
  int64_t K, N;

  Panels(const at::Tensor& b, const std::optional<at::Tensor>& bias_in) : K(b.size(0)), N(b.size(1)) {
    const int64_t panels = round_up(N, kPanel) / kPanel, stride_k = b.stride(0), stride_n = b.stride(1);
    packed = at::empty({panels, K, kPanel}, b.options());
    bias = at::zeros({panels * kPanel}, b.options());
    if (bias_in.has_value()) bias.narrow(0, 0, N).copy_(*bias_in);
    const float* src = b.const_data_ptr<float>();
    float* dst = packed.mutable_data_ptr<float>();
    if (N % kPanel != 0) packed[panels - 1].zero_();  // the last panel's padding columns
    // walk the source along its contiguous dimension (b is W or W^T of a row-major weight)
    if (stride_n == 1) {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t n = 0; n < N; ++n) dst[((n / kPanel) * K + k) * kPanel + n % kPanel] = src[k * stride_k + n];
    } else {
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k)
          dst[((n / kPanel) * K + k) * kPanel + n % kPanel] = src[k * stride_k + n * stride_n];
    }
    packed_ptr = packed.const_data_ptr<float>();
    bias_ptr = bias.const_data_ptr<float>();
  }
  const float* panel(int64_t p) const { return packed_ptr + p * K * kPanel; }
  const float* bias16(int64_t p) const { return bias_ptr + p * kPanel; }

 private:
  const float* packed_ptr;  // raw pointers: the tile loop asks for a panel per tile
  const float* bias_ptr;
};

// The rows [k0, k0 + kc) of B that one pass of gemm_tile multiplies; the sums of earlier passes wait in out, the
// last pass applies the epilogue.
struct KBlock {
  int64_t k0, kc;
  bool first, last;
};

// The tile functions for each vector width (bottleneck_tiles.inc): 6 rows of two ymm per tile on AVX2 (12 of 16
// registers), 12 rows of one zmm on AVX-512 (12 of 32: the broadcast operand stays in memory).
namespace avx2 {
constexpr int kTileRows = 6;

struct Vec {
  __m256 lo, hi;
};
FASTFT_AVX2 inline Vec vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
FASTFT_AVX2 inline Vec vset1(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
FASTFT_AVX2 inline Vec vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
FASTFT_AVX2 inline void vstore(float* p, Vec v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
FASTFT_AVX2 inline Vec vload(const float* p, int64_t cols) {
  if (cols == kPanel) return vload(p);
  alignas(32) float tmp[kPanel] = {};
  std::copy_n(p, cols, tmp);
  return vload(tmp);
}
FASTFT_AVX2 inline void vstore(float* p, Vec v, int64_t cols) {
  if (cols == kPanel) return vstore(p, v);
  alignas(32) float tmp[kPanel];
  vstore(tmp, v);
  std::copy_n(tmp, cols, p);
}
FASTFT_AVX2 inline Vec vadd(Vec a, Vec b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
FASTFT_AVX2 inline Vec vmul(Vec a, Vec b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
FASTFT_AVX2 inline Vec vfma_broadcast(const float* a, Vec b, Vec c) {
  const __m256 ai = _mm256_broadcast_ss(a);
  return {_mm256_fmadd_ps(ai, b.lo, c.lo), _mm256_fmadd_ps(ai, b.hi, c.hi)};
}

#define FASTFT_TILE_TARGET FASTFT_AVX2
#include "bottleneck_tiles.inc"
#undef FASTFT_TILE_TARGET
}  // namespace avx2

namespace avx512 {
constexpr int kTileRows = 12;

using Vec = __m512;
FASTFT_AVX512 inline Vec vzero() { return _mm512_setzero_ps(); }
FASTFT_AVX512 inline Vec vset1(float v) { return _mm512_set1_ps(v); }
FASTFT_AVX512 inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
FASTFT_AVX512 inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
FASTFT_AVX512 inline Vec vload(const float* p, int64_t cols) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << cols) - 1), p);
}
FASTFT_AVX512 inline void vstore(float* p, Vec v, int64_t cols) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << cols) - 1), v);
}
FASTFT_AVX512 inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
FASTFT_AVX512 inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
FASTFT_AVX512 inline Vec vfma_broadcast(const float* a, Vec b, Vec c) {
  return _mm512_fmadd_ps(_mm512_set1_ps(*a), b, c);
}

#define FASTFT_TILE_TARGET FASTFT_AVX512
#include "bottleneck_tiles.inc"
#undef FASTFT_TILE_TARGET
}  // namespace avx512

void gemm_rows(const float* a, int64_t lda, int64_t rows, const Panels& b, float alpha, const float* residual,
               int64_t ldr, float* out, int64_t ldo) {
  if (cpu_has_avx512()) {
    avx512::gemm_rows(a, lda, rows, b, alpha, residual, ldr, out, ldo);
  } else {
    avx2::gemm_rows(a, lda, rows, b, alpha, residual, ldr, out, ldo);
  }
}

void accumulate_tn(const float* x, int64_t ldx, int64_t M, int64_t K, const float* y, int64_t n_pad, float* c,
                   bool first) {
  if (cpu_has_avx512()) {
    avx512::accumulate_tn(x, ldx, M, K, y, n_pad, c, first);
  } else {
    avx2::accumulate_tn(x, ldx, M, K, y, n_pad, c, first);
  }
}

// dst (rows, cols) at stride ld = src rows (stride cols); column sums added to sums (fp64) when given.
FASTFT_AVX2 void copy_rows(const float* src, int64_t rows, int64_t cols, float* dst, int64_t ld, float* block_sums,
                           double* sums) {
  if (sums != nullptr) std::fill_n(block_sums, cols, 0.f);
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = src + i * cols;
    std::memcpy(dst + i * ld, s, cols * sizeof(float));
    if (sums != nullptr)
      for (int64_t j = 0; j < cols; ++j) block_sums[j] += s[j];
  }
  if (sums != nullptr)
    for (int64_t j = 0; j < cols; ++j) sums[j] += block_sums[j];
}

// dW_up (H, r) = scale * sum of up_parts and dW_down (r, H) = the transposed sum of down_parts, over the chunks
// in order (parts: (chunks, H, r_pad)).
void sum_parts(const at::Tensor& up_parts, const at::Tensor& down_parts, float scale, at::Tensor& dw_up,
               at::Tensor& dw_down) {
  const int64_t chunks = up_parts.size(0), H = up_parts.size(1), r_pad = up_parts.size(2), r = dw_up.size(1);
  const float* up = up_parts.const_data_ptr<float>();
  const float* down = down_parts.const_data_ptr<float>();
  float* dw_up_ptr = dw_up.mutable_data_ptr<float>();
  float* dw_down_ptr = dw_down.mutable_data_ptr<float>();
  at::parallel_for(0, H, 64, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t j = 0; j < r; ++j) {
        float up_sum = 0.f, down_sum = 0.f;
        for (int64_t c = 0; c < chunks; ++c) {
          up_sum += up[(c * H + h) * r_pad + j];
          down_sum += down[(c * H + h) * r_pad + j];
        }
        dw_up_ptr[h * r + j] = up_sum * scale;
        dw_down_ptr[j * H + h] = down_sum;
      }
  });
}
#endif

std::tuple<at::Tensor, at::Tensor> forward_aten(const at::Tensor& v, const at::Tensor& residual,
                                                const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
                                                const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                                                const std::string& activation, double scale) {
  at::Tensor z = b_down.has_value() ? at::addmm(*b_down, v, w_down.t()) : at::mm(v, w_down.t());
  at::Tensor out = b_up.has_value() ? at::add(residual, *b_up, scale) : residual.clone();
  out.addmm_(activate(z, activation), w_up.t(), 1.0, scale);
  return {out, z};
}

BottleneckGrads backward_aten(const at::Tensor& dy, const at::Tensor& v, const at::Tensor& z,
                              const at::Tensor& w_down, const at::Tensor& w_up, const std::string& activation,
                              double scale, bool add_dy, bool need_dv, bool need_weights) {
  at::Tensor u = at::mm(dy, w_up).mul_(scale);
  const at::Tensor dz = activation_grad(u, z, activation);
  at::Tensor dv = !need_dv ? at::empty({0}, dy.options()) : add_dy ? at::addmm(dy, dz, w_down) : at::mm(dz, w_down);
  if (!need_weights) return {dv, at::empty({0}, dy.options()), at::empty({0}, dy.options()),
                             at::empty({0}, dy.options()), at::empty({0}, dy.options())};
  return {dv, at::mm(dz.t(), v), dz.sum(0), at::mm(dy.t(), activate(z, activation)).mul_(scale),
          dy.sum(0).mul_(scale)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_cpu(const at::Tensor& v_in, const at::Tensor& residual_in,
                                                          const at::Tensor& w_down,
                                                          const std::optional<at::Tensor>& b_down,
                                                          const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                                                          const std::string& activation, double scale) {
  check_fp32(v_in, "v");
  check_fp32(residual_in, "residual");
  check_fp32(w_down, "w_down");
  check_fp32(w_up, "w_up");
  check_shapes("bottleneck_adapter", v_in, w_down, w_up);
  TORCH_CHECK(residual_in.sizes() == v_in.sizes(), "bottleneck_adapter: residual ", residual_in.sizes(),
              " must have v's shape ", v_in.sizes());
#ifdef FASTFT_X86
  if (use_kernels(v_in.size(0), w_down.size(0))) {
    const at::Tensor v = v_in.contiguous(), residual = residual_in.contiguous();
    const int64_t T = v.size(0), H = v.size(1), r = w_down.size(0);
    at::Tensor z = at::empty({T, r}, v.options()), out = empty_huge_pages({T, H}, v.options());
    const Panels down(w_down.t(), b_down), up(w_up.t(), b_up);
    const float* v_ptr = v.const_data_ptr<float>();
    const float* res_ptr = residual.const_data_ptr<float>();
    float* z_ptr = z.mutable_data_ptr<float>();
    float* out_ptr = out.mutable_data_ptr<float>();
    const int64_t blocks = (T + kRowBlock - 1) / kRowBlock;
    for_each_dynamic(blocks, at::get_num_threads(), [&](int64_t, int64_t blk) {
      const int64_t row = blk * kRowBlock;
      gemm_rows(v_ptr + row * H, H, std::min(kRowBlock, T - row), down, 1.f, nullptr, 0, z_ptr + row * r, r);
    });
    const at::Tensor a = activate(z, activation);
    const float* a_ptr = a.const_data_ptr<float>();
    for_each_dynamic(blocks, at::get_num_threads(), [&](int64_t, int64_t blk) {
      const int64_t row = blk * kRowBlock;
      gemm_rows(a_ptr + row * r, r, std::min(kRowBlock, T - row), up, static_cast<float>(scale), res_ptr + row * H,
                H, out_ptr + row * H, H);
    });
    return {out, z};
  }
#endif
  return forward_aten(v_in, residual_in, w_down, b_down, w_up, b_up, activation, scale);
}

BottleneckGrads bottleneck_backward_cpu(const at::Tensor& dy_in, const at::Tensor& v_in, const at::Tensor& z_in,
                                        const at::Tensor& w_down, const at::Tensor& w_up,
                                        const std::string& activation, double scale, bool add_dy, bool need_dv,
                                        bool need_weights) {
  check_fp32(dy_in, "dy");
  check_fp32(v_in, "v");
  check_fp32(z_in, "z");
  check_fp32(w_down, "w_down");
  check_fp32(w_up, "w_up");
  check_shapes("bottleneck_backward", dy_in, w_down, w_up);
  TORCH_CHECK(v_in.sizes() == dy_in.sizes() && z_in.size(0) == dy_in.size(0) && z_in.size(1) == w_down.size(0),
              "bottleneck_backward: shapes dy ", dy_in.sizes(), ", v ", v_in.sizes(), ", z ", z_in.sizes(),
              " do not chain");
#ifdef FASTFT_X86
  if (use_kernels(dy_in.size(0), w_down.size(0))) {
    const at::Tensor dy = dy_in.contiguous(), v = v_in.contiguous(), z = z_in.contiguous();
    const int64_t T = dy.size(0), H = dy.size(1), r = w_down.size(0), r_pad = round_up(r, kPanel);
    const int64_t ld = padded_stride(H), blocks = (T + kRowBlock - 1) / kRowBlock;
    // Chunks of consecutive blocks, each with its own weight-gradient parts (summed in chunk order, so the result
    // does not depend on which thread ran which chunk): kMinChunkBlocks blocks at least (a chunk writes and sums a
    // (H, r) part per weight), two per thread, so that threads taking chunks as they finish stay balanced.
    const int64_t workers = at::get_num_threads();
    const int64_t chunk_blocks =
        std::max<int64_t>({1, std::min(kMinChunkBlocks, blocks), (blocks + 2 * workers - 1) / (2 * workers)});
    const int64_t chunks = (blocks + chunk_blocks - 1) / chunk_blocks;
    const at::TensorOptions f32 = dy.options();
    const Panels dy_to_u(w_up, std::nullopt), dz_to_dv(w_down, std::nullopt);
    // act(z) and act'(z) over all rows: ATen's elementwise kernels cost ~15 us per call on a 48-row block. act's
    // rows are padded with zeros to whole panels: it is accumulate_tn's B operand as it stands.
    at::Tensor act = need_weights ? activate(z, activation) : at::empty({0}, f32);
    if (need_weights && r != r_pad) act = at::constant_pad_nd(act, {0, r_pad - r});
    const at::Tensor slope = activation_grad(at::ones({1, 1}, f32).expand_as(z), z, activation).contiguous();
    at::Tensor dv = need_dv ? empty_huge_pages({T, H}, f32) : at::empty({0}, f32);
    // per chunk of blocks: dW_up^T / s and dW_down^T as (H, r_pad), sum dy and sum dz in fp64; per worker, scratch
    // of a block: copies of its dy and v rows at stride ld, and dz at stride r_pad (zero padding: accumulate_tn's B)
    const int64_t parts = need_weights ? chunks : 0;
    at::Tensor up_parts = at::empty({parts, H, r_pad}, f32), down_parts = at::empty({parts, H, r_pad}, f32);
    at::Tensor dy_sums = at::zeros({parts, H}, f32.dtype(at::kDouble));
    at::Tensor dz_sums = at::zeros({parts, r}, f32.dtype(at::kDouble));
    at::Tensor row_copies = at::empty({workers, 2, kRowBlock, ld}, f32), sums_scratch = at::empty({workers, H}, f32);
    at::Tensor dz_rows = at::zeros({workers, kRowBlock, r_pad}, f32);
    const float* dy_ptr = dy.const_data_ptr<float>();
    const float* v_ptr = v.const_data_ptr<float>();
    const float* act_ptr = need_weights ? act.const_data_ptr<float>() : nullptr;
    const float* slope_ptr = slope.const_data_ptr<float>();
    float* dv_ptr = need_dv ? dv.mutable_data_ptr<float>() : nullptr;
    for_each_dynamic(chunks, workers, [&](int64_t worker, int64_t chunk) {
      float* dy_rows = row_copies.mutable_data_ptr<float>() + worker * 2 * kRowBlock * ld;
      float* v_rows = dy_rows + kRowBlock * ld;
      float* dz = dz_rows.mutable_data_ptr<float>() + worker * kRowBlock * r_pad;
      float* block_sums = sums_scratch.mutable_data_ptr<float>() + worker * H;
      float* up_part = need_weights ? up_parts.mutable_data_ptr<float>() + chunk * H * r_pad : nullptr;
      float* down_part = need_weights ? down_parts.mutable_data_ptr<float>() + chunk * H * r_pad : nullptr;
      double* dy_sum = need_weights ? dy_sums.mutable_data_ptr<double>() + chunk * H : nullptr;
      double* dz_sum = need_weights ? dz_sums.mutable_data_ptr<double>() + chunk * r : nullptr;
      for (int64_t blk = chunk * chunk_blocks; blk < std::min(blocks, (chunk + 1) * chunk_blocks); ++blk) {
        const int64_t row = blk * kRowBlock, rows = std::min(kRowBlock, T - row);
        const bool first = blk == chunk * chunk_blocks;  // the chunk's first block writes its gradient parts
        copy_rows(dy_ptr + row * H, rows, H, dy_rows, ld, block_sums, dy_sum);
        gemm_rows(dy_rows, ld, rows, dy_to_u, static_cast<float>(scale), nullptr, 0, dz, r_pad);  // u
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < r; ++j) dz[i * r_pad + j] *= slope_ptr[(row + i) * r + j];
        if (need_dv) gemm_rows(dz, r_pad, rows, dz_to_dv, 1.f, add_dy ? dy_rows : nullptr, ld, dv_ptr + row * H, H);
        if (need_weights) {
          accumulate_tn(dy_rows, ld, H, rows, act_ptr + row * r_pad, r_pad, up_part, first);
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < r; ++j) dz_sum[j] += dz[i * r_pad + j];
          copy_rows(v_ptr + row * H, rows, H, v_rows, ld, nullptr, nullptr);
          accumulate_tn(v_rows, ld, H, rows, dz, r_pad, down_part, first);
        }
      }
    });
    if (!need_weights) return {dv, at::empty({0}, f32), at::empty({0}, f32), at::empty({0}, f32), at::empty({0}, f32)};
    at::Tensor dw_down = at::empty({r, H}, f32), dw_up = at::empty({H, r}, f32);
    sum_parts(up_parts, down_parts, static_cast<float>(scale), dw_up, dw_down);
    return {dv, dw_down, dz_sums.sum(0).to(at::kFloat), dw_up, dy_sums.sum(0).mul_(scale).to(at::kFloat)};
  }
#endif
  return backward_aten(dy_in, v_in, z_in, w_down, w_up, activation, scale, add_dy, need_dv, need_weights);
}

}  // namespace fastft
