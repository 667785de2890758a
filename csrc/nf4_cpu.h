// CPU kernels of fastft's 4-bit (NF4/FP4) ops. Each takes the packed weight with its statistics
// (see Packed4bit in nf4_codec.h) as separate tensors, exactly as the torch.library ops receive them.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "nf4_codec.h"

namespace fastft {

// Statistics of a packed weight as the ops receive them; absmax is fp32 per block, or uint8 codes when nested.
struct PackedArgs {
  const at::Tensor& packed;
  const at::Tensor& absmax;
  const at::Tensor& code;
  int64_t blocksize;
  const std::optional<at::Tensor>& nested_absmax;
  const std::optional<at::Tensor>& nested_code;
  int64_t nested_blocksize;
  double nested_offset;

  Packed4bit view() const;
};

// (packed uint8 ((n+1)/2, 1), absmax fp32 (ceil(n/blocksize))) of a contiguous fp32/fp16/bf16 weight.
std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& weight, int64_t blocksize,
                                                    const at::Tensor& midpoints, const at::Tensor& order);

// The dequantized weight with `shape` in `dtype`, written into `out` (contiguous, that shape and dtype) if given.
at::Tensor nf4_dequantize_cpu(const PackedArgs& w, at::IntArrayRef shape, at::ScalarType dtype,
                              const std::optional<at::Tensor>& out);

// y = x @ W^T (+ bias) for x (M, K) contiguous, W (N, K); y (M, N) in x's dtype.
at::Tensor nf4_linear_cpu(const at::Tensor& x, const PackedArgs& w, int64_t out_features,
                          const std::optional<at::Tensor>& bias);

// dx = dy @ W for dy (M, N) contiguous, W (N, K); dx (M, K) in dy's dtype.
at::Tensor nf4_linear_grad_input_cpu(const at::Tensor& grad_out, const PackedArgs& w, int64_t in_features);

// Elements [start, start + count) of the flattened weight, dequantized into out (multithreading is the caller's);
// `stream` writes around the caches (for outputs far larger than them).
template <typename T>
void dequantize_range(const Packed4bit& w, int64_t start, int64_t count, T* out, bool stream = false);

}  // namespace fastft
