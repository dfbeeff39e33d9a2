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

// Whether the 32-bit element offsets of 16 pixels ss apart (pixel_offsets) fit, with room.
inline bool gather_offsets_fit(int64_t ss) { return ss < (int64_t(1) << 26); }

// Lane l = l * ss: the 32-bit element offsets of 16 pixels ss apart, for 16-lane gathers (15 * ss
// must fit 32 bits: gather_offsets_fit).
inline __m512i pixel_offsets(int64_t ss) {
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                            _mm512_set1_epi32(static_cast<int>(ss)));
}

// Permute indices of deinterleave_columns: for nc pixels' channels (2..4) and channel c, lane p
// takes element e = p * nc + c: lo = e mod 32 (from vectors 0-1), hi = (e - 32) mod 32 (vectors
// 2-3), and bit p of `upper` says which. Built once (a per-call build was most of a row's cost).
struct DeinterleaveTables {
  alignas(64) int32_t lo[3][4][16], hi[3][4][16];
  uint16_t upper[3][4];
  DeinterleaveTables() {
    for (int nc = 2; nc <= 4; ++nc)
      for (int c = 0; c < 4; ++c) {
        uint32_t m = 0;
        for (int p = 0; p < 16; ++p) {
          const int e = p * nc + c;
          lo[nc - 2][c][p] = e & 31;
          hi[nc - 2][c][p] = (e - 32) & 31;
          m |= static_cast<uint32_t>(e >= 32) << p;
        }
        upper[nc - 2][c] = static_cast<uint16_t>(m);
      }
  }
};

// gather_columns for pixels of exactly nc (2..4) channels each, densely packed (an RGB image in
// channels_last): 16 pixels are nc whole vectors, and channel c of them is picked out by two
// two-source permutes and a blend (lane p takes element p * nc + c; elements 0..31 come from
// vectors 0-1, 32..63 from vectors 2-3) instead of a 16-load gather. Reads only the np * nc floats
// from src.
inline void deinterleave_columns(const float* src, int64_t np, int64_t nc, float* dst, int64_t ds) {
  static const DeinterleaveTables t;
  __m512i lo[4], hi[4];
  __mmask16 upper[4];
  for (int64_t c = 0; c < nc; ++c) {
    lo[c] = _mm512_load_si512(t.lo[nc - 2][c]);
    hi[c] = _mm512_load_si512(t.hi[nc - 2][c]);
    upper[c] = static_cast<__mmask16>(t.upper[nc - 2][c]);
  }
  for (int64_t p0 = 0; p0 < np; p0 += 16) {
    const int64_t left = std::min<int64_t>(16, np - p0);
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    const float* s = src + p0 * nc;
    __m512 v[4];
    for (int64_t k = 0; k < 4; ++k) {  // floats [16 k, 16 k + 16) of the group, if it has them
      const int64_t have = std::max<int64_t>(0, std::min<int64_t>(16, left * nc - 16 * k));
      v[k] = have >= 16
                 ? _mm512_loadu_ps(s + 16 * k)
                 : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << have) - 1u), s + 16 * k);
    }
    for (int64_t c = 0; c < nc; ++c) {
      const __m512 a = _mm512_permutex2var_ps(v[0], lo[c], v[1]);
      const __m512 b = _mm512_permutex2var_ps(v[2], hi[c], v[3]);
      _mm512_mask_storeu_ps(dst + c * ds + p0, m, _mm512_mask_blend_ps(upper[c], a, b));
    }
  }
}

// dst[c * ds + p] = src[p * ss + c] for p < np, c < nc, by one 16-lane gather per channel and 16
// pixels: for inputs of a few channels (RGB), where a 16x16 transpose would spend 64 shuffles on
// 16 x nc values. The offsets p * ss must fit 32 bits (callers: ss is a small pixel stride).
inline void gather_columns(const float* src, int64_t ss, int64_t np, int64_t nc, float* dst,
                           int64_t ds) {
  if (ss == nc && nc >= 2 && nc <= 4) {  // dense pixels (deinterleave_columns)
    deinterleave_columns(src, np, nc, dst, ds);
    return;
  }
  const __m512i idx = pixel_offsets(ss);
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

// dst[c * ds + p] = src[p * ss + c] for p < np, c < nc: any sizes, in 16x16 tiles (reading a
// channels-last input: the packing of the codebook kernels and of FusedFire), each by the 64
// register shuffles of transpose16x16. Measured against the alternatives (1 thread, tiles in L1):
// two of the four stages by 128-bit loads + lane inserts (32 shuffles + 48 inserts) 27 ns a tile
// against 16 (the inserts seem to compete for the shuffle port); 48 shuffles + 16 256-bit inserts,
// or the first stage by 64-bit shifts and blends, 15-16 ns. Same-process A/B of the first against
// the shuffles, 2 threads: channels_last codebook squeezes 1.00-1.12x, codebook Fires 0.98-1.07x
// for the shuffles. A band whose buffer is in L2 is store-bound: 22 ns a tile, as a plain copy.
// (Those were one tile transposed over and over; a whole channels_last band, round 13's
// bench/transpose_micro.cpp: 20-21 ns a tile in L1, 31-36 ns in a 55x55 squeeze's geometry.)
inline void transpose_2d(const float* src, int64_t ss, int64_t np, int64_t nc, float* dst,
                         int64_t ds) {
  for (int64_t p0 = 0; p0 < np; p0 += 16) {
    const int rows = (int)std::min<int64_t>(16, np - p0);
    for (int64_t c0 = 0; c0 < nc; c0 += 16) {
      const int cols = (int)std::min<int64_t>(16, nc - c0);
      transpose_tile16(src + p0 * ss + c0, ss, rows, cols, dst + c0 * ds + p0, ds);
    }
  }
}

// transpose_2d for the channels with used[c] != 0 (the other channels' rows of dst may be left
// unwritten): a group of 16 channels with at most kGatherMaxUsed used ones is gathered channel by
// channel (one 16-lane gather per channel and 16 pixels), a fuller one transposed whole (its
// unused channels too), a group without used channels skipped. For a
// block-pruned squeeze at 10 % a third of the input channels are used; alone (1 thread, 128
// channels x 560 pixels into a buffer in L2): 44 used channels gathered 4.6 us, all transposed
// 8.5 us; break-even near 100 of 128. The offsets 15 * ss must fit 32 bits.
constexpr int kGatherMaxUsed = 8;

inline void transpose_2d_used(const float* src, int64_t ss, int64_t np, int64_t nc, float* dst,
                              int64_t ds, const uint8_t* used) {
  const __m512i idx = pixel_offsets(ss);
  // per group of 16 channels: 0 = skip, 1 = gather its used channels, 2 = transpose it whole
  uint8_t mode[64];
  int64_t g0 = 0;
  while (g0 < nc) {
    const int64_t g1 = std::min<int64_t>(nc, g0 + 64 * 16);  // 64 groups at a time
    for (int64_t c0 = g0; c0 < g1; c0 += 16) {
      int n = 0;
      for (int64_t c = c0; c < std::min<int64_t>(c0 + 16, nc); ++c) n += used[c] != 0;
      mode[(c0 - g0) / 16] = n == 0 ? 0 : n <= kGatherMaxUsed ? 1 : 2;
    }
    // Pixels outer, as transpose_2d: the source is read in order, 16 pixels at a time (channels
    // outer made every gather miss: 0.55-0.78x on block-pruned squeezes at 10 %).
    for (int64_t p0 = 0; p0 < np; p0 += 16) {
      const int rows = (int)std::min<int64_t>(16, np - p0);
      const __mmask16 m = rows >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rows) - 1u);
      for (int64_t c0 = g0; c0 < g1; c0 += 16) {
        const int md = mode[(c0 - g0) / 16];
        const int cols = (int)std::min<int64_t>(16, nc - c0);
        if (md == 2) {
          transpose_tile16(src + p0 * ss + c0, ss, rows, cols, dst + c0 * ds + p0, ds);
        } else if (md == 1) {
          for (int c = 0; c < cols; ++c)
            if (used[c0 + c])
              _mm512_mask_storeu_ps(dst + (c0 + c) * ds + p0, m,
                                    _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx,
                                                             src + p0 * ss + c0 + c, 4));
        }
      }
    }
    g0 = g1;
  }
}

}  // namespace sqz
#endif
