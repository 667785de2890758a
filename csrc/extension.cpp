// Python bindings of the CPU kernels (module fastft._C). The torch.library ops in fastft/ops call these.
#include <torch/extension.h>

#include "bottleneck_cpu.h"
#include "distillation_cpu.h"
#include "ewc_cpu.h"
#include "logprobs_cpu.h"
#include "lora_cpu.h"
#include "nf4_cpu.h"
#include "qat_cpu.h"
#include "routed_lora_cpu.h"

namespace fastft {
namespace {

#define FASTFT_PACKED_PARAMS                                                                              \
  const at::Tensor &packed, const at::Tensor &absmax, const at::Tensor &code, int64_t blocksize,          \
      const std::optional<at::Tensor>&nested_absmax, const std::optional<at::Tensor>&nested_code,        \
      int64_t nested_blocksize, double nested_offset
#define FASTFT_PACKED_ARGS \
  PackedArgs { packed, absmax, code, blocksize, nested_absmax, nested_code, nested_blocksize, nested_offset }

at::Tensor nf4_dequantize(FASTFT_PACKED_PARAMS, std::vector<int64_t> shape, at::ScalarType dtype,
                          const std::optional<at::Tensor>& out) {
  return nf4_dequantize_cpu(FASTFT_PACKED_ARGS, shape, dtype, out);
}

at::Tensor nf4_linear(const at::Tensor& x, FASTFT_PACKED_PARAMS, int64_t out_features,
                      const std::optional<at::Tensor>& bias) {
  return nf4_linear_cpu(x, FASTFT_PACKED_ARGS, out_features, bias);
}

at::Tensor nf4_linear_grad_input(const at::Tensor& grad_out, FASTFT_PACKED_PARAMS, int64_t in_features) {
  return nf4_linear_grad_input_cpu(grad_out, FASTFT_PACKED_ARGS, in_features);
}

}  // namespace
}  // namespace fastft

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastft CPU kernels";
  m.def("has_avx2", &fastft::cpu_has_avx2, "whether the vectorized AVX2 paths run on this CPU");
  m.def("has_avx512", &fastft::cpu_has_avx512, "whether the AVX-512 paths of the C++ kernels run on this CPU");
  m.def("nf4_quantize", &fastft::nf4_quantize_cpu, "4-bit blockwise quantize (bitsandbytes-exact)");
  m.def("nf4_dequantize", &fastft::nf4_dequantize, "4-bit blockwise dequantize");
  m.def("nf4_linear", &fastft::nf4_linear, "y = x @ W^T (+ bias) with a packed 4-bit W");
  m.def("nf4_linear_grad_input", &fastft::nf4_linear_grad_input, "dx = dy @ W with a packed 4-bit W");
  m.def("lora_dropout", &fastft::lora_dropout_cpu, "counter-based dropout: x * keep(seed, index) / (1 - p)");
  m.def("lora_down", &fastft::lora_down_cpu, "u = [dropout_g(x) @ A_g^T]_g over row chunks");
  m.def("lora_down_backward", &fastft::lora_down_backward_cpu,
        "(dx, dA) of lora_down, each when asked for: dx = sum_g dropout_g(du_g @ A_g), dA = [du_g^T @ dropout_g(x)]_g");
  m.def("routed_lora", &fastft::routed_lora_cpu,
        "delta = [scale_g (x_g A_g^T) B_g^T]_g with the rows grouped by route (adapter id, -1: none) in one call");
  m.def("routed_lora_backward", &fastft::routed_lora_backward_cpu,
        "(dx if want_x, [dA_g], [dB_g]) of routed_lora, the same grouping, U_g recomputed");
  m.def("bottleneck_adapter", &fastft::bottleneck_adapter_cpu,
        "(out, z): z = v @ w_down^T + b_down, out = residual + scale * (act(z) @ w_up^T + b_up) (fp32)");
  m.def("bottleneck_backward", &fastft::bottleneck_backward_cpu,
        "(dv, dw_down, db_down, dw_up, db_up) of the bottleneck adapter in one pass over row blocks (fp32)");
  m.def("fake_quantize", &fastft::fake_quantize_cpu, "torchao-exact fake quantization of contiguous groups");
  m.def("fake_quantize_backward", &fastft::fake_quantize_backward_cpu,
        "straight-through gradient of fake_quantize, the clamp mask recomputed from x");
  m.def("fake_quantize_with_scale", &fastft::fake_quantize_with_scale_cpu,
        "fake quantization with given scales (and zero points)");
  m.def("fake_quantize_with_scale_backward", &fastft::fake_quantize_with_scale_backward_cpu,
        "(dx, dscale, dzero_point) of fake_quantize_with_scale");
  m.def("distill_soft_rows", &fastft::distill_soft_rows_cpu,
        "per-row generalized JSD and its scaled gradient, written over the student logits tile (fp32)");
  m.def("ewc_penalty", &fastft::ewc_penalty_cpu,
        "grads += lambda * F * (theta - theta*) over lists of tensors in one pass; returns lambda / 2 * sum F d^2");
  m.def("logprob_rows", &fastft::logprob_rows_cpu, py::arg("z"), py::arg("labels"), py::arg("want_entropy"),
        py::arg("grad_logprob") = py::none(), py::arg("grad_entropy") = py::none(),
        "per-row log-probability of the label (and entropy, and the row's largest log-probability) of a logits tile; with grad_logprob, the gradient "
        "with respect to the logits written over the tile (fp32)");
}
