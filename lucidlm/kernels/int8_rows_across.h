// The int8-dot kernel's path for many rows of x (cpu_decode.cpp's int8_dot_matmul, from
// ACROSS_FROM_ROWS rows): 16 weight rows at a time, their outputs across the vector lanes.
// Included by cpu_decode.cpp inside its anonymous namespace, after the layout it shares (CHUNK,
// scales_per_chunk, load_chunk, ACTIVATION_BYTES and quantize_rows' activations, the prefetch
// settings); not a header for other files.
#pragma once

// rows_block keeps a chunk's 64 values along the lanes, so every row of x pays for turning each
// chunk's integer sums into floats (convert, scale, accumulate, and the offsets' term) and for a
// horizontal sum at the end: ~9 instructions per 64 weights and row. With 8 rows of x or more,
// the kernel instead takes 16 weight rows at a time and transposes their chunks (`transpose16`),
// so that lane i of a vector holds four consecutive values of weight row i: vpdpbusd with four
// values of x broadcast then works on 16 outputs at once, a group's 32 values are summed as
// integers before one conversion per group and row of x, and each row of x's 16 outputs are
// stored as they are (~3 instructions per 64 weights and row). The decoded, transposed chunks of
// the 16 rows go to a buffer first, so every row of x reuses them. (The sums are grouped
// differently from rows_block's: a row's result in a call of 8 rows or more differs from its
// result alone within float32 rounding; it still does not depend on the other rows' values.)

// Rows of x from which rows_dot works this way. Decoding and transposing 16 weight rows costs ~0.3
// instructions a weight, paid back by 8 rows; with 4, decode steps of 4 sequences were slower than
// rows_block's (SmolLM2: 6.7 against 5.2 ms, bench/kernel_ab.py --batch 4), with 8 faster (9.3, 10.0).
constexpr int64_t ACROSS_FROM_ROWS = 8;

// r[i] holds 16 dwords (i, 0..15); afterwards r[t] holds (0..15, t): a 16 x 16 transpose of 32-bit
// elements. Unpacking pairs of dwords, then of qwords, transposes 4 x 4 within each 128-bit lane;
// two rounds of 128-bit shuffles move the lanes.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  __m512i u[4][4];  // u[g][c]: lane L holds rows 4g..4g+3 of column 4L + c
  for (int g = 0; g < 4; g++) {
    u[g][0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[g][1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[g][2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[g][3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int c = 0; c < 4; c++) {  // column 4L + c for L = 0..3: lane g from u[g][c]'s lane L
    const __m512i a0 = _mm512_shuffle_i32x4(u[0][c], u[1][c], 0x44), a1 = _mm512_shuffle_i32x4(u[0][c], u[1][c], 0xEE);
    const __m512i a2 = _mm512_shuffle_i32x4(u[2][c], u[3][c], 0x44), a3 = _mm512_shuffle_i32x4(u[2][c], u[3][c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(a0, a2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(a0, a2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(a1, a3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(a1, a3, 0xDD);
  }
}

// Weight rows [n, n + 16) decoded for across_block: per chunk c, 16 vectors (four values of each
// row: wbuf[c * 16 + t] lane i = values 4t..4t+3 of row n + i) and 4 of floats (sbuf[c * 4 + k]
// lane i: row n + i's dA, dB, offset A, offset B; the offset is m, or -128 d for 8-bit values).
template <int BITS>
void prepare16(const uint8_t* weights, const uint16_t* scales, int64_t n, int64_t K, __m512i* wbuf, __m512* sbuf) {
  constexpr int64_t SC = scales_per_chunk(BITS), chunk_bytes = CHUNK * BITS / 8;
  const int64_t chunks = K / CHUNK, row_bytes = K * BITS / 8, row_scales = chunks * SC;
  // The next 16 rows' weights and numbers, asked for while these are decoded: they come from
  // memory (a large matrix, an LM head, is read once a call), and the 16 streams of a block are
  // more than the hardware's prefetchers follow. (Past the matrix's end: harmless.)
  for (int64_t b = 0; b < 16 * row_bytes; b += 64)
    _mm_prefetch((const char*)(weights + (n + 16) * row_bytes + b), PREFETCH_HINT);
  for (int64_t b = 0; b < 16 * row_scales * 2; b += 64)
    _mm_prefetch((const char*)(scales + (n + 16) * row_scales) + b, PREFETCH_HINT);
  // Each row's float16 numbers of a chunk (4: dA, dB, mA, mB; 2 for 8-bit: dA, dB) gathered for the
  // 16 rows, then sorted by kind (k x 16 rows) and widened: numbers[k] lane i = row n + i's k-th.
  const __m512i row_starts = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                _mm512_set1_epi32((int)(row_scales * 2)));  // bytes
  alignas(64) uint16_t by_kind[SC == 4 ? 64 : 32];  // (k, row)
  alignas(64) int16_t order[SC == 4 ? 64 : 32];  // where each of those is in the gathered numbers
  for (int k = 0; k < SC; k++)  // (4 numbers: rows 8-15 in the second vector, element 32 on)
    for (int i = 0; i < 16; i++) order[k * 16 + i] = (int16_t)(SC == 4 && i >= 8 ? 32 + (i - 8) * 4 + k : i * SC + k);
  for (int64_t c = 0; c < chunks; c++) {
    __m512i r[16];
    for (int i = 0; i < 16; i++) r[i] = load_chunk<BITS>(weights + (n + i) * row_bytes + c * chunk_bytes);
    transpose16(r);
    for (int t = 0; t < 16; t++) _mm512_store_si512(wbuf + c * 16 + t, r[t]);
    const uint16_t* h = scales + n * row_scales + c * SC;
    if constexpr (SC == 4) {  // 8 bytes a row: two gathers of 8 rows' qwords
      const __m512i rows_low = _mm512_i32gather_epi64(_mm512_castsi512_si256(row_starts), h, 1);
      const __m512i rows_high = _mm512_i32gather_epi64(_mm512_extracti64x4_epi64(row_starts, 1), h, 1);
      // (row i's k-th number: element 4i + k of rows_low for i < 8, of rows_high at 4(i - 8) + k)
      const __m512i first = _mm512_load_si512(order), second = _mm512_load_si512(order + 32);
      _mm512_store_si512(by_kind, _mm512_permutex2var_epi16(rows_low, first, rows_high));
      _mm512_store_si512(by_kind + 32, _mm512_permutex2var_epi16(rows_low, second, rows_high));
    } else {  // 4 bytes a row: one gather of 16 rows' dwords
      const __m512i rows = _mm512_i32gather_epi32(row_starts, h, 1);
      _mm512_store_si512(by_kind, _mm512_permutexvar_epi16(_mm512_load_si512(order), rows));
    }
    for (int k = 0; k < 4; k++) {
      const int kind = SC == 4 ? k : k % 2;  // (8-bit: offsets -128 d)
      __m512 numbers = _mm512_cvtph_ps(_mm256_load_si256((const __m256i*)(by_kind + kind * 16)));
      if (SC == 2 && k >= 2) numbers = _mm512_mul_ps(numbers, _mm512_set1_ps(-128.f));
      sbuf[c * 4 + k] = numbers;
    }
  }
}

// y[m, n .. n + 16) for the block of MB rows of x from row `first` (quantize_rows' layout), from
// prepare16's buffers. Per chunk and group of 32 values: 256 q.p1 + q.p2 summed as integers over
// the group (8 vpdpbusd each way; 32 * 255 * 127 * 257 < 2^31), then times d e, plus offset * s.
template <int MB>
inline void across_block(const __m512i* wbuf, const __m512* sbuf, const uint8_t* activations, const float* s,
                         int64_t chunks, int64_t N, int64_t first, float* y_n) {
  const uint8_t* a = activations + first * chunks * ACTIVATION_BYTES;
  const float* sums = s + first * chunks * 2;
  __m512 out[MB];
  for (int j = 0; j < MB; j++) out[j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; c++, a += MB * ACTIVATION_BYTES, sums += MB * 2) {
    const __m512i* w = wbuf + c * 16;
    __m512i dot[2][MB];  // [group][row of x]: both groups at once, 2 * MB independent sums
    for (int j = 0; j < MB; j++) dot[0][j] = dot[1][j] = _mm512_setzero_si512();
    for (int term = 0; term < 2; term++) {  // p1, then p2 (after the shift: 256 q.p1 + q.p2)
      if (term == 1)
        for (int j = 0; j < MB; j++) dot[0][j] = _mm512_slli_epi32(dot[0][j], 8), dot[1][j] = _mm512_slli_epi32(dot[1][j], 8);
      for (int t = 0; t < 8; t++) {
        const __m512i wa = _mm512_load_si512(w + t), wb = _mm512_load_si512(w + 8 + t);
        for (int j = 0; j < MB; j++) {
          const int32_t* p = reinterpret_cast<const int32_t*>(a + (term * MB + j) * 64);
          dot[0][j] = _mm512_dpbusd_epi32(dot[0][j], wa, _mm512_set1_epi32(p[t]));
          dot[1][j] = _mm512_dpbusd_epi32(dot[1][j], wb, _mm512_set1_epi32(p[8 + t]));
        }
      }
    }
    for (int j = 0; j < MB; j++) {
      const float* e = reinterpret_cast<const float*>(a + (2 * MB + j) * 64);  // lane 0: e A, lane 8: e B
      for (int group = 0; group < 2; group++) {
        const __m512 scale = _mm512_mul_ps(sbuf[c * 4 + group], _mm512_set1_ps(e[8 * group]));
        out[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[group][j]), scale, out[j]);
        out[j] = _mm512_fmadd_ps(sbuf[c * 4 + 2 + group], _mm512_set1_ps(8.f * sums[j * 2 + group]), out[j]);
      }
    }
  }
  for (int j = 0; j < MB; j++) _mm512_storeu_ps(y_n + (first + j) * N, out[j]);
}
