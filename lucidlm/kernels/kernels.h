// The operators of LucidLM's CPU kernels, declared once: each .cpp file defines its own and registers
// them with PyTorch (torch.ops.lucidlm_kernels.*, what the models and torch.compile call);
// bindings.cpp also binds the ones a direct decode step calls straight to Python (cpu_decode.py says why).
#pragma once

#include <ATen/core/Tensor.h>
#include <cstdint>
#include <optional>

namespace lucidlm_kernels {

// cpu_decode.cpp
at::Tensor int8_dot_matmul(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& scales, int64_t bits);
void dequantize(const at::Tensor& weights, const at::Tensor& scales, int64_t bits, at::Tensor& out);
at::Tensor argmax(const at::Tensor& x);

// cpu_attention.cpp
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale);

// cpu_layer_ops.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, double weight_offset);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin);
at::Tensor gated_activation(const at::Tensor& gate_up, int64_t act);
at::Tensor rope_and_store(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t n_heads,
                          const at::Tensor& cos, const at::Tensor& signed_sin, const at::Tensor& keys,
                          const at::Tensor& values, int64_t slot, const std::optional<at::Tensor>& q_norm,
                          const std::optional<at::Tensor>& k_norm, double eps, double norm_offset);

}  // namespace lucidlm_kernels
