// The attention of one query over the KV cache, for a decode step on a CPU (cpu_decode.py says
// when it is used; cpu_decode.cpp has the matmul and the operator library this joins).
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <cmath>
#include <algorithm>
#include <optional>
#include <vector>

#include "kernels.h"  // this file's operator, declared
#include "vector_math.h"  // exp_nonpositive

namespace {

// The sums of 16 vectors' lanes, as the lanes of one (lane j: the sum of v[j]): a transposing
// tree of shuffles and adds, 45 instructions where 16 separate reductions take ~120.
inline __m512 sum16(const __m512 v[16]) {
  __m512 w[8], x[4];
  for (int k = 0; k < 8; k++)  // each 128-bit lane: (a0 + a2, b0 + b2, a1 + a3, b1 + b3), a = v[2k], b = v[2k + 1]
    w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; k++)  // each 128-bit lane: that lane's sums of v[4k], ..., v[4k + 3]
    x[k] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // add the four 128-bit lanes: then 128-bit lane k holds the sums of v[4k], ..., v[4k + 3]
  const __m512 y0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 y1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// One key or value row's 16 values from index i on, as float32: a float32 cache as it is, a float16
// one widened (F16C, exact: every float16 is a float32).
inline __m512 load16(const float* row, int64_t i) { return _mm512_loadu_ps(row + i); }
inline __m512 load16(const c10::Half* row, int64_t i) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i)));
}

// Attention of one query per sequence (a decode step), in float32: softmax(q k^T * scale + mask) v
// for q (B, H, 1, D) over the cache's k, v (B, H_kv, S, D; rows of D contiguous, as views of a
// longer cache are; float32 or float16, each element widened to float32 as it is read), query head
// h reading key/value head h / (H / H_kv). mask: (B, 1, 1, S) bool (true: may attend) or undefined.
// PyTorch's fused kernel spends ~15-20 us a call setting up for this; the arithmetic itself
// (SmolLM2: 9 heads x ~100 positions x 64) is ~2 us.
// Scores are made 16 keys at a time (16 dot products, then one transposing reduction: sum16)
// and exponentiated 16 at a time (exp_nonpositive).
template <typename KV>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* allowed, int64_t mask_b,
            int64_t mask_s, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), H_kv = k.size(1), S = k.size(2);
  const float* qp = q.data_ptr<float>();
  const KV* kp = k.data_ptr<KV>();
  const KV* vp = v.data_ptr<KV>();
  float* op = out.data_ptr<float>();
  const int64_t group = H / H_kv, vectors = D / 16, blocks = (S + 15) / 16;
  // (b, h) pairs split between threads when there is enough work (~64k multiply-adds each)
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, S * D));
  at::parallel_for(0, B * H, grain, [&](int64_t first, int64_t last) {
    thread_local std::vector<float> scores;  // kept between calls (an allocation a call otherwise)
    if ((int64_t)scores.size() < 16 * blocks) scores.resize(16 * blocks);
    for (int64_t bh = first; bh < last; bh++) {
      const int64_t b = bh / H, h = bh % H, kv = h / group;
      const float* qh = qp + bh * D;
      const KV* kh = kp + b * k.stride(0) + kv * k.stride(1);
      const KV* vh = vp + b * v.stride(0) + kv * v.stride(1);
      __m512 best = _mm512_set1_ps(-INFINITY);
      for (int64_t block = 0; block < blocks; block++) {
        const int64_t s0 = 16 * block, n = std::min<int64_t>(16, S - s0);
        __mmask16 use = n == 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);  // keys that exist ...
        if (allowed != nullptr) {  // ... and may be attended to
          const bool* a = allowed + b * mask_b + s0 * mask_s;
          __mmask16 ok = 0;
          if (mask_s == 1 && n == 16)
            ok = _mm_test_epi8_mask(_mm_loadu_si128((const __m128i*)a), _mm_set1_epi8(1));
          else
            for (int64_t j = 0; j < n; j++) ok |= (__mmask16)(a[j * mask_s] ? 1u << j : 0u);
          use &= ok;
        }
        // 16 dot products (a last, partial block repeats its last key: the mask drops the copies)
        const KV* rows[16];
        for (int64_t j = 0; j < 16; j++) rows[j] = kh + std::min(s0 + j, S - 1) * D;
        __m512 dots[16];
        for (int64_t j = 0; j < 16; j++) dots[j] = _mm512_setzero_ps();
        for (int64_t i = 0; i < vectors; i++) {
          const __m512 qi = _mm512_loadu_ps(qh + 16 * i);
          for (int64_t j = 0; j < 16; j++) dots[j] = _mm512_fmadd_ps(qi, load16(rows[j], 16 * i), dots[j]);
        }
        // masked keys' slots may hold anything (NaN included): -inf replaces their score
        const __m512 block_scores = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), use, sum16(dots), _mm512_set1_ps((float)scale));
        _mm512_storeu_ps(scores.data() + s0, block_scores);
        best = _mm512_max_ps(best, block_scores);
      }
      const float top = _mm512_reduce_max_ps(best);
      float* oh = op + bh * D;
      if (top == -INFINITY) {  // nothing to attend to: PyTorch gives NaN (softmax of all -inf)
        for (int64_t i = 0; i < D; i++) oh[i] = NAN;
        continue;
      }
      __m512 totals = _mm512_setzero_ps();
      for (int64_t s0 = 0; s0 < 16 * blocks; s0 += 16) {
        const __m512 x = _mm512_loadu_ps(scores.data() + s0);
        const __m512 p = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ),
                                             exp_nonpositive(_mm512_sub_ps(x, _mm512_set1_ps(top))));
        _mm512_storeu_ps(scores.data() + s0, p);
        totals = _mm512_add_ps(totals, p);
      }
      const __m512 inverse = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(totals));
      // out = sum_s p[s] v[s] / total, 8 vectors of 16 at a time in registers
      for (int64_t i0 = 0; i0 < vectors; i0 += 8) {
        const int64_t n = std::min<int64_t>(8, vectors - i0);
        __m512 acc[8];
        for (int64_t i = 0; i < 8; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t s = 0; s < S; s++) {
          if (scores[s] == 0.f) continue;  // masked (its cache slot may hold anything)
          const __m512 p = _mm512_set1_ps(scores[s]);
          const KV* row = vh + s * D;
          for (int64_t i = 0; i < n; i++) acc[i] = _mm512_fmadd_ps(p, load16(row, 16 * (i0 + i)), acc[i]);
        }
        for (int64_t i = 0; i < n; i++) _mm512_storeu_ps(oh + 16 * (i0 + i), _mm512_mul_ps(acc[i], inverse));
      }
    }
  });
}

}  // namespace

namespace lucidlm_kernels {  // the operators (kernels.h declares them for bindings.cpp)

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1 && q_in.scalar_type() == at::kFloat, "q: (B, H, 1, D) float32");
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(3), H_kv = k.size(1), S = k.size(2);
  TORCH_CHECK(D % 16 == 0 && H % H_kv == 0, "D must be a multiple of 16, H of H_kv");
  const auto kv_type = k.scalar_type();
  TORCH_CHECK(kv_type == at::kFloat || kv_type == at::kHalf, "k, v: float32 or float16");
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->scalar_type() == kv_type && t->stride(3) == 1 && (S == 1 || t->stride(2) == D) && t->size(2) == S,
                "k, v: (B, H_kv, S, D), one dtype, with contiguous rows");
  at::Tensor q = q_in.contiguous();
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  const bool* allowed = nullptr;
  int64_t mask_b = 0, mask_s = 0;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4 && mask->size(-1) == S, "mask: (B, 1, 1, S) bool");
    allowed = mask->data_ptr<bool>();
    mask_b = mask->size(0) == 1 ? 0 : mask->stride(0);
    mask_s = mask->stride(3);
  }
  if (kv_type == at::kHalf)
    attend<c10::Half>(q, k, v, allowed, mask_b, mask_s, scale, out);
  else
    attend<float>(q, k, v, allowed, mask_b, mask_s, scale, out);
  return out;
}

}  // namespace lucidlm_kernels

TORCH_LIBRARY_FRAGMENT(lucidlm_kernels, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lucidlm_kernels, CPU, m) {
  m.impl("decode_attention", &lucidlm_kernels::decode_attention);
}
