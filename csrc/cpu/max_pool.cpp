// CPU max_pool2d (dilation 1): SqueezeNet's 3x3 / stride 2 / ceil_mode pooling, but any kernel,
// stride and padding. Why our own: ATen's CPU max_pool2d took 5.6 ms for a 64 x 111 x 111 NCHW map
// at 2 threads here (0.6 ms channels_last), more than all Fire modules of SqueezeNet 1.1 together.
//
// Separable: for each output row the k input rows are reduced elementwise into one row (contiguous
// loads in both layouts), then the k columns of each window (NCHW: a stride-s gather of that row,
// done with two loads and a permute for s = 1, 2; channels_last: whole channel vectors per pixel).
// Padding is -inf, so it never wins. NaN propagates like torch: a window holding a NaN gives NaN.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu/isa.h"
#include "memory_format.h"

namespace sqz {
namespace {

// torch's pooling_output_shape (dilation 1): with ceil_mode the last window must start inside the
// input or its left padding.
int64_t pooled_size(int64_t in, int64_t k, int64_t s, int64_t p, bool ceil_mode) {
  const int64_t out = (in + 2 * p - k + (ceil_mode ? s - 1 : 0)) / s + 1;
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
// -inf-padded reduced row (readable up to (Wo + 16) * sw + kw + 32 elements).
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

// Input rows of output row oy (clipped to the image; never empty: see pooled_size).
inline void window_rows(const PoolGeom& g, int64_t oy, int64_t& r0, int64_t& r1) {
  r0 = std::max<int64_t>(oy * g.sh - g.ph, 0);
  r1 = std::min<int64_t>(oy * g.sh - g.ph + g.kh, g.H);
}

template <typename T>
void pool_plane_rows(const T* xp, T* yp, const PoolGeom& g, std::vector<T>& row, bool wide) {
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
// store-to-load forwarding; this one is 1.3-1.7x faster on SqueezeNet's maps (same-process A/B
// with SQZ_POOL_FAST=0, 2 threads).
// vmaxps does not propagate NaN, so NaNs are only detected here (returned true): the caller redoes
// the plane on the exact path.
template <int NV>
bool pool3s2_strip(const float* xp, float* yp, const PoolGeom& g, int64_t ox0) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  auto lanes = [](int64_t n) {  // first n (clamped to [0, 16]) lanes
    return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
  };
  __mmask16 m0[NV], m1[NV], m2[NV], m3[NV], mo[NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t c = 2 * (ox0 + 16 * v);  // first input column of the vector's windows
    m0[v] = lanes(g.W - c);
    m1[v] = lanes(g.W - c - 16);
    m2[v] = lanes(g.W - c - 2);
    m3[v] = lanes(g.W - c - 18);
    mo[v] = lanes(g.Wo - ox0 - 16 * v);
  }
  __mmask16 nan = 0;
  __m512 pend[NV];
  const int64_t rows = std::min(g.H, 2 * g.Ho + 1);  // rows past the last window are never read
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * g.W + 2 * ox0;
    for (int v = 0; v < NV; ++v) {
      const float* p = xr + 32 * v;
      const __m512 a = _mm512_mask_loadu_ps(ninf, m0[v], p);
      const __m512 b = _mm512_mask_loadu_ps(ninf, m1[v], p + 16);
      const __m512 a2 = _mm512_mask_loadu_ps(ninf, m2[v], p + 2);
      const __m512 b2 = _mm512_mask_loadu_ps(ninf, m3[v], p + 18);
      nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q) |
             _mm512_cmp_ps_mask(b2, b2, _CMP_UNORD_Q);
      const __m512 h = _mm512_max_ps(
          _mm512_max_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b)),
          _mm512_permutex2var_ps(a2, even, b2));
      if (r == 0) {
        pend[v] = h;
      } else if (r & 1) {
        pend[v] = _mm512_max_ps(pend[v], h);
      } else {  // row r closes the window of output row (r - 2) / 2 and opens the next one
        _mm512_mask_storeu_ps(yp + (r - 2) / 2 * g.Wo + ox0 + 16 * v, mo[v], _mm512_max_ps(pend[v], h));
        pend[v] = h;
      }
    }
  }
  if (2 * g.Ho >= rows) {  // ceil_mode: the last window is cut off by the bottom edge
    float* yr = yp + (g.Ho - 1) * g.Wo + ox0;
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(yr + 16 * v, mo[v], pend[v]);
  }
  return nan != 0;
}

bool pool3s2_plane(const float* xp, float* yp, const PoolGeom& g) {
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

template <typename T>
void pool_nchw(const T* x, T* y, const PoolGeom& g, bool wide) {
  const int64_t padded = (g.Wo + 16) * g.sw + g.kw + 32;  // see max_cols_nchw
  bool fast3s2 = false;
#if defined(__AVX512F__)
  fast3s2 = std::is_same<T, float>::value && wide && g.kh == 3 && g.kw == 3 && g.sh == 2 &&
            g.sw == 2 && g.ph == 0 && g.pw == 0 && pool_fast_enabled();
#endif
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t b, int64_t e) {
    std::vector<T> row(padded, -std::numeric_limits<T>::infinity());
    for (int64_t plane = b; plane < e; ++plane) {
      const T* xp = x + plane * g.H * g.W;
      T* yp = y + plane * g.Ho * g.Wo;
#if defined(__AVX512F__)
      if constexpr (std::is_same<T, float>::value) {
        if (fast3s2 && !pool3s2_plane(xp, yp, g)) continue;  // else NaN: redo exactly
      }
#endif
      pool_plane_rows(xp, yp, g, row, wide);
    }
  });
}

template <typename T>
void pool_channels_last(const T* x, T* y, const PoolGeom& g, bool wide) {
  const int64_t C = g.C;
  const int64_t pixels = std::max((g.Wo - 1) * g.sw + g.kw, g.pw + g.W);  // of the padded row
  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t b, int64_t e) {
    std::vector<T> row(pixels * C, -std::numeric_limits<T>::infinity());
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / g.Ho, oy = t % g.Ho;
      int64_t r0, r1;
      window_rows(g, oy, r0, r1);
      const T* xn = x + n * g.H * g.W * C;
      max_rows(xn + r0 * g.W * C, g.W * C, r1 - r0, g.W * C, row.data() + g.pw * C, wide);
      T* yr = y + (n * g.Ho + oy) * g.Wo * C;
      for (int64_t ox = 0; ox < g.Wo; ++ox)  // the kw pixels of the window, whole channel rows
        max_rows(row.data() + ox * g.sw * C, C, g.kw, C, yr + ox * C, wide);
    }
  });
}

at::Tensor max_pool2d_cpu(const at::Tensor& x_in, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, bool ceil_mode) {
  const char* op = "max_pool2d";
  TORCH_CHECK(x_in.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x_in.dim(), "-D");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x_in.scalar_type());
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1, op,
              ": kernel_size must be two positive ints, got ", kernel_size);
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op,
              ": stride must be two positive ints, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0 &&
                  2 * padding[0] <= kernel_size[0] && 2 * padding[1] <= kernel_size[1],
              op, ": padding must be two ints in [0, kernel_size / 2], got ", padding,
              " for kernel_size ", kernel_size);
  PoolGeom g{x_in.size(0), x_in.size(1), x_in.size(2), x_in.size(3), kernel_size[0], kernel_size[1],
             stride[0], stride[1], padding[0], padding[1], 0, 0};
  TORCH_CHECK(g.H + 2 * g.ph >= g.kh && g.W + 2 * g.pw >= g.kw, op, ": kernel_size ", kernel_size,
              " is larger than the padded input ", x_in.sizes());
  g.Ho = pooled_size(g.H, g.kh, g.sh, g.ph, ceil_mode);
  g.Wo = pooled_size(g.W, g.kw, g.sw, g.pw, ceil_mode);
  const at::MemoryFormat fmt = output_memory_format(x_in);
  at::Tensor y = at::empty({g.N, g.C, g.Ho, g.Wo}, x_in.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  const at::Tensor x = x_in.contiguous(fmt);  // a copy only for other strides
  const bool wide = active_isa() == Isa::Avx512;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_pool2d", [&] {
    if (fmt == at::MemoryFormat::ChannelsLast) {
      pool_channels_last(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g, wide);
    } else {
      pool_nchw(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g, wide);
    }
  });
  return y;
}

}  // namespace
}  // namespace sqz

TORCH_LIBRARY_IMPL(sqz_kernels, CPU, m) {
  m.impl("max_pool2d", &sqz::max_pool2d_cpu);
}
