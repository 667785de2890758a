// CPU kernel of fastft's fused linear log-probabilities (fastft::fused_linear_logprobs).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastft {

// For a contiguous fp32 logits tile z (rows, V) and int64 labels (rows,), each in [0, V): returns (logprob (rows,),
// entropy (rows,) when want_entropy, else an empty tensor, top (rows,): the largest log-probability of the row), fp32. With grad_logprob (rows,) (and optionally
// grad_entropy (rows,)), z is overwritten by the gradient with respect to the logits:
// dz = g (onehot(y) - p) - e p (log p + entropy).
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_rows_cpu(at::Tensor& z, const at::Tensor& labels, bool want_entropy,
                                                                const std::optional<at::Tensor>& grad_logprob,
                                                                const std::optional<at::Tensor>& grad_entropy);

}  // namespace fastft
