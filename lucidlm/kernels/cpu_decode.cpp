// Kernels for a decode step on a CPU (lucidlm/kernels/cpu_decode.py says why and when):
//   int8_dot_matmul    products of a few rows with a matrix, in integer dot products: 4-, 5- or
//                      8-bit weights times activations quantized to int8 on the fly;
//   dequantize         the same weights as float32 or bfloat16 rows, for the dense prefill path;
//   decode_attention   (cpu_attention.cpp) the attention of one query over the KV cache;
//   argmax             the index of each row's largest value (greedy decoding's choice).
//
// A decode step multiplies one row x (1 x K) by each weight matrix W (N x K). Decoding every
// weight to a float before multiplying costs several instructions per weight; instead we
// round x to int8 (a scale per group of 32 values, as the weights have) and let AVX-512 VNNI's
// vpdpbusd multiply 64 unsigned weight bytes by 64 signed activation bytes and add them in
// fours into 16 int32 lanes: one instruction per 64 weights. Per group g of 32 values:
//
//     sum_k W[n,k] x[k] = sum_k (d_g q_k + m_g) (e_g p_k)       (W = d q + m,  x ~ e p)
//                       = d_g e_g sum_k q_k p_k  +  m_g e_g sum_k p_k
//
// q (0..15 or 0..255) and p (-127..127) are integers: the first sum is vpdpbusd's, the second
// depends on x alone and is computed once per call (x ~ e p is two int8 terms in fact: see
// quantize_rows). Weights come in chunks of 64 values (two groups, A and B): 32 bytes (4-bit: byte
// b holds value b in its low nibble and value 32 + b in its high one) and four float16 numbers
// (dA, dB, mA, mB); 40 bytes (5-bit: those 32, then 8 holding the values' fifth bits, bit j of
// the little-endian 64-bit word for value j) and the same four numbers; or 64 bytes (8-bit:
// q + 128) and two (dA, dB): their offset is always -128 d.
// After vpdpbusd, lanes 0-7 hold group A's partial sums and lanes 8-15 group B's.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <cmath>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"  // this file's operators, declared

namespace {

constexpr int64_t CHUNK = 64;  // values per chunk: two groups of 32

// How far ahead of the chunk being multiplied the kernel asks for its weights (bytes). A core
// streaming a matrix with this much arithmetic between loads keeps too few reads in flight for
// the memory's bandwidth: one core read ~21 GB/s of 4-bit weights where a plain read of the
// same bytes makes ~41. Prefetching 8 KB ahead: Gemma 3 decode +16 %, SmolLM2 +10 % (1 and 4 KB
// helped less, 16 KB too); bench/RESULTS.md. The hint is non-temporal: each weight is read once a
// step, and an ordinary prefetch would fill the core's L2 with them, evicting what the rest of the
// step works on (the interpreter's and PyTorch's own data between kernel calls): decode +2-3 %.
constexpr int64_t PREFETCH_AHEAD = 8192;
constexpr auto PREFETCH_HINT = _MM_HINT_NTA;

// float16 numbers per chunk: scales and offsets (4-, 5-bit), scales only (8-bit: offsets -128 scale)
constexpr int64_t scales_per_chunk(int64_t bits) { return bits == 8 ? 2 : 4; }

// Rows of x multiplied together by rows_block (each chunk's weights decoded once for all of
// them), and rows of x per pass over a thread's weight rows (a tile's activations, ~2.3 KB per
// row of K = 576, stay in the core's L1 cache while the weights pass by; a multiple of BLOCK_ROWS).
constexpr int64_t BLOCK_ROWS = 4, TILE_ROWS = 8;

// Where quantize_rows puts row m of x: in a block of BLOCK_ROWS rows, or, for the last M % 4 rows,
// in a block of those (which lies in the last tile, as every block lies in one tile).
struct RowPlace {
  int64_t first, rows, index;  // the block's first row, its number of rows, m's place in it
};
inline RowPlace place_of(int64_t m, int64_t M) {
  const int64_t blocked = M - M % BLOCK_ROWS;
  return m < blocked ? RowPlace{m - m % BLOCK_ROWS, BLOCK_ROWS, m % BLOCK_ROWS}
                     : RowPlace{blocked, M - blocked, m - blocked};
}

// block(m, R) for each block of x's rows [begin, end) (blocks as place_of gives them; begin a block's
// first row), R the block's number of rows as a compile-time constant, std::integral_constant<int, R>:
// the kernels are templates on it, so that a block's sums live in registers.
template <typename Block>
inline void for_each_block(int64_t begin, int64_t end, int64_t M, Block&& block) {
  static_assert(BLOCK_ROWS == 4, "blocks of 1 to 4 rows below");
  for (int64_t m = begin; m < end;) {
    const int64_t rows = place_of(m, M).rows;
    if (rows == 4)
      block(m, std::integral_constant<int, 4>{});
    else if (rows == 3)
      block(m, std::integral_constant<int, 3>{});
    else if (rows == 2)
      block(m, std::integral_constant<int, 2>{});
    else
      block(m, std::integral_constant<int, 1>{});
    m += rows;
  }
}

// Bytes of `activations` per row and chunk: p1, p2 (64 int8 each) and e (16 floats), see below.
constexpr int64_t ACTIVATION_BYTES = 64 + 64 + 64;

// x (M, K) float32 -> two int8 terms per value, x ~ e (256 p1 + p2), e a scale per group of 32:
// p1 rounds x to steps of 256 e = max|x|/127, p2 rounds what p1 left over (at most half a step:
// 128 e; clamped to 127) to steps of e. One term alone errs by up to max|x|/254 per value, and
// on SmolLM2 that alone cost as much next-token KL as all of llama.cpp's rounding; two err by
// 1/256 of that. The kernel gets 256 q.p1 + q.p2 as integers (vpdpbusd, a shift, vpdpbusd
// again, into the same int32 lanes: 4 * 255 * 127 * 257 < 2^31), one instruction more per chunk
// than one term, which a kernel bound by reading the weights from memory has time for.
// Also s = e (256 sum p1 + sum p2) / 8 per group, the second sum of the formula above (divided
// by 8: the kernel adds it in each of 8 lanes).
// Laid out in the order rows_block reads them, block by block (place_of), chunk by chunk:
//   activations: for a block of R rows from row f, chunk c, at (f * chunks + c * R) * 192 bytes:
//     p1 of its R rows (64 bytes each), their p2, their e (16 floats each: the chunk's two group
//     scales spread over the lanes as vpdpbusd leaves the groups' sums, eA x 8, eB x 8);
//   s: at (f * chunks + c * R) * 2 floats, each row's two groups' (sA, sB).
void quantize_rows(const float* x, int64_t M, int64_t K, uint8_t* activations, float* s) {
  const int64_t chunks = K / CHUNK;
  for (int64_t m = 0; m < M; m++) {
    const RowPlace place = place_of(m, M);
    for (int64_t c = 0; c < chunks; c++) {
      uint8_t* a = activations + (place.first * chunks + c * place.rows) * ACTIVATION_BYTES;
      int8_t* p1 = reinterpret_cast<int8_t*>(a) + place.index * 64;
      int8_t* p2 = p1 + place.rows * 64;
      float* e = reinterpret_cast<float*>(a + 2 * place.rows * 64) + place.index * 16;
      float* sums = s + (place.first * chunks + c * place.rows + place.index) * 2;
      for (int group = 0; group < 2; group++) {
        const float* v32 = x + m * K + c * CHUNK + group * 32;
        __m512 v[2] = {_mm512_loadu_ps(v32), _mm512_loadu_ps(v32 + 16)};
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        float step = amax / 127.f, inverse = amax > 0.f ? 127.f / amax : 0.f;
        int total = 0;
        for (int half = 0; half < 2; half++) {
          // round to nearest (even), as torch.round; then the rest, in steps 256 times finer
          __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v[half], _mm512_set1_ps(inverse)));
          __m512 rest = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(q1), _mm512_set1_ps(step), v[half]);
          __m512i q2 = _mm512_cvtps_epi32(_mm512_mul_ps(rest, _mm512_set1_ps(256.f * inverse)));
          q2 = _mm512_max_epi32(_mm512_min_epi32(q2, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
          _mm_storeu_si128((__m128i*)(p1 + group * 32 + 16 * half), _mm512_cvtsepi32_epi8(q1));
          _mm_storeu_si128((__m128i*)(p2 + group * 32 + 16 * half), _mm512_cvtsepi32_epi8(q2));
          total += 256 * _mm512_reduce_add_epi32(q1) + _mm512_reduce_add_epi32(q2);
        }
        _mm256_storeu_ps(e + group * 8, _mm256_set1_ps(step / 256.f));
        sums[group] = step / 256.f * (float)total / 8.f;
      }
    }
  }
}

// The two float16 numbers at h, as 16 floats (a, b, a, b, ...).
inline __m512 pair(const uint16_t* h) {
  int32_t bits;
  std::memcpy(&bits, h, 4);
  return _mm512_cvtph_ps(_mm256_set1_epi32(bits));
}

// The two floats at f, as 16 floats (a, b, a, b, ...).
inline __m512 pair(const float* f) {
  double bits;
  std::memcpy(&bits, f, 8);
  return _mm512_castpd_ps(_mm512_set1_pd(bits));
}

// One chunk's weights as 64 unsigned bytes in value order.
template <int BITS>
inline __m512i load_chunk(const uint8_t* w) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512(w);
  } else if constexpr (BITS == 5) {  // the 4-bit chunk, plus 16 where a value's fifth bit is set
    uint64_t fifth;
    std::memcpy(&fifth, w + 32, 8);
    const __m512i low = load_chunk<4>(w);
    return _mm512_mask_add_epi8(low, fifth, low, _mm512_set1_epi8(16));
  } else {
    // the 32 bytes twice; the upper copy shifted right by 4: low nibbles, then high nibbles
    const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)w));
    return _mm512_and_si512(_mm512_srlv_epi16(both, shifts), _mm512_set1_epi8(0x0F));
  }
}

// y[m, n] for one weight row n (w, its bytes; h, its float16 numbers) and the block of MB rows
// of x from row `first` (y_n: y + n, a row's outputs N apart). Each chunk's weights and scales are
// decoded once for all MB rows: with several rows (a short prompt, a batch of sequences) the
// kernel is bound by its arithmetic, not by memory, and this is the arithmetic they share. Each
// row's sums are the same operations in the same order whatever MB is.
template <int BITS, int MB>
inline void rows_block(const uint8_t* w, const uint16_t* h, const uint8_t* activations, const float* s,
                       int64_t chunks, int64_t N, int64_t first, float* y_n) {
  constexpr int64_t SC = scales_per_chunk(BITS), chunk_bytes = CHUNK * BITS / 8;
  const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);  // (a, b, ..) -> (a x 8, b x 8)
  const uint8_t* a = activations + first * chunks * ACTIVATION_BYTES;
  const float* sums = s + first * chunks * 2;
  __m512 acc[MB], offsets[MB];
  for (int j = 0; j < MB; j++) acc[j] = offsets[j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; c++, w += chunk_bytes, h += SC, a += MB * ACTIVATION_BYTES, sums += MB * 2) {
    _mm_prefetch((const char*)(w + PREFETCH_AHEAD), PREFETCH_HINT);  // (past the end: harmless)
    const __m512i q = load_chunk<BITS>(w);
    const __m512 weight_scale = _mm512_permutexvar_ps(spread, pair(h));  // (dA x 8, dB x 8)
    const __m512 weight_offset = pair(h + (BITS == 8 ? 0 : 2));  // (mA, mB, ...) or (dA, dB, ...)
    for (int j = 0; j < MB; j++) {
      __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, _mm512_loadu_si512(a + j * 64));
      dot = _mm512_dpbusd_epi32(_mm512_slli_epi32(dot, 8), q, _mm512_loadu_si512(a + (MB + j) * 64));
      const __m512 scale = _mm512_mul_ps(weight_scale, _mm512_loadu_ps(a + (2 * MB + j) * 64));
      acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[j]);
      // the offsets' term: m (4-bit), or d, times -128 once at the end (8-bit)
      offsets[j] = _mm512_fmadd_ps(weight_offset, pair(sums + j * 2), offsets[j]);
    }
  }
  for (int j = 0; j < MB; j++) {
    if constexpr (BITS == 8) offsets[j] = _mm512_mul_ps(offsets[j], _mm512_set1_ps(-128.f));
    y_n[(first + j) * N] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j], offsets[j]));
  }
}

#include "int8_rows_across.h"  // many rows: 16 weight rows at a time, outputs across the lanes

// y[m, n] for weight rows n in [n0, n1): weights (N, K * BITS/8) bytes, scales (N, K/64, 4 or 2) float16.
template <int BITS>
void rows_dot(const uint8_t* weights, const uint16_t* scales, const uint8_t* activations, const float* s,
              int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1, float* y) {
  const int64_t chunks = K / CHUNK, row_bytes = K * BITS / 8, row_scales = chunks * scales_per_chunk(BITS);
  int64_t first_alone = n0;  // weight rows from here go one at a time (rows_block)
  if (M >= ACROSS_FROM_ROWS && n1 - n0 >= 16) {
    thread_local std::vector<__m512i> wbuf;  // (aligned: std::vector honours __m512i's alignment)
    thread_local std::vector<__m512> sbuf;
    wbuf.resize(chunks * 16);
    sbuf.resize(chunks * 4);
    for (; first_alone + 16 <= n1; first_alone += 16) {
      prepare16<BITS>(weights, scales, first_alone, K, wbuf.data(), sbuf.data());
      for_each_block(0, M, M, [&](int64_t m, auto rows) {
        across_block<decltype(rows)::value>(wbuf.data(), sbuf.data(), activations, s, chunks, N, m, y + first_alone);
      });
    }
    if (first_alone == n1) return;
  }
  for (int64_t ahead = 0; ahead < PREFETCH_AHEAD; ahead += 64)  // the start of this thread's rows
    _mm_prefetch((const char*)(weights + first_alone * row_bytes + ahead), PREFETCH_HINT);
  for (int64_t tile = 0; tile < M; tile += TILE_ROWS) {
    const int64_t tile_end = std::min(M, tile + TILE_ROWS);
    for (int64_t n = first_alone; n < n1; n++) {
      const uint8_t* w = weights + n * row_bytes;
      const uint16_t* h = scales + n * row_scales;
      for_each_block(tile, tile_end, M, [&](int64_t m, auto rows) {
        rows_block<BITS, decltype(rows)::value>(w, h, activations, s, chunks, N, m, y + n);
      });
    }
  }
}

}  // namespace

namespace lucidlm_kernels {  // the operators (kernels.h declares them for bindings.cpp)

// x (..., K) float32 times the (N, K) weight -> (..., N) float32 (x's leading dimensions kept: a
// layer's input goes in as it is, with no reshaping and copying around the call).
at::Tensor int8_dot_matmul(const at::Tensor& x_in, const at::Tensor& weights, const at::Tensor& scales, int64_t bits) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.scalar_type() == at::kFloat, "x: a float32 tensor (..., K)");
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 8, "bits: 4, 5 or 8");
  const at::Tensor x = x_in.contiguous();
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, N = weights.size(0);
  TORCH_CHECK(K % CHUNK == 0, "K must be a multiple of 64");
  TORCH_CHECK(weights.scalar_type() == at::kByte && weights.is_contiguous() && weights.dim() == 2 &&
              weights.size(1) == K * bits / 8, "weights: (N, K * bits/8) uint8");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
              scales.numel() == N * K / CHUNK * scales_per_chunk(bits), "scales: (N, K/64, 4 (4-, 5-bit) or 2 (8-bit)) float16");
  // x's rounding goes to scratch space of the calling thread, kept between calls: three tensors
  // allocated and freed per call were ~1 us each, and a SmolLM2 step makes 121 calls.
  // (The activations start on a cache line: the kernel reads them in 64-byte vectors, and one
  // that straddled two lines would cost two reads.)
  thread_local std::vector<uint8_t> a_scratch;
  thread_local std::vector<float> s_scratch;
  if ((int64_t)a_scratch.size() < M * K / CHUNK * ACTIVATION_BYTES + 64)
    a_scratch.resize(M * K / CHUNK * ACTIVATION_BYTES + 64);
  if ((int64_t)s_scratch.size() < M * K / 32) s_scratch.resize(M * K / 32);
  uint8_t* a = a_scratch.data() + (64 - reinterpret_cast<uintptr_t>(a_scratch.data()) % 64) % 64;
  float* s = s_scratch.data();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  quantize_rows(x.data_ptr<float>(), M, K, a, s);
  const uint8_t* w = weights.data_ptr<uint8_t>();
  const uint16_t* h = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  float* out = y.data_ptr<float>();
  // Rows split between threads in blocks of 16. Even small matrices are worth splitting: a
  // decode step streams its weights from memory, and one core alone reads at ~25 GB/s where two
  // read ~50 (576 x 576 4-bit, out of cache: 8.4 us on one thread, 6.6 on two). (Whole blocks,
  // so that which rows go 16 at a time, `across_block`, does not depend on the number of threads.)
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * 16, n1 = std::min(N, b1 * 16);
    if (bits == 4)
      rows_dot<4>(w, h, a, s, M, K, N, n0, n1, out);
    else if (bits == 5)
      rows_dot<5>(w, h, a, s, M, K, N, n0, n1, out);
    else
      rows_dot<8>(w, h, a, s, M, K, N, n0, n1, out);
  });
  return y;
}

// The float values of rows of a weight in this layout, for the dense (prefill) path: out (rows, K)
// float32 or bfloat16, scale * q + offset computed in float32 (exact: q has 8 bits, the scale and
// offset 11) and, for bfloat16, rounded once to nearest even. weights, scales: the rows wanted.
void dequantize(const at::Tensor& weights, const at::Tensor& scales, int64_t bits, at::Tensor& out) {
  const int64_t rows = weights.size(0), K = out.size(1), chunks = K / CHUNK;
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 8, "bits: 4, 5 or 8");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == rows && out.is_contiguous() && K % CHUNK == 0 &&
              (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16), "out: (rows, K) float32 or bfloat16");
  TORCH_CHECK(weights.is_contiguous() && weights.size(1) == K * bits / 8 && scales.is_contiguous() &&
              scales.numel() == rows * chunks * scales_per_chunk(bits) && scales.scalar_type() == at::kHalf,
              "weights, scales: the layout's");
  const uint8_t* w = weights.data_ptr<uint8_t>();
  const uint16_t* h = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const bool to_bf16 = out.scalar_type() == at::kBFloat16;
  char* o = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      for (int64_t c = 0; c < chunks; c++) {
        const uint8_t* src = w + r * K * bits / 8 + c * CHUNK * bits / 8;
        const __m512i q = bits == 4 ? load_chunk<4>(src) : bits == 5 ? load_chunk<5>(src) : load_chunk<8>(src);
        const int64_t sc = scales_per_chunk(bits);
        const uint16_t* hc = h + (r * chunks + c) * sc;
        const __m128i parts[4] = {_mm512_extracti32x4_epi32(q, 0), _mm512_extracti32x4_epi32(q, 1),
                                  _mm512_extracti32x4_epi32(q, 2), _mm512_extracti32x4_epi32(q, 3)};
        for (int part = 0; part < 4; part++) {  // 16 values each; parts 0, 1: group A, 2, 3: group B
          const __m512 values = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(parts[part])),
                                                _mm512_set1_ps(_cvtsh_ss(hc[part / 2])),
                                                _mm512_set1_ps(bits != 8 ? _cvtsh_ss(hc[2 + part / 2])
                                                                         : -128.f * _cvtsh_ss(hc[part / 2])));
          const int64_t at = r * K + c * CHUNK + part * 16;
          if (to_bf16) {  // round to nearest even: add 0x7FFF plus the lowest kept bit, keep the top 16 bits
            __m512i bits32 = _mm512_castps_si512(values);
            __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits32, 16), _mm512_set1_epi32(1));
            bits32 = _mm512_srli_epi32(_mm512_add_epi32(bits32, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
            _mm256_storeu_si256((__m256i*)(o + 2 * at), _mm512_cvtepi32_epi16(bits32));
          } else {
            _mm512_storeu_ps((float*)(o + 4 * at), values);
          }
        }
      }
    }
  });
}

// The index of each row's largest value, as torch.argmax gives it: the first on ties, the first
// NaN if there is one. x: (B, V) float32 with contiguous rows. PyTorch's reduction takes ~135 us
// over Gemma 3's 262,144 logits (~2 % of a decode step); 16 lanes each keeping their largest
// value and its index, then the best lane, ~15 us.
at::Tensor argmax(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1 && x.size(1) > 0,
              "x: (B, V) float32 with contiguous rows, V > 0");
  const int64_t B = x.size(0), V = x.size(1);
  TORCH_CHECK(V < (int64_t{1} << 31), "rows of at most 2^31 - 1 values");
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++) {
    const float* row = x.data_ptr<float>() + b * x.stride(0);
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i where = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), at = where;
    int64_t nan_at = -1, v = 0;
    for (; v + 16 <= V; v += 16) {
      const __m512 values = _mm512_loadu_ps(row + v);
      const __mmask16 nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
      if (nan) { nan_at = v + __builtin_ctz(nan); break; }
      const __mmask16 greater = _mm512_cmp_ps_mask(values, best, _CMP_GT_OQ);  // strictly: ties keep the first
      best = _mm512_mask_mov_ps(best, greater, values);
      where = _mm512_mask_mov_epi32(where, greater, at);
      at = _mm512_add_epi32(at, _mm512_set1_epi32(16));
    }
    // the lowest index among the lanes holding the maximum (0 if every value so far is -inf, or none)
    float top = _mm512_reduce_max_ps(best);
    int64_t index = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ), where);
    for (int64_t t = v; nan_at < 0 && t < V; t++) {  // the last few, one at a time
      if (std::isnan(row[t])) nan_at = t;
      else if (row[t] > top) top = row[t], index = t;
    }
    o[b] = nan_at >= 0 ? nan_at : index;
  }
  return out;
}

}  // namespace lucidlm_kernels

TORCH_LIBRARY(lucidlm_kernels, m) {
  m.def("int8_dot_matmul(Tensor x, Tensor weights, Tensor scales, int bits) -> Tensor");
  m.def("dequantize(Tensor weights, Tensor scales, int bits, Tensor(a!) out) -> ()");
  m.def("argmax(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(lucidlm_kernels, CPU, m) {
  m.impl("int8_dot_matmul", &lucidlm_kernels::int8_dot_matmul);
  m.impl("dequantize", &lucidlm_kernels::dequantize);
  m.impl("argmax", &lucidlm_kernels::argmax);
}
