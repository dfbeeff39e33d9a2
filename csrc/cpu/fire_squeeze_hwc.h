// Squeeze 1x1 conv straight from a channels_last (HWC) band into the CHW squeeze buffer, AVX-512
// float only. Replaces staging the whole input band through a CHW transpose.
//
// Per group of 16 consecutive pixels and 16 squeeze channels: 16 accumulators (one per pixel, the
// 16 channels in lanes), each step broadcasts x[p][c] (a memory-operand broadcast) against one
// vector of the transposed squeeze weights wt[c][s0..s0+16). Then bias is already in, ReLU, one
// 16x16 register transpose, and each channel's 16 pixels go to the buffer through the caller's
// store (segments of the flat-position map).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/fire_transpose.h"

#if defined(__AVX512F__)
#include <immintrin.h>

namespace sqz {

// wt: [C][Sp] (Sp = S rounded up to 16, zero columns past S); bias: [Sp] (zeros past S).
// xn: npix pixels x C channels, contiguous. tail: scratch of 16 * C floats.
// store(ch, v, vec): channel ch (< S) of flat pixel vector v.
template <class Store>
inline void squeeze_hwc_avx512(const float* xn, int64_t npix, int64_t C, const float* wt,
                               const float* bias, int64_t S, int64_t Sp, float* tail,
                               const Store& store) {
  const int64_t nvec = (npix + 15) / 16;
  for (int64_t v = 0; v < nvec; ++v) {
    const float* xp = xn + v * 16 * C;
    const int64_t np = std::min<int64_t>(16, npix - v * 16);
    if (np < 16) {
      // Last group: pad to 16 pixels so that every read stays inside the tensor.
      std::memcpy(tail, xp, sizeof(float) * np * C);
      std::memset(tail + np * C, 0, sizeof(float) * (16 - np) * C);
      xp = tail;
    }
    for (int64_t s0 = 0; s0 < S; s0 += 16) {
      __m512 acc[16];
      const __m512 b = _mm512_loadu_ps(bias + s0);
#pragma GCC unroll 16
      for (int p = 0; p < 16; ++p) acc[p] = b;
      const float* w = wt + s0;
      // Four base pointers x {0, C, 2C, 3C}: few address registers, all compile-time shapes.
      const float* b0 = xp;
      const float* b1 = xp + 4 * C;
      const float* b2 = xp + 8 * C;
      const float* b3 = xp + 12 * C;
      const int64_t C2 = 2 * C, C3 = 3 * C;
      for (int64_t c = 0; c < C; ++c) {
        const __m512 wv = _mm512_loadu_ps(w);
        acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(b0[0]), wv, acc[0]);
        acc[1] = _mm512_fmadd_ps(_mm512_set1_ps(b0[C]), wv, acc[1]);
        acc[2] = _mm512_fmadd_ps(_mm512_set1_ps(b0[C2]), wv, acc[2]);
        acc[3] = _mm512_fmadd_ps(_mm512_set1_ps(b0[C3]), wv, acc[3]);
        acc[4] = _mm512_fmadd_ps(_mm512_set1_ps(b1[0]), wv, acc[4]);
        acc[5] = _mm512_fmadd_ps(_mm512_set1_ps(b1[C]), wv, acc[5]);
        acc[6] = _mm512_fmadd_ps(_mm512_set1_ps(b1[C2]), wv, acc[6]);
        acc[7] = _mm512_fmadd_ps(_mm512_set1_ps(b1[C3]), wv, acc[7]);
        acc[8] = _mm512_fmadd_ps(_mm512_set1_ps(b2[0]), wv, acc[8]);
        acc[9] = _mm512_fmadd_ps(_mm512_set1_ps(b2[C]), wv, acc[9]);
        acc[10] = _mm512_fmadd_ps(_mm512_set1_ps(b2[C2]), wv, acc[10]);
        acc[11] = _mm512_fmadd_ps(_mm512_set1_ps(b2[C3]), wv, acc[11]);
        acc[12] = _mm512_fmadd_ps(_mm512_set1_ps(b3[0]), wv, acc[12]);
        acc[13] = _mm512_fmadd_ps(_mm512_set1_ps(b3[C]), wv, acc[13]);
        acc[14] = _mm512_fmadd_ps(_mm512_set1_ps(b3[C2]), wv, acc[14]);
        acc[15] = _mm512_fmadd_ps(_mm512_set1_ps(b3[C3]), wv, acc[15]);
        ++b0, ++b1, ++b2, ++b3;
        w += Sp;
      }
      const __m512 z = _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int p = 0; p < 16; ++p) acc[p] = _mm512_max_ps(z, acc[p]);  // NaN-propagating ReLU
      transpose16x16(acc);  // acc[s] lane p = channel s0 + s of pixel 16v + p
      const int nch = (int)std::min<int64_t>(16, S - s0);
      for (int s = 0; s < nch; ++s) store(s0 + s, v, acc[s]);
    }
  }
}

}  // namespace sqz
#endif
