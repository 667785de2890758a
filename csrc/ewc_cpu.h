// CPU kernel of fastft's EWC penalty pass (specification: fastft/reference/ewc.py).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastft {

// For every parameter i and element e: d = p - anchor; fd = fisher * d; grad += lambda * fd; sum += fd * d.
// One parallel pass over a work list of fixed-size segments cut from all the tensors (no per-tensor launch, no
// temporaries). params / grads: fp32, bf16, fp16 or fp64, each grad of its parameter's dtype; fisher / anchor: fp32,
// bf16 or fp64, the same dtype for one parameter; all contiguous, each list entry of one numel. Arithmetic in fp32
// (fp64 when a parameter or its storage is fp64), segment sums in fp64 added in a fixed order (the result does not
// depend on the thread count). Returns lambda / 2 * sum as a 0-d tensor, fp64 when params[0] is fp64, else fp32.
at::Tensor ewc_penalty_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                           const std::vector<at::Tensor>& fisher, const std::vector<at::Tensor>& anchor,
                           double lam);

}  // namespace fastft
