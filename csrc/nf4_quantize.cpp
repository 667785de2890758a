// 4-bit blockwise quantization, bit-exact with bitsandbytes: codes count the midpoints strictly below the scaled
// value; full blocks scale by fp32(1 / absmax), a partial last block divides by absmax and stores it clamped
// to >= 1e-38 (as bitsandbytes does).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "nf4_cpu.h"

namespace fastft {
namespace {

inline uint8_t code_of(float scaled, const float* midpoints, const uint8_t* order) {
  int slot = 0;
  for (int i = 0; i < 15; ++i) slot += midpoints[i] < scaled;
  return order[slot];
}

template <typename T>
void quantize_blocks(const T* x, int64_t n, int64_t blocksize, const float* midpoints, const uint8_t* order,
                     uint8_t* packed, float* absmax) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int64_t full_blocks = n / blocksize;
  const uint8_t pad_code = code_of(0.f, midpoints, order);
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t end = std::min(n, start + blocksize);
      float amax = 0.f;
      for (int64_t e = start; e < end; ++e) amax = std::max(amax, std::fabs(static_cast<float>(x[e])));
      const float safe = std::max(amax, 1e-38f);
      const float inv = 1.0f / safe;
      const bool partial = b >= full_blocks;
      absmax[b] = partial ? safe : amax;
      auto code = [&](int64_t e) {
        if (e >= n) return pad_code;
        const float v = static_cast<float>(x[e]);
        const float scaled = std::clamp(partial ? v / safe : v * inv, -1.f, 1.f);
        return code_of(scaled, midpoints, order);
      };
      for (int64_t e = start; e < end; e += 2) packed[e / 2] = static_cast<uint8_t>(code(e) << 4 | code(e + 1));
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& weight, int64_t blocksize,
                                                    const at::Tensor& midpoints, const at::Tensor& order) {
  const at::Tensor x = weight.contiguous();
  const int64_t n = x.numel();
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(n + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nf4_quantize_cpu", [&] {
    quantize_blocks<scalar_t>(x.const_data_ptr<scalar_t>(), n, blocksize, midpoints.const_data_ptr<float>(),
                              order.const_data_ptr<uint8_t>(), packed.mutable_data_ptr<uint8_t>(),
                              absmax.mutable_data_ptr<float>());
  });
  return {packed, absmax};
}

}  // namespace fastft
