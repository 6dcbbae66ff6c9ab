// Python bindings of the fused CPU memory kernels (loaded by nl_lightning/ops/cpu_extension.py).

#include <torch/extension.h>

#include "common.h"

namespace nl_cpu {
std::vector<Tensor> mlp_chunks_forward(std::vector<Tensor> inputs, Tensor w1, Tensor w2, bool delta, bool self_target,
                                       double eps, double curvature_eps);
std::vector<Tensor> mlp_chunks_backward(std::vector<Tensor> inputs, Tensor w1s, Tensor w2s, Tensor dout,
                                        Tensor dw1_end, Tensor dw2_end, bool delta, bool self_target, double eps,
                                        double curvature_eps);
std::vector<Tensor> shared_key_loop_forward(Tensor x, Tensor w1, Tensor w2, Tensor gate_bias, int64_t chunk,
                                            double eta_scale);
std::vector<Tensor> shared_key_loop_backward(Tensor x, Tensor gate_bias, Tensor out, Tensor w1s, Tensor w2s,
                                             Tensor saved, Tensor dout, int64_t chunk, double eta_scale);
std::vector<Tensor> titans_mlp_chunks_forward(std::vector<Tensor> inputs, Tensor st1, Tensor st2, int64_t chunk);
std::vector<Tensor> titans_mlp_chunks_backward(std::vector<Tensor> inputs, Tensor st1s, Tensor st2s, Tensor dy,
                                               Tensor dst1_end, Tensor dst2_end, int64_t chunk);
std::vector<Tensor> causal_conv_forward(Tensor x, Tensor w, int64_t normalized, int64_t group);
std::vector<Tensor> causal_conv_backward(Tensor x, Tensor w, Tensor y, Tensor inv_norm, Tensor dy, int64_t normalized,
                                         int64_t group);
std::vector<Tensor> titans_linear_chunks_forward(std::vector<Tensor> inputs, Tensor st, int64_t chunk);
std::vector<Tensor> titans_linear_chunks_backward(std::vector<Tensor> inputs, Tensor sts, Tensor dy, Tensor dst_end,
                                                  int64_t chunk);
}  // namespace nl_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mlp_chunks_forward", &nl_cpu::mlp_chunks_forward, "DGD MLP memory: fused chunk loop, forward");
  m.def("mlp_chunks_backward", &nl_cpu::mlp_chunks_backward, "DGD MLP memory: fused chunk loop, backward");
  m.def("shared_key_loop_forward", &nl_cpu::shared_key_loop_forward,
        "HOPE's self-modifying projection memories: fused read/gate/update loop, forward");
  m.def("shared_key_loop_backward", &nl_cpu::shared_key_loop_backward,
        "HOPE's self-modifying projection memories: fused read/gate/update loop, backward");
  m.def("titans_mlp_chunks_forward", &nl_cpu::titans_mlp_chunks_forward,
        "Titans MLP memory: fused chunk loop, forward");
  m.def("titans_mlp_chunks_backward", &nl_cpu::titans_mlp_chunks_backward,
        "Titans MLP memory: fused chunk loop, backward");
  m.def("titans_linear_chunks_forward", &nl_cpu::titans_linear_chunks_forward,
        "Titans linear memory: fused chunk loop, forward");
  m.def("titans_linear_chunks_backward", &nl_cpu::titans_linear_chunks_backward,
        "Titans linear memory: fused chunk loop, backward");
  m.def("causal_conv_forward", &nl_cpu::causal_conv_forward,
        "Causal depthwise convolution with optional per-group L2 normalisation, forward");
  m.def("causal_conv_backward", &nl_cpu::causal_conv_backward,
        "Causal depthwise convolution with optional per-group L2 normalisation, backward");
  m.def("has_blas", [] { return sgemm_ != nullptr && dgemm_ != nullptr; });
}
