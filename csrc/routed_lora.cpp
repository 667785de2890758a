// Per-sample routed LoRA on CPU: rows grouped by adapter with one counting sort of the route (stable, O(M)),
// gathered into an fp32 buffer in that order (the dtype conversion vectorized: AVX-512 16 lanes, AVX2 8 lanes,
// scalar, picked at run time), two rank-r GEMMs per adapter on its contiguous segment (ATen's BLAS, fp32
// accumulation), and the result rows written back to their places converted to the output dtype in one pass.
// Empty adapters cost nothing but their zero gradients; rows of route -1 get 0 (forward) and dx = 0 (backward).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "nf4_codec.h"
#include "routed_lora_cpu.h"

namespace fastft {
namespace {

// order: the routed rows (route >= 0) sorted by adapter, stable; offsets[g]..offsets[g+1]: adapter g's segment.
struct Segments {
  std::vector<int64_t> order, offsets;
  int64_t rows() const { return offsets.back(); }
  int64_t size(size_t g) const { return offsets[g + 1] - offsets[g]; }
};

Segments segment_rows(const at::Tensor& route_in, int64_t count) {
  TORCH_CHECK(route_in.dim() == 1 && route_in.scalar_type() == at::kLong,
              "routed_lora: route must be a 1-D int64 tensor, got ", route_in.scalar_type(), " of dim ",
              route_in.dim());
  const at::Tensor route = route_in.contiguous();
  const int64_t* r = route.const_data_ptr<int64_t>();
  const int64_t M = route.numel();
  Segments s;
  s.offsets.assign(count + 1, 0);
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK_VALUE(r[m] >= -1 && r[m] < count, "routed_lora: route values must be in [-1, ", count, "), got ", r[m]);
    if (r[m] >= 0) ++s.offsets[r[m] + 1];
  }
  for (int64_t g = 0; g < count; ++g) s.offsets[g + 1] += s.offsets[g];
  s.order.resize(s.offsets.back());
  std::vector<int64_t> next(s.offsets.begin(), s.offsets.end() - 1);
  for (int64_t m = 0; m < M; ++m) {
    if (r[m] >= 0) s.order[next[r[m]]++] = m;
  }
  return s;
}

template <typename T>
constexpr bool kVectorType = std::is_same_v<T, float> || std::is_same_v<T, c10::Half> ||
                             std::is_same_v<T, c10::BFloat16>;

#ifdef FASTFT_X86
template <typename S, typename D>
FASTFT_AVX512 int64_t convert_avx512(const S* src, D* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(dst + i, load16(src + i));
  return i;
}

template <typename S, typename D>
FASTFT_AVX2 int64_t convert_avx2(const S* src, D* dst, int64_t n, int64_t i) {
  for (; i + 8 <= n; i += 8) store8(dst + i, load8(src + i));
  return i;
}
#endif

// dst[0:n] = src[0:n] converted (round to nearest even into half precision).
template <typename S, typename D>
void convert_row(const S* src, D* dst, int64_t n, bool avx512, bool avx2) {
  int64_t i = 0;
#ifdef FASTFT_X86
  if constexpr (kVectorType<S> && kVectorType<D>) {
    if (avx512) i = convert_avx512(src, dst, n);
    if (avx2) i = convert_avx2(src, dst, n, i);
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<D>(static_cast<at::opmath_type<D>>(src[i]));
}

// Row i of dst (rows, width) <- row index[i] of src (GATHER), or row index[i] of dst <- row i of src (scatter);
// both contiguous, dtypes converted.
template <bool GATHER>
void move_rows(const at::Tensor& src, const at::Tensor& dst, const std::vector<int64_t>& index) {
  const int64_t width = src.size(1), rows = static_cast<int64_t>(index.size());
  const bool avx512 = cpu_has_avx512(), avx2 = cpu_has_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "routed_lora rows", [&] {
    using S = scalar_t;
    const S* s = src.const_data_ptr<S>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "routed_lora rows", [&] {
      scalar_t* d = dst.mutable_data_ptr<scalar_t>();
      // Threads only for copies of over 2^20 elements: below that one core moves the rows in well under a
      // millisecond, and a parallel region on a busy machine can cost more than the copy.
      at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, width)),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t i = begin; i < end; ++i) {
                           const int64_t from = GATHER ? index[i] : i, to = GATHER ? i : index[i];
                           convert_row<S, scalar_t>(s + from * width, d + to * width, width, avx512, avx2);
                         }
                       });
    });
  });
}

// x's rows in segment order, in the accumulation dtype.
at::Tensor gather(const at::Tensor& x, const Segments& s, at::ScalarType acc) {
  at::Tensor out = at::empty({s.rows(), x.size(1)}, x.options().dtype(acc));
  move_rows<true>(x.contiguous(), out, s.order);
  return out;
}

// (M, width) in `dtype` holding rows of `sorted` at their places; zero where no row lands (route -1).
at::Tensor scatter(const at::Tensor& sorted, const Segments& s, int64_t M, at::ScalarType dtype) {
  at::Tensor out = s.rows() < M ? at::zeros({M, sorted.size(1)}, sorted.options().dtype(dtype))
                                : at::empty({M, sorted.size(1)}, sorted.options().dtype(dtype));
  move_rows<false>(sorted, out, s.order);
  return out;
}

void check_adapters(const at::Tensor& x, const std::vector<at::Tensor>& as, const std::vector<at::Tensor>& bs,
                    const std::vector<double>& scales, const at::Tensor& route) {
  TORCH_CHECK(!as.empty() && as.size() == bs.size() && as.size() == scales.size(),
              "routed_lora: one A, one B and one scale per adapter, got ", as.size(), ", ", bs.size(), ", ",
              scales.size());
  TORCH_CHECK(x.dim() == 2 && route.numel() == x.size(0), "routed_lora: x must be (M, K) with one route per row");
  const int64_t N = bs[0].size(0);
  for (size_t g = 0; g < as.size(); ++g) {
    TORCH_CHECK(as[g].dim() == 2 && as[g].size(1) == x.size(1) && bs[g].dim() == 2 && bs[g].size(0) == N &&
                    bs[g].size(1) == as[g].size(0),
                "routed_lora: adapter ", g, " must have A (r, ", x.size(1), ") and B (", N, ", r)");
    TORCH_CHECK(as[g].scalar_type() == as[0].scalar_type() && bs[g].scalar_type() == as[0].scalar_type(),
                "routed_lora: every A and B must have A_0's dtype");
  }
}

at::ScalarType accumulation(const at::Tensor& a) { return a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

at::Tensor routed_lora_cpu(const at::Tensor& x, const std::vector<at::Tensor>& as, const std::vector<at::Tensor>& bs,
                           const std::vector<double>& scales, const at::Tensor& route) {
  check_adapters(x, as, bs, scales, route);
  const Segments s = segment_rows(route, static_cast<int64_t>(as.size()));
  const at::ScalarType acc = accumulation(as[0]);
  const at::Tensor xs = gather(x, s, acc);
  at::Tensor ys = at::empty({s.rows(), bs[0].size(0)}, xs.options());
  for (size_t g = 0; g < as.size(); ++g) {
    const int64_t n = s.size(g);
    if (n == 0) continue;
    at::Tensor u = at::mm(xs.narrow(0, s.offsets[g], n), as[g].to(acc).t());
    u.mul_(scales[g]);
    at::Tensor rows = ys.narrow(0, s.offsets[g], n);
    at::mm_out(rows, u, bs[g].to(acc).t());
  }
  return scatter(ys, s, x.size(0), as[0].scalar_type());
}

std::tuple<std::optional<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> routed_lora_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::vector<at::Tensor>& as, const std::vector<at::Tensor>& bs,
    const std::vector<double>& scales, const at::Tensor& route, bool want_x) {
  check_adapters(x, as, bs, scales, route);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == x.size(0) && dy.size(1) == bs[0].size(0),
              "routed_lora_backward: dy must be (", x.size(0), ", ", bs[0].size(0), ")");
  const Segments s = segment_rows(route, static_cast<int64_t>(as.size()));
  const at::ScalarType acc = accumulation(as[0]), dtype = as[0].scalar_type();
  const at::Tensor xs = gather(x, s, acc), dys = gather(dy, s, acc);
  at::Tensor dxs = want_x ? at::empty({s.rows(), x.size(1)}, xs.options()) : at::Tensor();
  std::vector<at::Tensor> das, dbs;
  for (size_t g = 0; g < as.size(); ++g) {
    const int64_t n = s.size(g);
    if (n == 0) {
      das.push_back(at::zeros_like(as[g]));
      dbs.push_back(at::zeros_like(bs[g]));
      continue;
    }
    const at::Tensor a = as[g].to(acc), b = bs[g].to(acc);
    const at::Tensor xg = xs.narrow(0, s.offsets[g], n), dyg = dys.narrow(0, s.offsets[g], n);
    at::Tensor u = at::mm(xg, a.t());
    u.mul_(scales[g]);
    at::Tensor du = at::mm(dyg, b);
    du.mul_(scales[g]);
    dbs.push_back(at::mm(dyg.t(), u).to(dtype));
    das.push_back(at::mm(du.t(), xg).to(dtype));
    if (want_x) {
      at::Tensor rows = dxs.narrow(0, s.offsets[g], n);
      at::mm_out(rows, du, a);
    }
  }
  std::optional<at::Tensor> dx;
  if (want_x) dx = scatter(dxs, s, x.size(0), x.scalar_type());
  return {dx, das, dbs};
}

}  // namespace fastft
