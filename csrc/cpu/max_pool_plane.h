// Per-plane max-pooling routines shared by max_pool2d (max_pool.cpp) and the fused conv + pool of
// codebook_conv2d_max_pool (codebook_conv_pool.cpp, which pools each band of its conv output while
// it is still in cache). Dilation 1; padding is -inf, so it never wins; NaN propagates like torch.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include "cpu/fire_transpose.h"

namespace sqz {
namespace pool {

// torch's pooling_output_shape (dilation 1): with ceil_mode the last window must start inside the
// input or its left padding.
// (in + 2p - k as a quotient and remainder: `+ s - 1` for the ceiling wrapped for strides near
// 2^63, a SIGFPE in the fused conv + pool's band arithmetic.)
inline int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, bool ceil_mode) {
  const int64_t span = in + 2 * p - k;  // >= 0, checked by the callers
  const int64_t out = span / s + (ceil_mode && span % s != 0 ? 1 : 0) + 1;
  return ceil_mode && (out - 1) * s >= in + p ? out - 1 : out;
}

template <typename T>
inline T nan_max(T m, T v) {
  return (v > m || v != v) ? v : m;  // a NaN in either stays NaN
}

#if defined(__AVX512F__)
// out[i, i + 16) = max over k < count of load(i, k, mask), for i = 0, 16, ... < len: the
// NaN-propagating vector max both passes use (vmaxps alone would drop a NaN in its first operand).
template <typename Load>
inline void vec_max_blocks(int64_t len, int64_t count, float* out, Load load) {
  const __m512 qnan = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = len - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - i)) - 1u);
    __m512 acc = ninf;
    __mmask16 nan = 0;
    for (int64_t k = 0; k < count; ++k) {
      const __m512 v = load(i, k, m);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      acc = _mm512_max_ps(acc, v);
    }
    _mm512_mask_storeu_ps(out + i, m, _mm512_mask_mov_ps(acc, nan, qnan));
  }
}
#endif

// dst[i] = max over rows r < nrows of src[r * stride + i], i < len.
template <typename T>
void max_rows(const T* src, int64_t stride, int64_t nrows, int64_t len, T* dst, bool wide) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (wide) {
      vec_max_blocks(len, nrows, dst, [&](int64_t i, int64_t r, __mmask16 m) {
        return _mm512_maskz_loadu_ps(m, src + r * stride + i);
      });
      return;
    }
  }
#endif
  (void)wide;
  for (int64_t i = 0; i < len; ++i) dst[i] = src[i];
  for (int64_t r = 1; r < nrows; ++r)
    for (int64_t i = 0; i < len; ++i) dst[i] = nan_max(dst[i], src[r * stride + i]);
}

// NCHW columns: out[ox] = max over kx < kw of row[ox * sw + kx], ox < Wo, where row is the
// -inf-padded reduced row (plane_scratch: readable up to (Wo + 16) * sw + kw + 32 elements when
// sw <= 2, whole 16-column blocks; up to (Wo - 1) * sw + kw otherwise).
template <typename T>
void max_cols_nchw(const T* row, int64_t kw, int64_t sw, int64_t Wo, T* out, bool wide) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (wide && sw <= 2) {
      const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      vec_max_blocks(Wo, kw, out, [&](int64_t ox, int64_t kx, __mmask16) {
        const float* p = row + ox * sw + kx;
        return sw == 1 ? _mm512_loadu_ps(p)
                       : _mm512_permutex2var_ps(_mm512_loadu_ps(p), even, _mm512_loadu_ps(p + 16));
      });
      return;
    }
  }
#endif
  (void)wide;
  for (int64_t ox = 0; ox < Wo; ++ox) {
    T acc = row[ox * sw];
    for (int64_t kx = 1; kx < kw; ++kx) acc = nan_max(acc, row[ox * sw + kx]);
    out[ox] = acc;
  }
}

struct PoolGeom {
  int64_t N, C, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo;
};

// The pool of the fused conv / Fire + max-pool ops over a [N, C, H, W] layer output (`what`
// names it in errors): padding 0, dilation 1, pool_kernel / pool_stride checked here.
inline PoolGeom checked_pool_geom(const char* op, const char* what, int64_t N, int64_t C, int64_t H,
                                  int64_t W, c10::IntArrayRef pool_kernel,
                                  c10::IntArrayRef pool_stride, bool ceil_mode) {
  TORCH_CHECK(pool_kernel.size() == 2 && pool_kernel[0] >= 1 && pool_kernel[1] >= 1, op,
              ": pool_kernel must be two positive ints, got ", pool_kernel);
  TORCH_CHECK(pool_stride.size() == 2 && pool_stride[0] >= 1 && pool_stride[1] >= 1, op,
              ": pool_stride must be two positive ints, got ", pool_stride);
  TORCH_CHECK(H >= pool_kernel[0] && W >= pool_kernel[1], op, ": pool_kernel ", pool_kernel,
              " is larger than the ", what, " output [", H, ", ", W, "]");
  PoolGeom g{N, C, H, W, pool_kernel[0], pool_kernel[1], pool_stride[0], pool_stride[1], 0, 0, 0, 0};
  g.Ho = pooled_size(H, g.kh, g.sh, 0, ceil_mode);
  g.Wo = pooled_size(W, g.kw, g.sw, 0, ceil_mode);
  return g;
}

// Input rows of output row oy (clipped to the image; never empty: see pooled_size).
inline void window_rows(const PoolGeom& g, int64_t oy, int64_t& r0, int64_t& r1) {
  r0 = std::max<int64_t>(oy * g.sh - g.ph, 0);
  r1 = std::min<int64_t>(oy * g.sh - g.ph + g.kh, g.H);
}

template <typename T>
inline void pool_plane_rows(const T* xp, T* yp, const PoolGeom& g, std::vector<T>& row, bool wide) {
  for (int64_t oy = 0; oy < g.Ho; ++oy) {
    int64_t r0, r1;
    window_rows(g, oy, r0, r1);
    max_rows(xp + r0 * g.W, g.W, r1 - r0, g.W, row.data() + g.pw, wide);
    max_cols_nchw(row.data(), g.kw, g.sw, g.Wo, yp + oy * g.Wo, wide);
  }
}

#if defined(__AVX512F__)
// SqueezeNet's pool (3 x 3, stride 2, no padding) on one float NCHW plane, for output columns
// [ox0, ox0 + 16 * NV) (the last vector masked to Wo). Columns first: each input row is read once,
// straight from x, and reduced to its stride-2 3-column maxima (two permutes of the loaded vectors
// pick the even / odd columns, a second pair of loads offset by 2 the next even column); rows are
// then combined in registers (output row oy = rows 2oy, 2oy + 1, 2oy + 2). The general path goes
// through a row buffer whose masked stores are reloaded at other offsets, which defeats
// store-to-load forwarding; this one is 1.4-1.9x faster on SqueezeNet's maps (same-process A/B
// with SQZ_POOL_FAST=0, 2 threads).
// vmaxps does not propagate NaN, so NaNs are only detected here (returned true): the caller redoes
// the plane on the exact path. Detection adds every loaded vector into running sums (a NaN input
// makes them NaN; +inf plus -inf also does, which only costs an exact redo), cheaper than a
// compare-to-mask per load. Vectors before the last of a strip are whole (2 Wo <= W) and load
// unmasked; only the last one needs masks.
template <int NV>
bool pool3s2_strip(const float* xp, float* yp, const PoolGeom& g, int64_t ox0) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  auto lanes = [](int64_t n) {  // first n (clamped to [0, 16]) lanes
    return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
  };
  const int64_t cl = 2 * (ox0 + 16 * (NV - 1));  // first input column of the last vector
  const __mmask16 m0 = lanes(g.W - cl), m1 = lanes(g.W - cl - 16), m2 = lanes(g.W - cl - 2),
                  m3 = lanes(g.W - cl - 18), mo = lanes(g.Wo - ox0 - 16 * (NV - 1));
  __m512 sum[NV], pend[NV];
  for (int v = 0; v < NV; ++v) sum[v] = _mm512_setzero_ps();
  const int64_t rows = std::min(g.H, 2 * g.Ho + 1);  // rows past the last window are never read
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * g.W + 2 * ox0;
    for (int v = 0; v < NV; ++v) {
      const float* p = xr + 32 * v;
      const bool last = v == NV - 1;
      const __m512 a = last ? _mm512_mask_loadu_ps(ninf, m0, p) : _mm512_loadu_ps(p);
      const __m512 b = last ? _mm512_mask_loadu_ps(ninf, m1, p + 16) : _mm512_loadu_ps(p + 16);
      const __m512 a2 = last ? _mm512_mask_loadu_ps(ninf, m2, p + 2) : _mm512_loadu_ps(p + 2);
      const __m512 b2 = last ? _mm512_mask_loadu_ps(ninf, m3, p + 18) : _mm512_loadu_ps(p + 18);
      sum[v] = _mm512_add_ps(sum[v], _mm512_add_ps(_mm512_add_ps(a, b), b2));
      const __m512 h = _mm512_max_ps(
          _mm512_max_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b)),
          _mm512_permutex2var_ps(a2, even, b2));
      if (r == 0) {
        pend[v] = h;
      } else if (r & 1) {
        pend[v] = _mm512_max_ps(pend[v], h);
      } else {  // row r closes the window of output row (r - 2) / 2 and opens the next one
        float* y = yp + (r - 2) / 2 * g.Wo + ox0 + 16 * v;
        if (last) _mm512_mask_storeu_ps(y, mo, _mm512_max_ps(pend[v], h));
        else _mm512_storeu_ps(y, _mm512_max_ps(pend[v], h));
        pend[v] = h;
      }
    }
  }
  if (2 * g.Ho >= rows) {  // ceil_mode: the last window is cut off by the bottom edge
    float* yr = yp + (g.Ho - 1) * g.Wo + ox0;
    for (int v = 0; v < NV - 1; ++v) _mm512_storeu_ps(yr + 16 * v, pend[v]);
    _mm512_mask_storeu_ps(yr + 16 * (NV - 1), mo, pend[NV - 1]);
  }
  __m512 total = sum[0];
  for (int v = 1; v < NV; ++v) total = _mm512_add_ps(total, sum[v]);
  return _mm512_cmp_ps_mask(total, total, _CMP_UNORD_Q) != 0;
}

inline bool pool3s2_plane(const float* xp, float* yp, const PoolGeom& g) {
  bool nan = false;
  int64_t ox = 0;
  for (; g.Wo - ox > 48; ox += 64) nan |= pool3s2_strip<4>(xp, yp, g, ox);
  const int64_t left = g.Wo - ox;
  if (left > 32) nan |= pool3s2_strip<3>(xp, yp, g, ox);
  else if (left > 16) nan |= pool3s2_strip<2>(xp, yp, g, ox);
  else if (left > 0) nan |= pool3s2_strip<1>(xp, yp, g, ox);
  return nan;
}
#endif

// SQZ_POOL_FAST=0 sends every pool down the general path (A/B measurements, tests).
inline bool pool_fast_enabled() {
  const char* e = std::getenv("SQZ_POOL_FAST");
  return !(e && e[0] == '0');
}

// Whether planes of geometry g may take the 3 x 3 / stride-2 fast path (float32 AVX-512 only).
template <typename T>
inline bool fast3s2_applies(const PoolGeom& g, bool wide) {
  return std::is_same<T, float>::value && wide && g.kh == 3 && g.kw == 3 && g.sh == 2 &&
         g.sw == 2 && g.ph == 0 && g.pw == 0 && pool_fast_enabled();
}

// Scratch row of pool_plane_rows for geometry g (-inf padded; see max_cols_nchw): the padded
// input row, and what max_cols_nchw reads. Not (Wo + 16) * sw for every stride: a stride of 2^24
// made that 2 GB for a one-column output.
template <typename T>
inline std::vector<T> plane_scratch(const PoolGeom& g) {
  const int64_t cols = g.sw <= 2 ? (g.Wo + 16) * g.sw : (g.Wo - 1) * g.sw;
  const int64_t n = std::max(cols + g.kw, g.pw + g.W) + 32;
  return std::vector<T>(static_cast<size_t>(n), -std::numeric_limits<T>::infinity());
}

// One plane: x rows of g.W elements (contiguous), y rows of g.Wo elements. fast3s2 from
// fast3s2_applies; `row` from plane_scratch.
template <typename T>
inline void pool_plane(const T* xp, T* yp, const PoolGeom& g, std::vector<T>& row, bool wide,
                       bool fast3s2) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (fast3s2 && !pool3s2_plane(xp, yp, g)) return;  // else a NaN: redo the plane exactly
  }
#endif
  (void)fast3s2;
  pool_plane_rows(xp, yp, g, row, wide);
}

// The fused conv + pool ops: pooled rows of one band of channels [o0, o1) of a conv output (channel
// o at conv + o * conv_plane, rows of bg.W elements) -> the output. NCHW: the pool writes the output rows directly. Other
// layouts (channels_last): pooled into `tmp` [channel][pixel], then moved with 16 x 16 transposes
// (a pooled band's pixels are one evenly strided run in channels_last).
template <typename T>
inline void pool_band(const T* conv, int64_t conv_plane, const PoolGeom& bg, int64_t o0, int64_t o1,
               T* out, const int64_t* os, std::vector<T>& tmp, std::vector<T>& row, bool wide,
               bool fast) {
  const int64_t npix = bg.Ho * bg.Wo;
  const bool nchw = os[3] == 1 && os[2] == bg.Wo;
  if (nchw) {
    for (int64_t o = o0; o < o1; ++o)
      pool_plane(conv + o * conv_plane, out + o * os[1], bg, row, wide, fast);
    return;
  }
  if (tmp.size() < static_cast<size_t>((o1 - o0) * npix)) tmp.resize((o1 - o0) * npix);
  for (int64_t o = o0; o < o1; ++o)
    pool_plane(conv + o * conv_plane, tmp.data() + (o - o0) * npix, bg, row, wide, fast);
  const bool run = os[2] == bg.Wo * os[3];  // pixels evenly strided across rows
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (wide && run && os[1] == 1) {
      for (int64_t og = o0; og < o1; og += 16)
        for (int64_t p = 0; p < npix; p += 16)
          transpose_tile16(tmp.data() + (og - o0) * npix + p, npix,
                           static_cast<int>(std::min<int64_t>(16, o1 - og)),
                           static_cast<int>(std::min<int64_t>(16, npix - p)), out + og + p * os[3],
                           os[3]);
      return;
    }
  }
#endif
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t i = 0; i < bg.Ho; ++i)
      for (int64_t j = 0; j < bg.Wo; ++j)
        out[o * os[1] + i * os[2] + j * os[3]] = tmp[(o - o0) * npix + i * bg.Wo + j];
}

}  // namespace pool
}  // namespace sqz
