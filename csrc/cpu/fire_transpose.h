// 16x16 float transposes in AVX-512 registers, for moving tiles between the channels_last (HWC)
// tensors and the CHW buffers the micro-kernel works on. 64 shuffles per 256 elements, and every
// load and store is one contiguous (masked) vector: much cheaper than a 16-lane scatter per vector
// (measured ~11+ cycles each) or a scalar element loop.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>

namespace sqz {

// r[i] lane j  ->  r[j] lane i.
inline __attribute__((always_inline)) void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // x[4i + j], 128-bit lane m = rows 4i..4i+3 at column 4m + j.
  __m512 x[16];
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    x[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    x[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    x[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    x[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 plo = _mm512_shuffle_f32x4(x[j], x[4 + j], 0x88);
    const __m512 phi = _mm512_shuffle_f32x4(x[j], x[4 + j], 0xdd);
    const __m512 qlo = _mm512_shuffle_f32x4(x[8 + j], x[12 + j], 0x88);
    const __m512 qhi = _mm512_shuffle_f32x4(x[8 + j], x[12 + j], 0xdd);
    r[0 + j] = _mm512_shuffle_f32x4(plo, qlo, 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(plo, qlo, 0xdd);
    r[4 + j] = _mm512_shuffle_f32x4(phi, qhi, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(phi, qhi, 0xdd);
  }
}

// r[j] lane i = src[i * ss + j] for i, j < 16: the 16x16 transpose of a tile in memory with half
// the shuffles of transpose16x16. The 128-bit lane moves come from the loads: vector (m, i) holds
// columns 4m..4m+3 of rows i, 4 + i, 8 + i, 12 + i in its four lanes (one load and three lane
// inserts from memory, which also issue on port 0), so only the 4x4 transposes within lanes
// remain: 32 shuffles on port 5 instead of 64.
inline __attribute__((always_inline)) void transpose16x16_load(const float* src, int64_t ss,
                                                              __m512 r[16]) {
  for (int m = 0; m < 4; ++m) {
    __m512 v[4];
    for (int i = 0; i < 4; ++i) {
      const float* p = src + i * ss + 4 * m;
      __m512 t = _mm512_castps128_ps512(_mm_loadu_ps(p));
      t = _mm512_insertf32x4(t, _mm_loadu_ps(p + 4 * ss), 1);
      t = _mm512_insertf32x4(t, _mm_loadu_ps(p + 8 * ss), 2);
      v[i] = _mm512_insertf32x4(t, _mm_loadu_ps(p + 12 * ss), 3);
    }
    // In every lane g: the 4x4 block rows 4g..4g+3 x columns 4m..4m+3, transposed.
    const __m512 t0 = _mm512_unpacklo_ps(v[0], v[1]), t1 = _mm512_unpackhi_ps(v[0], v[1]);
    const __m512 t2 = _mm512_unpacklo_ps(v[2], v[3]), t3 = _mm512_unpackhi_ps(v[2], v[3]);
    const __m512d a = _mm512_castps_pd(t0), b = _mm512_castps_pd(t1);
    const __m512d c = _mm512_castps_pd(t2), d = _mm512_castps_pd(t3);
    r[4 * m + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * m + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * m + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * m + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
}

// dst[c * ds + r] = src[r * ss + c] for r < rows, c < cols (both <= 16).
inline void transpose_tile16(const float* src, int64_t ss, int rows, int cols, float* dst,
                             int64_t ds) {
  __m512 r[16];
  const __mmask16 cm = (__mmask16)((1u << cols) - 1);
  if (cols == 16) {
    for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_loadu_ps(src + i * ss) : _mm512_setzero_ps();
  } else {
    for (int i = 0; i < 16; ++i)
      r[i] = i < rows ? _mm512_maskz_loadu_ps(cm, src + i * ss) : _mm512_setzero_ps();
  }
  transpose16x16(r);
  if (rows == 16) {
    for (int c = 0; c < cols; ++c) _mm512_storeu_ps(dst + c * ds, r[c]);
  } else {
    const __mmask16 rm = (__mmask16)((1u << rows) - 1);
    for (int c = 0; c < cols; ++c) _mm512_mask_storeu_ps(dst + c * ds, rm, r[c]);
  }
}

// dst[c * ds + p] = src[p * ss + c] for p < np, c < nc, by one 16-lane gather per channel and 16
// pixels: for inputs of a few channels (RGB), where a 16x16 transpose would spend 64 shuffles on
// 16 x nc values. The offsets p * ss must fit 32 bits (callers: ss is a small pixel stride).
inline void gather_columns(const float* src, int64_t ss, int64_t np, int64_t nc, float* dst,
                           int64_t ds) {
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(ss)));
  for (int64_t p0 = 0; p0 < np; p0 += 16) {
    const int64_t left = np - p0;
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    const float* s = src + p0 * ss;
    for (int64_t c = 0; c < nc; ++c) {
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, s + c, 4);
      _mm512_mask_storeu_ps(dst + c * ds + p0, m, v);
    }
  }
}

// dst[c * ds + p] = src[p * ss + c] for p < np, c < nc: any sizes, in 16x16 tiles. For reading a
// channels-last input (the packing of the codebook kernels and of FusedFire): whole tiles go through
// transpose16x16_load, same-process A/B on the codebook channels-last squeezes 1.00-1.06x. (For the
// transposing store of output tiles, whose source rows are in L1, it was 0.92-0.98x: there the
// shuffles stay.)
inline void transpose_2d(const float* src, int64_t ss, int64_t np, int64_t nc, float* dst,
                         int64_t ds) {
  for (int64_t p0 = 0; p0 < np; p0 += 16) {
    const int rows = (int)std::min<int64_t>(16, np - p0);
    for (int64_t c0 = 0; c0 < nc; c0 += 16) {
      const int cols = (int)std::min<int64_t>(16, nc - c0);
      if (rows == 16 && cols == 16) {
        __m512 r[16];
        transpose16x16_load(src + p0 * ss + c0, ss, r);
        for (int c = 0; c < 16; ++c) _mm512_storeu_ps(dst + (c0 + c) * ds + p0, r[c]);
      } else {
        transpose_tile16(src + p0 * ss + c0, ss, rows, cols, dst + c0 * ds + p0, ds);
      }
    }
  }
}

}  // namespace sqz
#endif
