// A layer's small float32 operations, each as one call: RMSNorm and the rotary embedding
// (cpu_decode.py says when they are used; cpu_decode.cpp has the operator library this joins).
//
// Why: in a decode step each of these is a handful of PyTorch operations on a few hundred
// numbers, and every operation costs ~1-2 us of dispatch and allocation for well under 1 us of
// arithmetic. RMSNorm was 8 operations (~12 us), RoPE 4 (~8 us); SmolLM2 makes 61 norms and 60
// rotations a step. The arithmetic is PyTorch's, in the same order of operations, except that the
// sum of squares is added up in another order and the compiler may fuse one of RoPE's multiplies
// with its add (one rounding fewer): a few float32 ulps (tests/test_cpu_layer_ops.py).
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <cmath>

namespace {

// x / sqrt(mean(x²) + eps) * (weight + weight_offset) over the last dimension: weight_offset 0 for
// Llama's RMSNorm, 1 for Gemma's (whose weights are stored minus one). x (..., C) float32.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps, double weight_offset) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() >= 1, "x: a float32 tensor (..., C)");
  const int64_t C = x_in.size(-1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 && weight.size(0) == C && weight.is_contiguous(),
              "weight: (C,) float32");
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = C ? x.numel() / C : 0;
  const float* src = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float offset = static_cast<float>(weight_offset), epsilon = static_cast<float>(eps);
  // one thread for a decode step's few rows; a prompt's many rows split between threads
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const float* row = src + r * C;
      float* o = dst + r * C;
      __m512 squares = _mm512_setzero_ps();
      int64_t i = 0;
      for (; i + 16 <= C; i += 16) {
        const __m512 v = _mm512_loadu_ps(row + i);
        squares = _mm512_fmadd_ps(v, v, squares);
      }
      float sum = _mm512_reduce_add_ps(squares);
      for (; i < C; i++) sum += row[i] * row[i];
      // as torch.rsqrt(mean + eps): a division by a correctly rounded square root
      const float inverse = 1.0f / std::sqrt(sum / static_cast<float>(C) + epsilon);
      for (int64_t j = 0; j < C; j++) o[j] = (row[j] * inverse) * (w[j] + offset);
    }
  });
  return out;
}

// RoPE in the "rotate half" layout: x * cos + swap_halves(x) * signed_sin, where swap_halves
// exchanges the two halves of each head's D values (layers.RotaryEmbedding says why the sin is
// signed). x (B, H, T, D) float32, each D values contiguous, any other strides (the views of a
// fused q/k/v projection's output); cos, signed_sin (B, 1, T, D) contiguous. Returns (B, H, T, D).
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.stride(3) == 1 && x.size(3) % 2 == 0,
              "x: (B, H, T, D) float32, D even, each D values contiguous");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  for (const at::Tensor* t : {&cos, &signed_sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 4 && t->size(0) == B &&
                t->size(1) == 1 && t->size(2) == T && t->size(3) == D, "cos, signed_sin: (B, 1, T, D) float32, contiguous");
  at::Tensor out = at::empty({B, H, T, D}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, B * H * T, std::max<int64_t>(1, 16384 / D), [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; v++) {  // v: one head's D values at one position
      const int64_t b = v / (H * T), h = v / T % H, t = v % T;
      const float* in = src + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
      const float* c = cos.data_ptr<float>() + (b * T + t) * D;
      const float* s = signed_sin.data_ptr<float>() + (b * T + t) * D;
      float* o = dst + v * D;
      for (int64_t i = 0; i < half; i++) o[i] = in[i] * c[i] + in[i + half] * s[i];
      for (int64_t i = half; i < D; i++) o[i] = in[i] * c[i] + in[i - half] * s[i];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lucidlm_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float weight_offset) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor signed_sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(lucidlm_kernels, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary", &rotary);
}
