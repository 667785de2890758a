// CPU kernels of fastft's LoRA ops.
#pragma once

#include <ATen/ATen.h>

namespace fastft {

// x * keep / (1 - p) with keep a function of (seed, flat index); x any float dtype, result in x's dtype.
at::Tensor lora_dropout_cpu(const at::Tensor& x, double p, int64_t seed);

}  // namespace fastft
