// CPU building blocks of the sparse-codebook kernels (XNNPACK-style CHW SpMM), shared by
// codebook_conv.cpp, codebook_linear.cpp and codebook_fire.cpp.
//
// Data layout: the input of a layer is a CHW buffer (zero-padded and, for stride s > 1, split into
// s*s phase planes, see codebook::tap_offset), so every (ci, ky, kx) of a weight is one address
// offset and output pixel q (flattened over rows of the plane width) reads in[offset + q].
// A micro-kernel computes a tile of up to 64 consecutive q for one output channel: per stored
// weight it broadcasts codebook[code] and multiply-adds a vector of pixels.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "codebook.h"
#include "cpu/isa.h"

namespace sqz {
namespace codebook {

using sqz::Isa;

// The instruction set of this call: the project-wide switch (torch.ops.sqz_kernels.set_cpu_isa),
// which never exceeds what this build compiled.
inline Isa active_isa() { return sqz::active_isa(); }

constexpr int kMaxTile = 128;

// ---------------------------------------------------------------------------------------------
// Micro-kernels: out[q] = sum over the stored weights j of one row of
//   cb[code[j]] * in[tab[cursor_j] + q],   q in [0, len), 1 <= len <= tile,
// walking the row's (gap, code) entries as stored (fillers advance the cursor by 255).
// tab maps a weight position (0..K-1) to its input address offset.
// ---------------------------------------------------------------------------------------------
#if defined(__GNUC__)
#define SQZ_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define SQZ_UNLIKELY(x) (x)
#endif

template <typename T>
inline void tile_scalar(const T* in, const uint8_t* gp, const uint8_t* cp, int64_t cnt,
                        int64_t cur0, const int32_t* tab, const T* cb, int len, T* out,
                        bool acc_in) {
  T acc[kMaxTile];
  for (int q = 0; q < len; ++q) acc[q] = acc_in ? out[q] : T(0);
  int64_t cur = cur0;
  for (int64_t j = 0; j < cnt; ++j) {
    cur = advance(cur, gp[j]);
    if (is_filler(gp[j])) continue;
    const T w = cb[cp[j]];
    const T* p = in + tab[cur];
    for (int q = 0; q < len; ++q) acc[q] += w * p[q];
  }
  for (int q = 0; q < len; ++q) out[q] = acc[q];
}

#if defined(__AVX512F__)
template <int NV, bool FULL>
inline void tile_avx512_n(const float* in, const uint8_t* gp, const uint8_t* cp, int64_t cnt,
                          int64_t cur0, const int32_t* tab, const float* cb, int len, float* out,
                          bool acc_in) {
  __m512 a[NV], b[NV];
  __mmask16 m[NV];
  for (int v = 0; v < NV; ++v) {
    const int lanes = std::min(16, std::max(0, len - 16 * v));
    m[v] = lanes >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << lanes) - 1u);
    a[v] = acc_in ? _mm512_maskz_loadu_ps(m[v], out + 16 * v) : _mm512_setzero_ps();
    b[v] = _mm512_setzero_ps();
  }
#define SQZ_LD512(p, v) (FULL ? _mm512_loadu_ps((p) + 16 * (v)) : _mm512_maskz_loadu_ps(m[v], (p) + 16 * (v)))
  int64_t cur = cur0;
  int64_t j = 0;
  while (j < cnt) {
    const uint32_t g0 = gp[j];
    const uint32_t g1 = j + 1 < cnt ? gp[j + 1] : kFillerGap;
    if (SQZ_UNLIKELY(g0 == kFillerGap || g1 == kFillerGap)) {
      // one entry at a time around fillers and at the end of the row
      cur = advance(cur, static_cast<uint8_t>(g0));
      if (g0 != kFillerGap) {
        const float* p0 = in + tab[cur];
        const __m512 w0 = _mm512_set1_ps(cb[cp[j]]);
        for (int v = 0; v < NV; ++v) a[v] = _mm512_fmadd_ps(w0, SQZ_LD512(p0, v), a[v]);
      }
      j += 1;
      continue;
    }
    const int64_t c0 = cur + g0 + 1;
    const int64_t c1 = c0 + g1 + 1;
    cur = c1;
    const float* p0 = in + tab[c0];
    const float* p1 = in + tab[c1];
    const __m512 w0 = _mm512_set1_ps(cb[cp[j]]);
    const __m512 w1 = _mm512_set1_ps(cb[cp[j + 1]]);
    for (int v = 0; v < NV; ++v) {
      a[v] = _mm512_fmadd_ps(w0, SQZ_LD512(p0, v), a[v]);
      b[v] = _mm512_fmadd_ps(w1, SQZ_LD512(p1, v), b[v]);
    }
    j += 2;
  }
#undef SQZ_LD512
  for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(out + 16 * v, m[v], _mm512_add_ps(a[v], b[v]));
}

// Wide tiles (65..128 pixels): 5..8 accumulators are enough independent FMA chains, so one
// entry per iteration; the per-entry scalar work (gap, code, offset, broadcast) is amortised over
// up to 8 vectors.
template <int NV, bool FULL>
inline void tile_avx512_wide(const float* in, const uint8_t* gp, const uint8_t* cp, int64_t cnt,
                             int64_t cur0, const int32_t* tab, const float* cb, int len,
                             float* out, bool acc_in) {
  __m512 a[NV];
  __mmask16 m[NV];
  for (int v = 0; v < NV; ++v) {
    const int lanes = std::min(16, std::max(0, len - 16 * v));
    m[v] = lanes >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << lanes) - 1u);
    a[v] = acc_in ? _mm512_maskz_loadu_ps(m[v], out + 16 * v) : _mm512_setzero_ps();
  }
  int64_t cur = cur0;
  for (int64_t j = 0; j < cnt; ++j) {
    const uint32_t g0 = gp[j];
    if (SQZ_UNLIKELY(g0 == kFillerGap)) {
      cur += kFillerGap;
      continue;
    }
    cur += g0 + 1;
    const float* p0 = in + tab[cur];
    const __m512 w0 = _mm512_set1_ps(cb[cp[j]]);
    for (int v = 0; v < NV; ++v) {
      const __m512 x0 = (FULL || v < NV - 1) ? _mm512_loadu_ps(p0 + 16 * v)
                                             : _mm512_maskz_loadu_ps(m[v], p0 + 16 * v);
      a[v] = _mm512_fmadd_ps(w0, x0, a[v]);
    }
  }
  for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(out + 16 * v, m[v], a[v]);
}

inline void tile_avx512(const float* in, const uint8_t* gp, const uint8_t* cp, int64_t cnt,
                        int64_t cur0, const int32_t* tab, const float* cb, int len, float* out,
                        bool acc_in) {
  if (len == 128) return tile_avx512_wide<8, true>(in, gp, cp, cnt, cur0, tab, cb, len, out, acc_in);
  if (len > 112) return tile_avx512_wide<8, false>(in, gp, cp, cnt, cur0, tab, cb, len, out, acc_in);
  if (len > 96) return tile_avx512_wide<7, false>(in, gp, cp, cnt, cur0, tab, cb, len, out, acc_in);
  if (len > 80) return tile_avx512_wide<6, false>(in, gp, cp, cnt, cur0, tab, cb, len, out, acc_in);
  if (len > 64) return tile_avx512_wide<5, false>(in, gp, cp, cnt, cur0, tab, cb, len, out, acc_in);
  if (len == 64) return tile_avx512_n<4, true>(in, gp, cp, cnt, cur0, tab, cb, len, out, acc_in);
  if (len > 48) return tile_avx512_n<4, false>(in, gp, cp, cnt, cur0, tab, cb, len, out, acc_in);
  if (len > 32) return tile_avx512_n<3, false>(in, gp, cp, cnt, cur0, tab, cb, len, out, acc_in);
  if (len > 16) return tile_avx512_n<2, false>(in, gp, cp, cnt, cur0, tab, cb, len, out, acc_in);
  return tile_avx512_n<1, false>(in, gp, cp, cnt, cur0, tab, cb, len, out, acc_in);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
template <int NV, bool FULL>
inline void tile_avx2_n(const float* in, const uint8_t* gp, const uint8_t* cp, int64_t cnt,
                        int64_t cur0, const int32_t* tab, const float* cb, int len, float* out,
                        bool acc_in) {
  __m256 a[NV], b[NV];
  __m256i m[NV];
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int v = 0; v < NV; ++v) {
    m[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32(len - 8 * v), iota);
    a[v] = acc_in ? _mm256_maskload_ps(out + 8 * v, m[v]) : _mm256_setzero_ps();
    b[v] = _mm256_setzero_ps();
  }
#define SQZ_LD256(p, v) (FULL ? _mm256_loadu_ps((p) + 8 * (v)) : _mm256_maskload_ps((p) + 8 * (v), m[v]))
  int64_t cur = cur0;
  int64_t j = 0;
  while (j < cnt) {
    const uint32_t g0 = gp[j];
    const uint32_t g1 = j + 1 < cnt ? gp[j + 1] : kFillerGap;
    if (SQZ_UNLIKELY(g0 == kFillerGap || g1 == kFillerGap)) {
      cur = advance(cur, static_cast<uint8_t>(g0));
      if (g0 != kFillerGap) {
        const float* p0 = in + tab[cur];
        const __m256 w0 = _mm256_broadcast_ss(cb + cp[j]);
        for (int v = 0; v < NV; ++v) a[v] = _mm256_fmadd_ps(w0, SQZ_LD256(p0, v), a[v]);
      }
      j += 1;
      continue;
    }
    const int64_t c0 = cur + g0 + 1;
    const int64_t c1 = c0 + g1 + 1;
    cur = c1;
    const float* p0 = in + tab[c0];
    const float* p1 = in + tab[c1];
    const __m256 w0 = _mm256_broadcast_ss(cb + cp[j]);
    const __m256 w1 = _mm256_broadcast_ss(cb + cp[j + 1]);
    for (int v = 0; v < NV; ++v) {
      a[v] = _mm256_fmadd_ps(w0, SQZ_LD256(p0, v), a[v]);
      b[v] = _mm256_fmadd_ps(w1, SQZ_LD256(p1, v), b[v]);
    }
    j += 2;
  }
#undef SQZ_LD256
  for (int v = 0; v < NV; ++v) _mm256_maskstore_ps(out + 8 * v, m[v], _mm256_add_ps(a[v], b[v]));
}

inline void tile_avx2(const float* in, const uint8_t* gp, const uint8_t* cp, int64_t cnt,
                      int64_t cur0, const int32_t* tab, const float* cb, int len, float* out,
                      bool acc_in) {
  if (len == 32) return tile_avx2_n<4, true>(in, gp, cp, cnt, cur0, tab, cb, len, out, acc_in);
  if (len > 24) return tile_avx2_n<4, false>(in, gp, cp, cnt, cur0, tab, cb, len, out, acc_in);
  if (len > 16) return tile_avx2_n<3, false>(in, gp, cp, cnt, cur0, tab, cb, len, out, acc_in);
  if (len > 8) return tile_avx2_n<2, false>(in, gp, cp, cnt, cur0, tab, cb, len, out, acc_in);
  return tile_avx2_n<1, false>(in, gp, cp, cnt, cur0, tab, cb, len, out, acc_in);
}
#endif

template <typename T>
using TileFn = void (*)(const T*, const uint8_t*, const uint8_t*, int64_t, int64_t /*cur0*/,
                        const int32_t*, const T*, int, T*, bool /*acc_in*/);

// One validated layer as the micro-kernels read it.
template <typename T>
struct Rows {
  const uint8_t* gaps;
  const uint8_t* codes;
  const int64_t* row_start;  // [O + 1]
  const int32_t* table;      // [K]: weight position -> input address offset
  const T* cb;
  // K-blocking (optional, nch > 1): the row's entries split by position chunks; chunk c of row o
  // is entries [cs[o*(nch+1)+c], cs[o*(nch+1)+c+1]) walked from cursor ccur[o*(nch+1)+c].
  int64_t nch = 1;
  const int64_t* cs = nullptr;
  const int64_t* ccur = nullptr;
};

// Per-call scratch of the K-blocking: where each row's entries cross the position boundaries
// c * chunk_pos (c = 1..nch-1). O(E), on a validated stream (cursors < K). No dense weight.
struct Chunks {
  int64_t nch = 1;
  std::vector<int64_t> start, cur;  // [O][nch + 1]
};

inline Chunks build_chunks(const uint8_t* gp, const int64_t* rs, int64_t O, int64_t K,
                           int64_t chunk_pos) {
  Chunks ch;
  ch.nch = (K + chunk_pos - 1) / chunk_pos;
  if (ch.nch <= 1) {
    ch.nch = 1;
    return ch;
  }
  const int64_t w = ch.nch + 1;
  ch.start.resize(O * w);
  ch.cur.resize(O * w);
  for (int64_t o = 0; o < O; ++o) {
    int64_t* st = ch.start.data() + o * w;
    int64_t* cu = ch.cur.data() + o * w;
    st[0] = rs[o];
    cu[0] = -1;
    int64_t c = 1, bound = chunk_pos, cur = -1;
    for (int64_t e = rs[o]; e < rs[o + 1]; ++e) {
      const int64_t nc = advance(cur, gp[e]);
      while (nc >= bound && c < ch.nch) {  // entry e is the first of chunk c
        st[c] = e;
        cu[c] = cur;
        ++c;
        bound += chunk_pos;
      }
      cur = nc;
    }
    for (; c <= ch.nch; ++c) {
      st[c] = rs[o + 1];
      cu[c] = cur;
    }
  }
  return ch;
}

template <typename T>
struct Kernel {
  TileFn<T> fn;
  int tile;
  bool wide;  // AVX-512 epilogue
};

template <typename T>
inline Kernel<T> select_kernel(Isa) {
  return {&tile_scalar<T>, 16, false};
}

template <>
inline Kernel<float> select_kernel<float>(Isa isa) {
#if defined(__AVX512F__)
  if (isa == Isa::Avx512) return {&tile_avx512, 128, true};
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (isa == Isa::Avx2 || isa == Isa::Avx512) return {&tile_avx2, 32, false};
#endif
  (void)isa;
  return {&tile_scalar<float>, 16, false};
}

// ---------------------------------------------------------------------------------------------
// Epilogue: a tile of q (flattened over rows of width `in_w`, valid columns [0, out_w)) of output
// channel o -> out[o*sC + row*sH + col*sW] = act(acc + bias).
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Epilogue {
  T* out;
  int64_t sC, sH, sW;
  int64_t in_w, out_w;
  const T* bias;  // may be null
  bool relu;
};

// One contiguous output segment: dst[c] = act(src[c] + b), c in [0, n).
template <typename T>
inline void store_segment(const T* src, T* dst, int64_t n, T b, bool relu, bool wide) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (wide) {
      const __m512 vb = _mm512_set1_ps(b), z = _mm512_setzero_ps();
      for (int64_t i = 0; i < n; i += 16) {
        const int64_t r = n - i;
        const __mmask16 m = r >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << r) - 1u);
        __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, src + i), vb);
        if (relu) v = _mm512_max_ps(z, v);  // max(0, NaN) = NaN, like torch.relu
        _mm512_mask_storeu_ps(dst + i, m, v);
      }
      return;
    }
  }
#endif
  (void)wide;
  if (relu) {
    for (int64_t c = 0; c < n; ++c) {
      const T v = src[c] + b;
      dst[c] = v < T(0) ? T(0) : v;
    }
  } else {
    for (int64_t c = 0; c < n; ++c) dst[c] = src[c] + b;
  }
}

template <typename T>
inline void store_tile(const T* acc, int64_t q0, int len, int64_t o, const Epilogue<T>& e,
                       bool wide) {
  const T b = e.bias ? e.bias[o] : T(0);
  T* base = e.out + o * e.sC;
  int64_t row = q0 / e.in_w;
  int64_t col = q0 - row * e.in_w;
  int64_t i = 0;  // index into acc
  while (i < len) {
    const int64_t seg = std::min<int64_t>(len - i, e.in_w - col);  // rest of this row in the tile
    const int64_t valid = std::max<int64_t>(0, std::min(seg, e.out_w - col));
    T* dst = base + row * e.sH + col * e.sW;
    if (valid > 0) {
      if (e.sW == 1) {
        store_segment(acc + i, dst, valid, b, e.relu, wide);
      } else {
        for (int64_t c = 0; c < valid; ++c) {
          T v = acc[i + c] + b;
          if (e.relu && v < T(0)) v = T(0);
          dst[c * e.sW] = v;
        }
      }
    }
    i += seg;
    col = 0;
    ++row;
  }
}

// Rows [o0, o1) of a layer over q in [qa, qb): tiles outside, channels inside (the input tile
// stays in cache across channels).
template <typename T>
inline void spmm_rows(const Kernel<T>& k, int tile, const T* in, const Rows<T>& L, int64_t o0,
                      int64_t o1, int64_t qa, int64_t qb, const Epilogue<T>& e) {
  alignas(64) T acc[kMaxTile];
  // Balanced tiles: as few as `tile` allows, equal lengths rounded up to a vector (no short
  // tail tile that costs a full pass over the row's entries).
  const int64_t n = qb - qa;
  if (n <= 0) return;
  const int64_t ntiles = (n + tile - 1) / tile;
  const int64_t vec = std::max(1, k.tile / 8);
  const int64_t step = std::min<int64_t>(tile, ((n + ntiles - 1) / ntiles + vec - 1) / vec * vec);
  std::vector<T> part;
  for (int64_t q0 = qa; q0 < qb; q0 += step) {
    const int len = static_cast<int>(std::min<int64_t>(step, qb - q0));
    if (L.nch <= 1) {
      for (int64_t o = o0; o < o1; ++o) {
        const int64_t rs = L.row_start[o];
        k.fn(in + q0, L.gaps + rs, L.codes + rs, L.row_start[o + 1] - rs, -1, L.table, L.cb, len,
             acc, false);
        store_tile(acc, q0, len, o, e, k.wide);
      }
      continue;
    }
    // K-blocked: the input slab of one position chunk stays in L1 across all rows; partial tiles
    // of the rows accumulate in `part` (L2) across chunks.
    if (part.empty()) part.resize((o1 - o0) * static_cast<int64_t>(tile));
    const int64_t w = L.nch + 1;
    for (int64_t c = 0; c < L.nch; ++c) {
      const bool last = c == L.nch - 1;
      for (int64_t o = o0; o < o1; ++o) {
        const int64_t a = L.cs[o * w + c], b = L.cs[o * w + c + 1];
        T* p = part.data() + (o - o0) * tile;
        k.fn(in + q0, L.gaps + a, L.codes + a, b - a, L.ccur[o * w + c], L.table, L.cb, len, p,
             c > 0);
        if (last) store_tile(p, q0, len, o, e, k.wide);
      }
    }
  }
}

// Pixel tile length: the widest (<= k.tile, a multiple of a quarter of it) whose input slab
// (`planes` input rows of tile + halo elements, read once per output channel) stays in L1.
template <typename T>
inline int fit_tile(const Kernel<T>& k, int64_t planes, int64_t halo) {
  constexpr int64_t kL1Slab = 24 * 1024;  // of a 32 KB L1d
  const int step = std::max(1, k.tile / 4);
  int t = k.tile;
  while (t > step && planes * (t + halo) * static_cast<int64_t>(sizeof(T)) > kL1Slab) t -= step;
  // If not even the narrowest tile fits, the slab streams from L2 whatever the width: then take
  // the widest tile, which amortises the per-entry scalar work over the most vectors.
  if (planes * (t + halo) * static_cast<int64_t>(sizeof(T)) > kL1Slab) t = k.tile;
  return t;
}

// K-blocking choice: input channels per block, or `channels` for none. Measured (1 thread,
// AVX-512): blocking pays when it replaces a narrow tile (the slab of all channels only fits L1 at
// tile < k.tile: wide tile + 64-channel blocks, 55x55 squeezes 1.3-1.5x faster) or, when not even
// the narrowest tile fits, if rows hold >= 16 entries per block; it costs on small maps (13x13:
// 2 tiles, the per-(row, block) call overhead dominates), so it needs >= 4 full tiles of pixels.
template <typename T>
inline int64_t chunk_channels(const Kernel<T>& k, int64_t channels, int64_t phases, int64_t halo,
                              int64_t npix, int64_t entries, int64_t rows) {
  constexpr int64_t kBlockSlab = 32 * 1024;  // slab of one block at the full tile width
  const int64_t per_ch = phases * (k.tile + halo) * static_cast<int64_t>(sizeof(T));
  const int64_t cch = std::max<int64_t>(1, kBlockSlab / per_ch);
  if (cch >= channels || npix < 4 * static_cast<int64_t>(k.tile)) return channels;
  const bool narrow = fit_tile(k, channels * phases, halo) < k.tile;
  const int64_t nch = (channels + cch - 1) / cch;
  if (!narrow && entries < 16 * rows * nch) return channels;
  return cch;
}

// ---------------------------------------------------------------------------------------------
// Packing of an input band into a zero-padded, phase-split CHW buffer.
// x: one image, element strides (sC, sH, sW), C x H x W. The band starts at padded row `prow0`;
// buffer plane p = (py*sw + px) holds rows i in [0, plane_rows), columns j in [0, plane_w) of the
// padded input at padded row prow0 + i*sh + py and padded column j*sw + px.
// ---------------------------------------------------------------------------------------------
template <typename T>
inline void pack_band(const T* x, int64_t sC, int64_t sH, int64_t sW, int64_t C, int64_t H,
                      int64_t W, int64_t prow0, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                      int64_t plane_rows, int64_t plane_w, T* buf) {
  const int64_t plane = plane_rows * plane_w;
  for (int64_t py = 0; py < sh; ++py) {
    for (int64_t px = 0; px < sw; ++px) {
      T* phase = buf + (py * sw + px) * C * plane;
      // valid j: 0 <= j*sw + px - pw < W
      int64_t ja = 0;
      while (ja < plane_w && ja * sw + px - pw < 0) ++ja;
      int64_t jb = ja;
      while (jb < plane_w && jb * sw + px - pw < W) ++jb;
      const int64_t c0 = ja * sw + px - pw;
      if (sC == 1 && sW != 1) {
        // channels-last-like input: gather rows of pixels, channels innermost in the source.
        for (int64_t i = 0; i < plane_rows; ++i) {
          const int64_t r = prow0 + i * sh + py - ph;
          const bool rin = r >= 0 && r < H;
          for (int64_t ci = 0; ci < C; ++ci) {
            T* d = phase + ci * plane + i * plane_w;
            std::fill(d, d + ja, T(0));
            std::fill(d + jb, d + plane_w, T(0));
            if (!rin) std::fill(d + ja, d + jb, T(0));
          }
          if (!rin) continue;
          const T* srow = x + r * sH;
          for (int64_t j = ja; j < jb; ++j) {
            const T* s = srow + (c0 + (j - ja) * sw) * sW;
            T* d = phase + i * plane_w + j;
            for (int64_t ci = 0; ci < C; ++ci) d[ci * plane] = s[ci];
          }
        }
      } else {
        for (int64_t ci = 0; ci < C; ++ci) {
          for (int64_t i = 0; i < plane_rows; ++i) {
            T* d = phase + ci * plane + i * plane_w;
            const int64_t r = prow0 + i * sh + py - ph;
            if (r < 0 || r >= H) {
              std::fill(d, d + plane_w, T(0));
              continue;
            }
            std::fill(d, d + ja, T(0));
            std::fill(d + jb, d + plane_w, T(0));
            const T* s = x + ci * sC + r * sH + c0 * sW;
            if (sw == 1 && sW == 1) {
              std::memcpy(d + ja, s, sizeof(T) * (jb - ja));
            } else {
              const int64_t step = sw * sW;
              for (int64_t j = ja; j < jb; ++j) d[j] = s[(j - ja) * step];
            }
          }
        }
      }
    }
  }
}

// Conv geometry of codebook_conv2d / codebook_linear (linear = 1x1 conv over a 1 x M "image").
struct ConvGeom {
  int64_t N, C, H, W, O;
  int64_t kh, kw, sh, sw, ph, pw;
  int64_t Ho, Wo;
};

// The conv driver, for one dtype. x and out are described by element strides (any layout).
// Defined in codebook_conv.cpp for float and double.
template <typename T>
void conv_forward(const T* x, const int64_t* xs /*N,C,H,W strides*/, const ConvGeom& g,
                  const Stream& s, const T* cb, const T* bias, bool relu, T* out,
                  const int64_t* os /*N,O,Ho,Wo strides*/, const char* op);

}  // namespace codebook
}  // namespace sqz
