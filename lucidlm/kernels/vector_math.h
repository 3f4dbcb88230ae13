// Vector math shared by the kernels of this directory (AVX-512, 16 floats at a time).
// (cpu_decode.py folds this file's hash into the build flags: editing it rebuilds the kernels.)
#pragma once
#include <immintrin.h>

namespace {

// e^x for x <= 0 (attention scores less their maximum; -|x| in the gated activations), 16 at a
// time: e^x = 2^n e^f with n = round(x log2 e) and f = x - n ln 2 (ln 2 in two parts, so that f is
// exact to float32), |f| <= 0.35, e^f from its Taylor series to degree 7 (truncation error < 6e-9,
// below float32's rounding).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-100.f));  // e^-100 is 0 in float32 anyway; keeps n finite
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  for (float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

}  // namespace
