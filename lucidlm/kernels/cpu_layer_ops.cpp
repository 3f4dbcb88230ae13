// A layer's small float32 operations, each as one call: RMSNorm, the rotary embedding and the
// gated activation of a SwiGLU/GeGLU feed-forward, and for direct decode steps (direct_decode.py) the
// whole way from a step's q/k/v projections into the KV cache (cpu_decode.py says when they are used;
// cpu_decode.cpp has the operator library this joins).
//
// Why: in a decode step each of these is a handful of PyTorch operations on a few hundred
// numbers, and every operation costs ~1-2 us of dispatch and allocation for well under 1 us of
// arithmetic. RMSNorm was 8 operations (~12 us), RoPE 4 (~8 us), split + silu + multiply 3; SmolLM2
// makes 61 norms, 60 rotations and 30 activations a step. The arithmetic is PyTorch's, in the same order of operations, except that the
// sum of squares is added up in another order, RoPE fuses one of its multiplies with its add (one
// rounding fewer), and the activations' exponential is our own (vector_math.h;
// PyTorch's is SLEEF's): a few float32 ulps (tests/test_cpu_layer_ops.py).
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"  // this file's operators, declared
#include "vector_math.h"  // exp_nonpositive

namespace lucidlm_kernels {  // the operators (kernels.h declares them for bindings.cpp) and their helpers

// One row of RMSNorm, C values: rms_norm below, and rope_and_store's QK-norm (the same code, so the
// same roundings: a direct decode step must equal the forward's bit for bit).
inline void rms_norm_row(const float* row, const float* w, int64_t C, float offset, float epsilon, float* o) {
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
    for (int64_t r = r0; r < r1; r++) rms_norm_row(src + r * C, w, C, offset, epsilon, dst + r * C);
  });
  return out;
}

// One head's RoPE, "rotate half": o[i] = x[i] c[i] + x[i + D/2] s[i] and
// o[i + D/2] = x[i + D/2] c[i + D/2] + x[i] s[i + D/2]
// (s signed). Whole vectors where D/2 is a multiple of 16, with the multiply-add spelled out (the compiler
// may fuse the scalar form's either way): rotary and rope_and_store both call this, for equal results.
inline void rotate_half(const float* x, const float* c, const float* s, int64_t D, float* o) {
  const int64_t half = D / 2;
  if (half % 16 == 0) {
    for (int64_t i = 0; i < half; i += 16) {
      const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + half + i);
      _mm512_storeu_ps(o + i, _mm512_fmadd_ps(a, _mm512_loadu_ps(c + i), _mm512_mul_ps(b, _mm512_loadu_ps(s + i))));
      _mm512_storeu_ps(o + half + i, _mm512_fmadd_ps(b, _mm512_loadu_ps(c + half + i),
                                                     _mm512_mul_ps(a, _mm512_loadu_ps(s + half + i))));
    }
    return;
  }
  for (int64_t i = 0; i < half; i++) o[i] = x[i] * c[i] + x[i + half] * s[i];
  for (int64_t i = half; i < D; i++) o[i] = x[i] * c[i] + x[i - half] * s[i];
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
      rotate_half(in, c, s, D, o);
    }
  });
  return out;
}

// A decode step's new q, k, v (one position per sequence) from the attention's projections to the KV
// cache: the QK-norm where the model has one (Gemma 3: each head's D values, as rms_norm), RoPE on q and
// k (as rotary), k and v stored in slot `slot` of the layer's cache (converted to its dtype, float32 or
// float16, rounding to nearest even as PyTorch's copy does). Returns the rotated q (B, H, 1, D).
// In the forward these are ~14 operations (split views, two norms, two rotations, two converting copies
// and their slices): ~13 us of a SmolLM2 layer's ~120 for ~1 us of arithmetic. Same code as those
// kernels (rms_norm_row, rotate_half), so the same values: direct_decode relies on that.
// q (B, 1, H*D), k, v (B, 1, H_kv*D) float32, each row's values contiguous (views of one fused
// projection's output will do); cos, signed_sin (B, 1, 1, D); keys, values (B, H_kv, S, D) contiguous.
at::Tensor rope_and_store(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t n_heads,
                          const at::Tensor& cos, const at::Tensor& signed_sin, const at::Tensor& keys,
                          const at::Tensor& values, int64_t slot, const std::optional<at::Tensor>& q_norm,
                          const std::optional<at::Tensor>& k_norm, double eps, double norm_offset) {
  TORCH_CHECK(keys.dim() == 4 && keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes() &&
              keys.scalar_type() == values.scalar_type() &&
              (keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kHalf),
              "keys, values: (B, H_kv, S, D) float32 or float16, contiguous");
  const int64_t B = keys.size(0), H_kv = keys.size(1), S = keys.size(2), D = keys.size(3), H = n_heads;
  TORCH_CHECK(D % 32 == 0 && slot >= 0 && slot < S, "head_dim a multiple of 32, slot within the cache");
  for (const at::Tensor* t : {&q, &k, &v}) {
    const int64_t width = (t == &q ? H : H_kv) * D;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == B && t->size(1) == 1 &&
                t->size(2) == width && t->stride(2) == 1,
                "q (B, 1, H*D), k, v (B, 1, H_kv*D): float32, rows contiguous");
  }
  for (const at::Tensor* t : {&cos, &signed_sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == B * D,
                "cos, signed_sin: (B, 1, 1, D) float32, contiguous");
  const bool normed = q_norm.has_value();
  TORCH_CHECK(normed == k_norm.has_value(), "q_norm and k_norm: both or neither");
  if (normed)
    for (const at::Tensor* w : {&*q_norm, &*k_norm})
      TORCH_CHECK(w->scalar_type() == at::kFloat && w->dim() == 1 && w->size(0) == D && w->is_contiguous(),
                  "q_norm, k_norm: (D,) float32");
  at::Tensor q_out = at::empty({B, H, 1, D}, q.options());
  std::vector<float> scratch(2 * D);  // a normed head, then (k) its rotation
  const float offset = static_cast<float>(norm_offset), epsilon = static_cast<float>(eps);
  const bool half = keys.scalar_type() == at::kHalf;
  for (int64_t b = 0; b < B; b++) {
    const float* c = cos.data_ptr<float>() + b * D;
    const float* s = signed_sin.data_ptr<float>() + b * D;
    for (int64_t h = 0; h < H; h++) {  // q: norm, rotate, into q_out
      const float* head = q.data_ptr<float>() + b * q.stride(0) + h * D;
      if (normed) {
        rms_norm_row(head, q_norm->data_ptr<float>(), D, offset, epsilon, scratch.data());
        head = scratch.data();
      }
      rotate_half(head, c, s, D, q_out.data_ptr<float>() + (b * H + h) * D);
    }
    for (int64_t h = 0; h < H_kv; h++) {  // k: norm, rotate, store; v: store
      const float* head = k.data_ptr<float>() + b * k.stride(0) + h * D;
      if (normed) {
        rms_norm_row(head, k_norm->data_ptr<float>(), D, offset, epsilon, scratch.data());
        head = scratch.data();
      }
      float* rotated = scratch.data() + D;
      rotate_half(head, c, s, D, rotated);
      const float* value = v.data_ptr<float>() + b * v.stride(0) + h * D;
      const int64_t at = ((b * H_kv + h) * S + slot) * D;
      if (half) {
        c10::Half* key_row = keys.data_ptr<c10::Half>() + at;
        c10::Half* value_row = values.data_ptr<c10::Half>() + at;
        for (int64_t i = 0; i < D; i += 16) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(key_row + i),
                              _mm512_cvtps_ph(_mm512_loadu_ps(rotated + i), _MM_FROUND_TO_NEAREST_INT));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(value_row + i),
                              _mm512_cvtps_ph(_mm512_loadu_ps(value + i), _MM_FROUND_TO_NEAREST_INT));
        }
      } else {
        std::copy(rotated, rotated + D, keys.data_ptr<float>() + at);
        std::copy(value, value + D, values.data_ptr<float>() + at);
      }
    }
  }
  return q_out;
}

// act(gate) * up for the output of a fused [gate | up] projection: gate_up (..., 2F) float32 ->
// (..., F). act 0: SiLU, x sigmoid(x) (SwiGLU); 1: GELU's tanh form, x/2 (1 + tanh(sqrt(2/pi)
// (x + 0.044715 x³))) (GeGLU). Both from e = e^-|y| (never overflows): sigmoid(x) = 1 / (1 + e)
// for x >= 0, e / (1 + e) below (y = x); tanh(y) = ±(1 - e) / (1 + e) (y = 2 |...|, the sign of y).
inline __m512 activation(__m512 x, int64_t act) {
  const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
  if (act == 0) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(zero, _mm512_abs_ps(x)));
    const __m512 sigmoid = _mm512_div_ps(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, zero, _CMP_GE_OQ), e, one),
                                         _mm512_add_ps(one, e));
    return _mm512_mul_ps(x, sigmoid);
  }
  const __m512 inner = _mm512_mul_ps(_mm512_set1_ps(0.7978845608f),  // sqrt(2/pi)
                                     _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x));
  const __m512 e = exp_nonpositive(_mm512_mul_ps(_mm512_set1_ps(-2.f), _mm512_abs_ps(inner)));
  __m512 tanh = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  tanh = _mm512_mask_sub_ps(tanh, _mm512_cmp_ps_mask(inner, zero, _CMP_LT_OQ), zero, tanh);
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(one, tanh));
}

at::Tensor gated_activation(const at::Tensor& gate_up_in, int64_t act) {
  TORCH_CHECK(gate_up_in.scalar_type() == at::kFloat && gate_up_in.dim() >= 1 && gate_up_in.size(-1) % 2 == 0,
              "gate_up: a float32 tensor (..., 2F)");
  TORCH_CHECK(act == 0 || act == 1, "act: 0 (SiLU) or 1 (GELU, tanh form)");
  const at::Tensor gate_up = gate_up_in.contiguous();
  const int64_t F = gate_up.size(-1) / 2, rows = F ? gate_up.numel() / (2 * F) : 0;
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = F;
  at::Tensor out = at::empty(shape, gate_up.options());
  const float* src = gate_up.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const float* gate = src + r * 2 * F;
      const float* up = gate + F;
      float* o = dst + r * F;
      int64_t i = 0;
      for (; i + 16 <= F; i += 16)
        _mm512_storeu_ps(o + i, _mm512_mul_ps(activation(_mm512_loadu_ps(gate + i), act), _mm512_loadu_ps(up + i)));
      if (i < F) {  // the last F % 16 values, through a full vector in a local copy
        alignas(64) float g[16] = {0}, u[16] = {0}, y[16];
        std::copy(gate + i, gate + F, g);
        std::copy(up + i, up + F, u);
        _mm512_store_ps(y, _mm512_mul_ps(activation(_mm512_load_ps(g), act), _mm512_load_ps(u)));
        std::copy(y, y + (F - i), o + i);
      }
    }
  });
  return out;
}

}  // namespace lucidlm_kernels

TORCH_LIBRARY_FRAGMENT(lucidlm_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float weight_offset) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor signed_sin) -> Tensor");
  m.def("gated_activation(Tensor gate_up, int act) -> Tensor");
  m.def("rope_and_store(Tensor q, Tensor k, Tensor v, int n_heads, Tensor cos, Tensor signed_sin, Tensor(a!) keys, "
        "Tensor(b!) values, int slot, Tensor? q_norm, Tensor? k_norm, float eps, float norm_offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(lucidlm_kernels, CPU, m) {
  m.impl("rms_norm", &lucidlm_kernels::rms_norm);
  m.impl("rotary", &lucidlm_kernels::rotary);
  m.impl("gated_activation", &lucidlm_kernels::gated_activation);
  m.impl("rope_and_store", &lucidlm_kernels::rope_and_store);
}
