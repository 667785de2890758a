// CPU kernel of fastft's fused distillation loss.
#pragma once

#include <ATen/ATen.h>

namespace fastft {

// For contiguous fp32 logits tiles (rows, V): returns the per-row generalized JSD(beta) (fp32) at `temperature`
// and overwrites student_logits with grad_scale * d(JSD)/d(student_logits / temperature); teacher_logits is
// scratch. Sums accumulate in fp64.
at::Tensor distill_soft_rows_cpu(at::Tensor& student_logits, at::Tensor& teacher_logits, double temperature,
                                 double beta, double grad_scale);

}  // namespace fastft
