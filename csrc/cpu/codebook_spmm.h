// CPU building blocks of the sparse-codebook kernels (XNNPACK-style CHW SpMM), shared by
// codebook_conv.cpp, codebook_linear.cpp and codebook_fire.cpp.
//
// Data layout: a band of a layer's input is packed into an aligned CHW buffer (zero-padded, one
// copy per kernel column, one phase per row stride, see Layout), so every (ci, ky, kx) of a weight
// is one address offset and output pixel q (flattened over rows of the pitch) reads in[offset + q].
// A micro-kernel computes a tile of up to kMaxTile consecutive q for one output channel: per
// stored weight it broadcasts codebook[code] and multiply-adds the tile's vectors.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <memory>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "codebook.h"
#include "cpu/isa.h"
#include "cpu/fire_transpose.h"

namespace sqz {
namespace codebook {

using sqz::Isa;

// The instruction set of this call: the project-wide switch (torch.ops.sqz_kernels.set_cpu_isa),
// which never exceeds what this build compiled.
inline Isa active_isa() { return sqz::active_isa(); }

constexpr int kMaxTile = 256;

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

// p, computed into a register before use. The row kernels' multiply-adds take their input vector
// as a memory operand at p + 64 v; left to itself GCC folds p = in + 4 * tab[cursor] into an
// indexed operand (in, index, 4), and an FMA with an indexed memory operand is split into two
// micro-ops at issue on Intel cores, where [p + disp] stays one. Same-process A/B, 2 threads, 33 %
// unstructured: conv1 1.07-1.08x, fire2 1.03-1.10x, 27x27 / 13x13 Fires 0.99-1.05x.
__attribute__((always_inline)) inline const float* in_register(const float* p) {
#if defined(__GNUC__)
  asm("" : "+r"(p));
#endif
  return p;
}

// True if one of the 8 gap bytes packed in g8 is a filler (0xFF): the has-a-zero-byte test on ~g8.
// The row and quad kernels take 8 entries per step and leave such a group to their entry loops.
inline bool group_has_filler(uint64_t g8) {
  const uint64_t ng = ~g8;
  return ((ng - 0x0101010101010101ull) & ~ng & 0x8080808080808080ull) != 0;
}

#if defined(__AVX512F__)
// The sum of the 8 gap bytes packed in g8 (one SAD).
inline int64_t group_gap_sum(uint64_t g8) {
  return _mm_cvtsi128_si64(_mm_sad_epu8(_mm_cvtsi64_si128(static_cast<int64_t>(g8)), _mm_setzero_si128()));
}
#endif

// Where a finished tile goes when it is final (not a K-block partial): vector v of the tile, after
// + bias[o] and ReLU, is stored under mask[d][v] at base[d] + o * row_stride[d] + off[d][v] for each
// of the nd destinations (the Fire's squeeze writes its three column copies this way). Used by the
// AVX-512 float kernels; it saves the round trip through the accumulator buffer, whose masked
// stores would also block store-to-load forwarding in a separate epilogue.
template <typename T>
struct TileDst {
  static constexpr int kMax = 9;  // the Fire's squeeze read in place: 3 copies x 3 row pieces
  int nd = 0;
  T* base[kMax] = {};
  int64_t row_stride[kMax] = {};
  int64_t off[kMax][kMaxTile / 16] = {};
  uint16_t mask[kMax][kMaxTile / 16] = {};
  const T* bias = nullptr;
  bool relu = false;
};

// Result of walking (part of) a row: entries consumed and the cursor after the last of them.
struct Walk {
  int64_t n;
  int64_t cur;
};

// Every micro-kernel walks entries [0, cnt) from cursor cur0 and stops before the first entry
// whose cursor would reach `bound` (K-blocking: that entry belongs to the next block of input
// channels; unblocked calls pass kNoBound). Cursors only grow within a row, so a row is walked
// block by block with no per-call pre-pass over the stream.
constexpr int64_t kNoBound = std::numeric_limits<int64_t>::max();

// A micro-kernel (the signature every tile_* below has).
template <typename T>
using TileFn = Walk (*)(const T*, const uint8_t*, const uint8_t*, int64_t /*cnt*/, int64_t /*cur0*/,
                        int64_t /*bound*/, const int32_t*, const T*, int, T*, bool /*acc_in*/,
                        const TileDst<T>* /*td: null = write out*/, int64_t /*row*/);

template <typename T>
inline Walk tile_scalar(const T* in, const uint8_t* gp, const uint8_t* cp, int64_t cnt,
                        int64_t cur0, int64_t bound, const int32_t* tab, const T* cb, int len,
                        T* out, bool acc_in, const TileDst<T>* td, int64_t o) {
  T acc[kMaxTile];
  for (int q = 0; q < len; ++q) acc[q] = acc_in ? out[q] : T(0);
  int64_t cur = cur0, j = 0;
  for (; j < cnt; ++j) {
    const int64_t nc = advance(cur, gp[j]);
    if (nc >= bound) break;
    cur = nc;
    if (is_filler(gp[j])) continue;
    const T w = cb[cp[j]];
    const T* p = in + tab[cur];
    for (int q = 0; q < len; ++q) acc[q] += w * p[q];
  }
  for (int q = 0; q < len; ++q) out[q] = acc[q];
  (void)td;  // never given to this kernel (Kernel::direct is false)
  (void)o;
  return {j, cur};
}

// The stream walk shared by the two-accumulator-set kernels: entries two at a time (pair(j, c0,
// c1): entries j and j + 1 at cursors c0, c1), one at a time (one(j, c)) around fillers, at the end
// of the row and at the block bound. Returns where it stopped (see Walk / kNoBound).
template <typename One, typename Pair>
__attribute__((always_inline)) inline Walk walk_pairs(const uint8_t* gp, int64_t cnt, int64_t cur0,
                                                      int64_t bound, One one, Pair pair) {
  int64_t cur = cur0;
  int64_t j = 0;
  while (j < cnt) {
    const uint32_t g0 = gp[j];
    const uint32_t g1 = j + 1 < cnt ? gp[j + 1] : kFillerGap;
    const int64_t c0 = cur + g0 + 1;
    const int64_t c1 = c0 + g1 + 1;
    if (SQZ_UNLIKELY(g0 == kFillerGap || g1 == kFillerGap || c1 >= bound)) {
      const int64_t nc = advance(cur, static_cast<uint8_t>(g0));
      if (nc >= bound) break;
      cur = nc;
      if (g0 != kFillerGap) one(j, cur);
      j += 1;
      continue;
    }
    cur = c1;
    pair(j, c0, c1);
    j += 2;
  }
  return {j, cur};
}

// quads[g] != 0: rows 4g..4g+3 of a validated stream share their positions (equal counts, equal
// gap bytes) and hold at least min_entries (>= 1) entries each. O(E) byte compares per call.
inline std::vector<uint8_t> shared_quads(const uint8_t* gaps, const int64_t* row_start, int64_t O,
                                         int64_t min_entries = 1) {
  std::vector<uint8_t> q(static_cast<size_t>(O / 4), 0);
  for (int64_t g = 0; g < O / 4; ++g) {
    const int64_t o = 4 * g, n = row_start[o + 1] - row_start[o];
    bool same = n >= std::max<int64_t>(1, min_entries);
    for (int r = 1; r < 4 && same; ++r)
      same = row_start[o + r + 1] - row_start[o + r] == n &&
             std::memcmp(gaps + row_start[o], gaps + row_start[o + r], static_cast<size_t>(n)) == 0;
    q[g] = same;
  }
  return q;
}

// Row quads on (SQZ_QUADS=0 turns them off: A/B measurements).
inline bool quads_enabled() {
  const char* e = std::getenv("SQZ_QUADS");
  return !(e && e[0] == '0');
}

// Entries a row of a quad needs before the quad kernel pays: each chunk has a fixed cost
// (accumulators set up and stored, the stream walked once per chunk) that short rows do not
// amortise. Same-process A/B (quads on / off), SqueezeNet 1.1 layers, 1 thread: rows of 5.6
// entries (fire2.expand1x1) 0.97-1.00x, 9-11 entries (conv1, fire4.expand1x1) 1.04-1.07x,
// 16-21 entries 1.05-1.17x, 47 entries 1.37-1.45x. SQZ_QUAD_MIN_ENTRIES overrides it (tests force 1).
inline int64_t quad_min_entries() {
  const char* e = std::getenv("SQZ_QUAD_MIN_ENTRIES");
  return e ? std::max<int64_t>(1, std::atoll(e)) : 8;
}

// True if rows o..o+3 form a shared quad that lies inside [o, o1).
inline bool is_quad(const uint8_t* quads, int64_t o, int64_t o1) {
  return quads && (o & 3) == 0 && o + 4 <= o1 && quads[o >> 2];
}

// True if row o (of O) is one of rows 2-4 of a shared quad: it walks its quad's first row's
// positions, so passes over the positions of a layer skip it.
inline bool quad_follower(const uint8_t* quads, int64_t o, int64_t O) {
  return (o & 3) != 0 && is_quad(quads, o & ~int64_t(3), O);
}

#if defined(__AVX512F__)
// Final tile -> its destinations (see TileDst). max(0, NaN) keeps the NaN, like torch.relu.
// Vector v of the tile is vector v0 + v of the TileDst (a quad chunk starts at v0 > 0).
template <int NV>
__attribute__((always_inline)) inline void store_direct(__m512 (&r)[NV], const TileDst<float>* td,
                                                        int64_t o, int v0 = 0) {
  const __m512 vb = _mm512_set1_ps(td->bias ? td->bias[o] : 0.f);
  const __m512 z = _mm512_setzero_ps();
  for (int v = 0; v < NV; ++v) {
    r[v] = _mm512_add_ps(r[v], vb);
    if (td->relu) r[v] = _mm512_max_ps(z, r[v]);
  }
  for (int d = 0; d < td->nd; ++d) {
    float* p = td->base[d] + o * td->row_stride[d];
    for (int v = 0; v < NV; ++v)
      _mm512_mask_storeu_ps(p + td->off[d][v0 + v], td->mask[d][v0 + v], r[v]);
  }
}

template <int NV, bool FULL>
__attribute__((always_inline)) inline void finish_avx512(__m512 (&a)[NV], const __mmask16 (&m)[NV],
                                                         float* out, const TileDst<float>* td,
                                                         int64_t o) {
  if (td) return store_direct<NV>(a, td, o);
  for (int v = 0; v < NV; ++v) {
    if (FULL) {
      _mm512_storeu_ps(out + 16 * v, a[v]);  // unmasked: a later load can be store-forwarded
    } else {
      _mm512_mask_storeu_ps(out + 16 * v, m[v], a[v]);
    }
  }
}

// Narrow tiles (<= 64 pixels): two entries per iteration into two accumulator sets, so there are
// 2 * NV independent FMA chains.
template <int NV, bool FULL>
inline Walk tile_avx512_n(const float* in, const uint8_t* gp, const uint8_t* cp, int64_t cnt,
                          int64_t cur0, int64_t bound, const int32_t* tab, const float* cb,
                          int len, float* out, bool acc_in, const TileDst<float>* td, int64_t o) {
  __m512 a[NV], b[NV];
  __mmask16 m[NV];
  for (int v = 0; v < NV; ++v) {
    const int lanes = std::min(16, std::max(0, len - 16 * v));
    m[v] = lanes >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << lanes) - 1u);
    // One zero-masked load for both cases: a `? setzero :` select makes GCC zero the array with
    // 32-byte stores and reload it with 64-byte loads, a store-forwarding stall per vector.
    a[v] = _mm512_maskz_loadu_ps(acc_in ? m[v] : __mmask16(0), out + 16 * v);
    b[v] = _mm512_setzero_ps();
  }
#define SQZ_LD512(p, v) (FULL ? _mm512_loadu_ps((p) + 16 * (v)) : _mm512_maskz_loadu_ps(m[v], (p) + 16 * (v)))
  const Walk w = walk_pairs(
      gp, cnt, cur0, bound,
      [&](int64_t j, int64_t c) {
        const float* p0 = in_register(in + tab[c]);
        const __m512 w0 = _mm512_set1_ps(cb[cp[j]]);
        for (int v = 0; v < NV; ++v) a[v] = _mm512_fmadd_ps(w0, SQZ_LD512(p0, v), a[v]);
      },
      [&](int64_t j, int64_t c0, int64_t c1) {
        const float* p0 = in_register(in + tab[c0]);
        const float* p1 = in_register(in + tab[c1]);
        const __m512 w0 = _mm512_set1_ps(cb[cp[j]]);
        const __m512 w1 = _mm512_set1_ps(cb[cp[j + 1]]);
        for (int v = 0; v < NV; ++v) {
          a[v] = _mm512_fmadd_ps(w0, SQZ_LD512(p0, v), a[v]);
          b[v] = _mm512_fmadd_ps(w1, SQZ_LD512(p1, v), b[v]);
        }
      });
#undef SQZ_LD512
  for (int v = 0; v < NV; ++v) a[v] = _mm512_add_ps(a[v], b[v]);
  finish_avx512<NV, FULL>(a, m, out, td, o);
  return w;
}

// Wide tiles (65..256 pixels): 5..16 accumulators are enough independent FMA chains, so one
// entry per iteration; the per-entry scalar work (gap, code, offset, broadcast) is amortised over
// up to 16 vectors (16 accumulators + the broadcast weight fit the 32 zmm registers).
template <int NV, bool FULL>
inline Walk tile_avx512_wide(const float* in, const uint8_t* gp, const uint8_t* cp, int64_t cnt,
                             int64_t cur0, int64_t bound, const int32_t* tab, const float* cb,
                             int len, float* out, bool acc_in, const TileDst<float>* td,
                             int64_t o) {
  __m512 a[NV];
  __mmask16 m[NV];
  for (int v = 0; v < NV; ++v) {
    const int lanes = std::min(16, std::max(0, len - 16 * v));
    m[v] = lanes >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << lanes) - 1u);
    a[v] = _mm512_maskz_loadu_ps(acc_in ? m[v] : __mmask16(0), out + 16 * v);  // see above
  }
  // One stored position (input offset `at`) with its code: NV input loads and multiply-adds.
  auto entry = [&](int32_t at, uint32_t code) __attribute__((always_inline)) {
    const float* p0 = in_register(in + at);
    const __m512 w0 = _mm512_set1_ps(cb[code]);
    for (int v = 0; v < NV; ++v) {
      const __m512 x0 = FULL ? _mm512_loadu_ps(p0 + 16 * v) : _mm512_maskz_loadu_ps(m[v], p0 + 16 * v);
      a[v] = _mm512_fmadd_ps(w0, x0, a[v]);
    }
  };
  int64_t cur = cur0;
  int64_t j = 0;
  // 8 entries per step: gaps and codes arrive as one 8-byte load each and are shifted out, so an
  // entry costs two scalar loads (its table offset and its broadcast weight) instead of four. A
  // group holding a filler, or (K-blocking) one whose last cursor reaches the bound, is left to
  // the entry loop below.
  for (; j + 8 <= cnt; j += 8) {
    uint64_t g8, c8;
    std::memcpy(&g8, gp + j, 8);
    if (SQZ_UNLIKELY(group_has_filler(g8))) break;
    if (bound != kNoBound && cur + 8 + group_gap_sum(g8) >= bound) break;
    std::memcpy(&c8, cp + j, 8);
    for (int u = 0; u < 8; ++u) {
      cur += static_cast<int64_t>(g8 & 0xFF) + 1;
      g8 >>= 8;
      entry(tab[cur], c8 & 0xFF);
      c8 >>= 8;
    }
  }
  for (; j < cnt; ++j) {
    const uint32_t g0 = gp[j];
    const int64_t nc = g0 == kFillerGap ? cur + kFillerGap : cur + g0 + 1;
    if (SQZ_UNLIKELY(nc >= bound)) break;
    cur = nc;
    if (SQZ_UNLIKELY(g0 == kFillerGap)) continue;
    entry(tab[cur], cp[j]);
  }
  finish_avx512<NV, FULL>(a, m, out, td, o);
  return {j, cur};
}

#define SQZ_TILE_ARGS in, gp, cp, cnt, cur0, bound, tab, cb, len, out, acc_in, td, o
// A tile of NV whole vectors: two accumulator sets up to 4 vectors, one entry per iteration above.
template <int NV>
__attribute__((always_inline)) inline Walk tile_avx512_full(
    const float* in, const uint8_t* gp, const uint8_t* cp, int64_t cnt, int64_t cur0, int64_t bound,
    const int32_t* tab, const float* cb, int len, float* out, bool acc_in, const TileDst<float>* td,
    int64_t o) {
  if constexpr (NV >= 5) {
    return tile_avx512_wide<NV, true>(SQZ_TILE_ARGS);
  } else {
    return tile_avx512_n<NV, true>(SQZ_TILE_ARGS);
  }
}

// The entry of a table of kernels indexed by whole vectors (t[len / 16 - 1]) for a tile of len
// pixels, or null when len is not 1..N whole vectors.
template <class Fn, std::size_t N>
inline Fn by_vectors(const std::array<Fn, N>& t, int len) {
  return len % 16 == 0 && len >= 16 && len / 16 <= static_cast<int>(N) ? t[len / 16 - 1] : nullptr;
}

template <std::size_t... I>
constexpr std::array<TileFn<float>, sizeof...(I)> full_tile_table(std::index_sequence<I...>) {
  return {{&tile_avx512_full<static_cast<int>(I) + 1>...}};
}

inline Walk tile_avx512(const float* in, const uint8_t* gp, const uint8_t* cp, int64_t cnt,
                        int64_t cur0, int64_t bound, const int32_t* tab, const float* cb, int len,
                        float* out, bool acc_in, const TileDst<float>* td, int64_t o) {
  static constexpr auto full = full_tile_table(std::make_index_sequence<kMaxTile / 16>());
  if (const TileFn<float> f = by_vectors(full, len)) return f(SQZ_TILE_ARGS);  // aligned layouts
  if (len > 128) return tile_avx512_wide<16, false>(SQZ_TILE_ARGS);  // not made by the layouts
  if (len > 112) return tile_avx512_wide<8, false>(SQZ_TILE_ARGS);
  if (len > 96) return tile_avx512_wide<7, false>(SQZ_TILE_ARGS);
  if (len > 80) return tile_avx512_wide<6, false>(SQZ_TILE_ARGS);
  if (len > 64) return tile_avx512_wide<5, false>(SQZ_TILE_ARGS);
  if (len > 48) return tile_avx512_n<4, false>(SQZ_TILE_ARGS);
  if (len > 32) return tile_avx512_n<3, false>(SQZ_TILE_ARGS);
  if (len > 16) return tile_avx512_n<2, false>(SQZ_TILE_ARGS);
  return tile_avx512_n<1, false>(SQZ_TILE_ARGS);
}

// ---------------------------------------------------------------------------------------------
// Row quads. A block-pruned layer (compress(..., block=4)) keeps the same weight positions in the
// four rows 4g..4g+3: equal row_counts and byte-equal gap streams, only the codes differ. The
// unstructured kernel loads one input vector per multiply-add, and that load (an L2 -> L1 line) is
// what bounds it (docs/codebook_kernels.md); on a quad one load feeds four multiply-adds, one per
// row. The format is unchanged: quads are found per call by comparing the rows' streams
// (shared_quads), so any stream stays valid and rows that do not share a pattern run the row kernel.
// ---------------------------------------------------------------------------------------------
// Most vectors of a tile one quad chunk computes (see quad_chunk).
constexpr int kQuadChunk = 7;

// Where a quad's four finished tiles go: the TileDst (final, direct) or rows out + r * ld.
struct QuadOut {
  const TileDst<float>* td;
  float* out;
  int64_t ld;
};

// Vectors [v0, v0 + NV) of a tile for rows o..o+3: 4 * NV accumulators + 4 broadcast weights,
// NV <= kQuadChunk = 7: 28 + 4 = all 32 zmm registers, the input vectors being FMA memory
// operands. Chunks of 7 instead of 6 let a 7-vector tile (the 7-row band of a 13x13 Fire) walk
// its stream once instead of twice (4 + 3) and a 13- or 14-vector tile twice instead of three
// times: same-process A/B, 2 threads, block-4 33 %: 13x13 Fires 1.11-1.13x, 27x27 Fires 1.07x,
// conv1 1.07x, 55x55 Fires 1.00-1.04x. Inlined into the rows loop: as a called
// function its fixed cost per call made quads of short rows (conv1: 9 entries) 15-18 % slower
// than the row kernel; inlined they are even (A/B of the two builds, 1 thread).
template <int NV>
__attribute__((always_inline)) inline void quad_chunk(const float* in, const uint8_t* gp,
                                                      const uint8_t* codes, const int64_t* row_start,
                                                      int64_t cnt, const int32_t* tab, const float* cb,
                                                      int v0, int64_t o, const QuadOut& qo) {
  static_assert(NV >= 1 && NV <= kQuadChunk, "4 x NV accumulators must fit the registers");
  const uint8_t* c0 = codes + row_start[o];
  const uint8_t* c1 = codes + row_start[o + 1];
  const uint8_t* c2 = codes + row_start[o + 2];
  const uint8_t* c3 = codes + row_start[o + 3];
  // GCC may keep these arrays on the stack outside the loop. Zeroed with setzero it filled them
  // with 32-byte stores that the 64-byte reloads can not forward from (~20 stalls per call, ~20 %
  // of the samples on short streams when this was a called function); a zero GCC can not prove
  // (mask = cnt >> 63, always 0 for a count) is stored as whole vectors instead.
  const __mmask16 k0 = static_cast<__mmask16>(static_cast<uint64_t>(cnt) >> 63);
  const __m512 zero = _mm512_maskz_mov_ps(k0, _mm512_set1_ps(1.f));
  __m512 a0[NV], a1[NV], a2[NV], a3[NV];
  for (int v = 0; v < NV; ++v) a0[v] = a1[v] = a2[v] = a3[v] = zero;
  in += 16 * v0;
  // One stored position (input offset `at`) with the four rows' codes: NV input loads, 4 * NV
  // multiply-adds.
  auto entry = [&](int32_t at, uint32_t k0, uint32_t k1, uint32_t k2, uint32_t k3)
                   __attribute__((always_inline)) {
    const float* p = in_register(in + at);
    const __m512 w0 = _mm512_set1_ps(cb[k0]), w1 = _mm512_set1_ps(cb[k1]);
    const __m512 w2 = _mm512_set1_ps(cb[k2]), w3 = _mm512_set1_ps(cb[k3]);
    for (int v = 0; v < NV; ++v) {
      const __m512 x = _mm512_loadu_ps(p + 16 * v);
      a0[v] = _mm512_fmadd_ps(w0, x, a0[v]);
      a1[v] = _mm512_fmadd_ps(w1, x, a1[v]);
      a2[v] = _mm512_fmadd_ps(w2, x, a2[v]);
      a3[v] = _mm512_fmadd_ps(w3, x, a3[v]);
    }
  };
  int64_t cur = -1;
  int64_t j = 0;
  // 8 entries per step, as in tile_avx512_wide: the gaps and each row's codes as one 8-byte load
  // each (5 loads per 8 entries instead of 40); a group with a filler goes to the loop below.
  for (; j + 8 <= cnt; j += 8) {
    uint64_t g8;
    std::memcpy(&g8, gp + j, 8);
    if (SQZ_UNLIKELY(group_has_filler(g8))) break;
    uint64_t q0, q1, q2, q3;
    std::memcpy(&q0, c0 + j, 8);
    std::memcpy(&q1, c1 + j, 8);
    std::memcpy(&q2, c2 + j, 8);
    std::memcpy(&q3, c3 + j, 8);
    for (int u = 0; u < 8; ++u) {
      cur += static_cast<int64_t>(g8 & 0xFF) + 1;
      g8 >>= 8;
      entry(tab[cur], q0 & 0xFF, q1 & 0xFF, q2 & 0xFF, q3 & 0xFF);
      q0 >>= 8, q1 >>= 8, q2 >>= 8, q3 >>= 8;
    }
  }
  for (; j < cnt; ++j) {
    const uint32_t g = gp[j];
    if (SQZ_UNLIKELY(g == kFillerGap)) {
      cur += kFillerGap;
      continue;
    }
    cur += g + 1;
    entry(tab[cur], c0[j], c1[j], c2[j], c3[j]);
  }
  if (qo.td) {
    store_direct<NV>(a0, qo.td, o, v0);
    store_direct<NV>(a1, qo.td, o + 1, v0);
    store_direct<NV>(a2, qo.td, o + 2, v0);
    store_direct<NV>(a3, qo.td, o + 3, v0);
    return;
  }
  float* p = qo.out + 16 * v0;
  for (int v = 0; v < NV; ++v) {
    _mm512_storeu_ps(p + 16 * v, a0[v]);
    _mm512_storeu_ps(p + qo.ld + 16 * v, a1[v]);
    _mm512_storeu_ps(p + 2 * qo.ld + 16 * v, a2[v]);
    _mm512_storeu_ps(p + 3 * qo.ld + 16 * v, a3[v]);
  }
}

// A whole-vector tile of NV vectors for quad o..o+3, in chunks of <= kQuadChunk vectors of
// near-equal size (16 -> 6 + 5 + 5, 13 -> 7 + 6, 7 -> 7): each chunk walks the quad's stream once.
template <int NV, int V0 = 0>
__attribute__((always_inline)) inline void quad_tile(const float* in, const uint8_t* gp,
                                                     const uint8_t* codes, const int64_t* row_start,
                                                     int64_t cnt, const int32_t* tab, const float* cb,
                                                     int64_t o, const QuadOut& qo) {
  constexpr int left = NV - V0;
  if constexpr (left > 0) {
    constexpr int chunks = (left + kQuadChunk - 1) / kQuadChunk;
    constexpr int c = (left + chunks - 1) / chunks;
    quad_chunk<c>(in, gp, codes, row_start, cnt, tab, cb, V0, o, qo);
    quad_tile<NV, V0 + c>(in, gp, codes, row_start, cnt, tab, cb, o, qo);
  }
}

// All rows [o0, o1) of one whole-vector tile: one call per tile instead of two (dispatch + kernel)
// per row, with the tile kernel inlined into the row loop. Layers with few entries per row (conv1:
// 9 at 33 % density, 3 at 10 %; small 1x1 expands) spent as much time in the per-row calls as in
// the multiply-adds. Finished tiles are stored by the kernel through td, or (td null: channels-
// last outputs, transposed afterwards) left raw in rows part + (o - o0) * ld. Shared quads (may be
// null) run the quad kernel.
template <int NV>
__attribute__((noinline)) void rows_avx512_t(const float* in, const uint8_t* gaps, const uint8_t* codes,
                                            const int64_t* row_start, const int32_t* tab,
                                            const float* cb, int64_t o0, int64_t o1,
                                            const TileDst<float>* td, const uint8_t* quads,
                                            float* part, int64_t ld) {
  for (int64_t o = o0; o < o1;) {
    const int64_t rs = row_start[o];
    float* p = td ? nullptr : part + (o - o0) * ld;
    if (is_quad(quads, o, o1)) {
      quad_tile<NV>(in, gaps + rs, codes, row_start, row_start[o + 1] - rs, tab, cb, o,
                    QuadOut{td, p, ld});
      o += 4;
      continue;
    }
    tile_avx512_full<NV>(in, gaps + rs, codes + rs, row_start[o + 1] - rs, -1, kNoBound, tab, cb,
                         16 * NV, p, false, td, o);
    ++o;
  }
}

using RowsFn = void (*)(const float*, const uint8_t*, const uint8_t*, const int64_t*, const int32_t*,
                        const float*, int64_t, int64_t, const TileDst<float>*, const uint8_t*, float*,
                        int64_t);

template <std::size_t... I>
constexpr std::array<RowsFn, sizeof...(I)> rows_table(std::index_sequence<I...>) {
  return {{&rows_avx512_t<static_cast<int>(I) + 1>...}};
}

// The rows kernel for a tile of len pixels (a multiple of 16, <= kMaxTile).
inline RowsFn rows_avx512(int len) {
  static constexpr auto fns = rows_table(std::make_index_sequence<kMaxTile / 16>());
  return by_vectors(fns, len);
}

// One K-block of rows [o0, o1) of one whole-vector tile (K-blocked layers, rows without quads):
// each row resumes its walk (walk[o - o0]) up to `bound`, its partial tile in part + (o - o0) * ld
// (read back when acc_in); the last block stores final tiles through td when given. `flatten`
// inlines the tile kernel into the row loop: GCC kept tile_avx512_wide<NV> a called function, and
// inlined the kernel was 1.03-1.15x on the unstructured Fires, 1.03-1.09x on the 3x3 expands and
// 1.14-1.16x on the classifier (same-process A/B, two runs, 2 threads, 33 %; flattening
// rows_avx512_t as well changed nothing measurable).
template <int NV>
__attribute__((noinline, flatten)) void rows_kb_avx512_t(const float* in, const uint8_t* gaps,
                                               const uint8_t* codes, const int64_t* row_start,
                                               const int32_t* tab, const float* cb, int64_t o0,
                                               int64_t o1, const TileDst<float>* td, Walk* walk,
                                               int64_t bound, bool acc_in, float* part, int64_t ld) {
  for (int64_t o = o0; o < o1; ++o) {
    Walk& wk = walk[o - o0];
    const Walk r = tile_avx512_full<NV>(in, gaps + wk.n, codes + wk.n, row_start[o + 1] - wk.n,
                                        wk.cur, bound, tab, cb, 16 * NV, part + (o - o0) * ld,
                                        acc_in, td, o);
    wk = {wk.n + r.n, r.cur};
  }
}

using RowsKbFn = void (*)(const float*, const uint8_t*, const uint8_t*, const int64_t*,
                          const int32_t*, const float*, int64_t, int64_t, const TileDst<float>*,
                          Walk*, int64_t, bool, float*, int64_t);

template <std::size_t... I>
constexpr std::array<RowsKbFn, sizeof...(I)> rows_kb_table(std::index_sequence<I...>) {
  return {{&rows_kb_avx512_t<static_cast<int>(I) + 1>...}};
}

// The K-blocked rows kernel for a tile of len pixels (a multiple of 16, <= kMaxTile).
inline RowsKbFn rows_kb_avx512(int len) {
  static constexpr auto fns = rows_kb_table(std::make_index_sequence<kMaxTile / 16>());
  return by_vectors(fns, len);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
template <int NV, bool FULL>
inline Walk tile_avx2_n(const float* in, const uint8_t* gp, const uint8_t* cp, int64_t cnt,
                        int64_t cur0, int64_t bound, const int32_t* tab, const float* cb, int len,
                        float* out, bool acc_in, const TileDst<float>* td, int64_t o) {
  __m256 a[NV], b[NV];
  __m256i m[NV];
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int v = 0; v < NV; ++v) {
    m[v] = _mm256_cmpgt_epi32(_mm256_set1_epi32(len - 8 * v), iota);
    a[v] = acc_in ? _mm256_maskload_ps(out + 8 * v, m[v]) : _mm256_setzero_ps();
    b[v] = _mm256_setzero_ps();
  }
#define SQZ_LD256(p, v) (FULL ? _mm256_loadu_ps((p) + 8 * (v)) : _mm256_maskload_ps((p) + 8 * (v), m[v]))
  const Walk w = walk_pairs(
      gp, cnt, cur0, bound,
      [&](int64_t j, int64_t c) {
        const float* p0 = in + tab[c];
        const __m256 w0 = _mm256_broadcast_ss(cb + cp[j]);
        for (int v = 0; v < NV; ++v) a[v] = _mm256_fmadd_ps(w0, SQZ_LD256(p0, v), a[v]);
      },
      [&](int64_t j, int64_t c0, int64_t c1) {
        const float* p0 = in + tab[c0];
        const float* p1 = in + tab[c1];
        const __m256 w0 = _mm256_broadcast_ss(cb + cp[j]);
        const __m256 w1 = _mm256_broadcast_ss(cb + cp[j + 1]);
        for (int v = 0; v < NV; ++v) {
          a[v] = _mm256_fmadd_ps(w0, SQZ_LD256(p0, v), a[v]);
          b[v] = _mm256_fmadd_ps(w1, SQZ_LD256(p1, v), b[v]);
        }
      });
#undef SQZ_LD256
  for (int v = 0; v < NV; ++v) _mm256_maskstore_ps(out + 8 * v, m[v], _mm256_add_ps(a[v], b[v]));
  (void)td;  // never given to this kernel (Kernel::direct is false)
  (void)o;
  return w;
}

inline Walk tile_avx2(const float* in, const uint8_t* gp, const uint8_t* cp, int64_t cnt,
                      int64_t cur0, int64_t bound, const int32_t* tab, const float* cb, int len,
                      float* out, bool acc_in, const TileDst<float>* td, int64_t o) {
  if (len == 32) return tile_avx2_n<4, true>(SQZ_TILE_ARGS);
  if (len == 16) return tile_avx2_n<2, true>(SQZ_TILE_ARGS);
  if (len > 24) return tile_avx2_n<4, false>(SQZ_TILE_ARGS);
  if (len > 16) return tile_avx2_n<3, false>(SQZ_TILE_ARGS);
  if (len > 8) return tile_avx2_n<2, false>(SQZ_TILE_ARGS);
  return tile_avx2_n<1, false>(SQZ_TILE_ARGS);
}
#endif
#undef SQZ_TILE_ARGS

// One validated layer as the micro-kernels read it.
template <typename T>
struct Rows {
  const uint8_t* gaps;
  const uint8_t* codes;
  const int64_t* row_start;  // [O + 1]
  const int32_t* table;      // [K]: weight position -> input address offset
  const T* cb;
  // K-blocking (optional): rows are walked in blocks of `block_pos` weight positions (a block of
  // input channels), nblocks in all; 0 = one block.
  int64_t block_pos = 0;
  int64_t nblocks = 1;
  // Shared row quads (see shared_quads), or null: only the AVX-512 float kernels read it.
  const uint8_t* quads = nullptr;
};

template <typename T>
struct Kernel {
  TileFn<T> fn;
  int tile;
  bool wide;    // AVX-512 epilogue
  bool direct;  // takes a TileDst (stores final tiles itself)
};

template <typename T>
inline Kernel<T> select_kernel(Isa) {
  return {&tile_scalar<T>, 16, false, false};
}

template <>
inline Kernel<float> select_kernel<float>(Isa isa) {
#if defined(__AVX512F__)
  if (isa == Isa::Avx512) return {&tile_avx512, 256, true, true};
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (isa == Isa::Avx2 || isa == Isa::Avx512) return {&tile_avx2, 32, false, false};
#endif
  (void)isa;
  return {&tile_scalar<float>, 16, false, false};
}

// Sets L.quads for the AVX-512 float kernels when at least one quad of the O rows shares its
// pattern (unstructured layers keep null and pay nothing per row); `keep` owns the flags.
template <typename T>
inline void find_quads(Rows<T>& L, int64_t O, const Kernel<T>& k, std::vector<uint8_t>& keep) {
  if (!std::is_same<T, float>::value || !k.wide || !quads_enabled()) return;
  keep = shared_quads(L.gaps, L.row_start, O, quad_min_entries());
  if (std::find(keep.begin(), keep.end(), uint8_t(1)) != keep.end()) L.quads = keep.data();
}

// Input vector loads the row kernels make per pixel tile of a layer: one per entry, but a row
// quad (rows sharing one pattern, walked together) loads each of its positions once for 4 rows.
template <typename T>
double vector_loads(const Rows<T>& L, int64_t O) {
  double n = 0;
  for (int64_t o = 0; o < O; ++o)
    if (!quad_follower(L.quads, o, O))
      n += static_cast<double>(L.row_start[o + 1] - L.row_start[o]);
  return n;
}

// For a channels-last input on the AVX-512 float path, the input channels some entry of the O
// rows reaches (positions ci * taps + t), for pack_band to transpose only those; null (pack all)
// when the layer loads each input vector more than 1.5 times on average (vector_loads), where
// nearly every channel is used, and for other ISAs. A block-pruned squeeze at 10 % uses about a
// third of its channels (1 - 0.9^4), an unstructured one 80 % (1 - 0.9^16). Same-process A/B, 2
// threads, block-pruned SqueezeNet 1.1 at 10 %, channels_last: squeezes of 55x55 maps 1.13-1.17x,
// 27x27 1.07-1.08x, the Fires 1.02-1.12x; 13x13 maps 0.96-0.99x, so also null for maps
// (`pixels` = H * W of the input) of fewer than 256 pixels. SqueezeNet's layers at 33 % and its
// unstructured 10 % layers load more than 1.5 times per channel and keep null; a layer of few
// rows at 10 % may not.
template <typename T>
const uint8_t* used_channels(const Rows<T>& L, int64_t O, int64_t C, int64_t taps,
                             const Kernel<T>& k, bool channels_last, int64_t pixels,
                             std::vector<uint8_t>& keep) {
  if (!std::is_same<T, float>::value || !k.wide || !channels_last || pixels < 256 || C <= 4 ||
      vector_loads(L, O) > 1.5 * static_cast<double>(C))
    return nullptr;
  keep.assign(static_cast<size_t>(C), 0);
  for (int64_t o = 0; o < O; ++o) {
    if (quad_follower(L.quads, o, O)) continue;
    int64_t cursor = -1;
    for (int64_t e = L.row_start[o]; e < L.row_start[o + 1]; ++e) {
      cursor = advance(cursor, L.gaps[e]);
      // (no 64-bit division per entry for 1x1 layers: ~30 cycles, 0.78x on 13x13 squeezes)
      if (!is_filler(L.gaps[e])) keep[static_cast<size_t>(taps == 1 ? cursor : cursor / taps)] = 1;
    }
  }
  return keep.data();
}

// For reading x in place (see readable_elems): L with positions c -> c * cs (x's channel
// offsets), same streams, blocks and quads. `table` owns the offsets; when !in_place it stays
// empty and the copy keeps L's table (unused).
template <typename T>
Rows<T> channel_offset_rows(const Rows<T>& L, int64_t C, int64_t cs, bool in_place,
                            std::vector<int32_t>& table) {
  table.assign(in_place ? static_cast<size_t>(C) : 0, 0);
  for (int64_t c = 0; c < static_cast<int64_t>(table.size()); ++c)
    table[static_cast<size_t>(c)] = static_cast<int32_t>(c * cs);
  Rows<T> r = L;
  if (in_place) r.table = table.data();
  return r;
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

// ---------------------------------------------------------------------------------------------
// Aligned band layout. Every vector the micro-kernels load is whole and 64-byte aligned: rows of a
// plane have a pitch that is a multiple of kVec, pixel tiles start at multiples of kVec, and a
// kh x kw conv keeps one copy of the band per kernel column kx (copy kx, column j = padded input
// column j*sw + kx), so no tap is shifted by a fraction of a vector. Measured with a stand-alone
// micro-benchmark (1 thread, AVX-512, 4-vector tiles): 77 GFLOP/s with aligned loads vs 48 with
// unaligned ones when the input slab is in L1; 37 vs 22 when the slab is 64 KB (hence K-blocking).
// Buffer of one band: [kx < kw][phase py < sh][ci < C][plane_rows][pitch].
// ---------------------------------------------------------------------------------------------
constexpr int64_t kVec = 16;  // elements

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Reading a 1x1 layer's input x in place (codebook_conv2d's flat squeezes, the Fire's squeeze):
// a band is one run of npix pixels per channel, channel c at c * cs from the run's start, and the
// kernels read each run rounded up to whole vectors.
// Elements of x's storage readable from x's first element.
inline int64_t readable_elems(const at::Tensor& x) {
  return static_cast<int64_t>(x.storage().nbytes()) / static_cast<int64_t>(x.element_size()) -
         x.storage_offset();
}

// Whether C channels cs apart, plus the pixels of a map of `pixels` (and a vector's rounding),
// stay within the int32 address offsets of the tables.
inline bool channel_offsets_fit(int64_t C, int64_t cs, int64_t pixels) {
  return (C - 1) * cs + pixels + kVec < std::numeric_limits<int32_t>::max();
}

// Whether the rounded-up runs of a band at x + x0 stay inside the `readable` elements; a band
// that would pass the end of x's storage is packed instead.
inline bool runs_readable(int64_t x0, int64_t C, int64_t cs, int64_t npix, int64_t readable) {
  return x0 + (C - 1) * cs + round_up(npix, kVec) <= readable;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether a map with channel stride sC and pixel stride sW is pixel-major (channels_last, or a
// channels_last view whose pixels are more than C apart): its channel vectors must be transposed
// into CHW rows. A 1-pixel-wide map (sW == 1 == sC) reads as CHW.
inline bool pixel_major(int64_t sC, int64_t sW) { return sC == 1 && sW != 1; }

struct Layout {
  int64_t sh = 1;            // stride of the rows (phases)
  int64_t pitch = 0;         // elements per plane row: a multiple of kVec, >= output columns
  int64_t plane_rows = 0;    // band rows + (kh - 1) / sh
  int64_t plane = 0;         // pitch * plane_rows
  int64_t phase_stride = 0;  // C * plane
  int64_t copy_stride = 0;   // sh * C * plane
  int64_t elems = 0;         // kw * copy_stride

  // Address offset of weight (ci, ky, kx): output pixel (oy, ox) of the band reads
  // buf[offset + oy * pitch + ox] for every tap alike.
  int64_t offset(int64_t ci, int64_t ky, int64_t kx) const {
    return kx * copy_stride + (ky % sh) * phase_stride + ci * plane + (ky / sh) * pitch;
  }

  // tab[(ci * kh + ky) * kw + kx] = offset(ci, ky, kx) (a weight row's (ci, ky, kx) order) for all
  // ci < C: one division per tap, not per position (a 64-bit idiv per channel was half of the
  // per-call setup of a 13x13 1x1 layer, and a 3x3 layer has 9x the positions). The caller has
  // checked that elems fits int32.
  void fill_offsets(int32_t* tab, int64_t C, int64_t kh, int64_t kw) const {
    const int64_t taps = kh * kw;
    for (int64_t ky = 0; ky < kh; ++ky)
      for (int64_t kx = 0; kx < kw; ++kx) {
        const int64_t tap = offset(0, ky, kx);
        int32_t* t = tab + ky * kw + kx;
        for (int64_t ci = 0; ci < C; ++ci) t[ci * taps] = static_cast<int32_t>(tap + ci * plane);
      }
  }
};

// a * b, or INT64_MAX where that overflows (the layout's size then fails set_table's check)
inline int64_t mul_saturated(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_mul_overflow(a, b, &r) ? std::numeric_limits<int64_t>::max() : r;
}

inline Layout make_layout(int64_t C, int64_t kh, int64_t kw, int64_t sh, int64_t band_rows,
                          int64_t out_cols) {
  Layout l;
  l.sh = sh;
  l.pitch = round_up(std::max<int64_t>(out_cols, 1), kVec);
  l.plane_rows = band_rows + (kh - 1) / sh;
  l.plane = mul_saturated(l.pitch, l.plane_rows);
  l.phase_stride = mul_saturated(C, l.plane);
  l.copy_stride = mul_saturated(sh, l.phase_stride);
  l.elems = mul_saturated(kw, l.copy_stride);
  return l;
}

// Uninitialised scratch whose data() is 64-byte aligned (std::vector only guarantees 16). Not
// zero-filled: zeroing the packed-input and squeeze buffers of every call was 3.5-5 % of the
// compressed SqueezeNet's time (same-process A/B, 2 threads); pack_band writes every element of
// its band that a row can reach (with `used`, the planes of unreached channels may stay unwritten)
// and the Fire zeroes the columns of its squeeze buffer that no squeeze row writes.
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t n) : raw_(new T[static_cast<size_t>(n) + 64 / sizeof(T)]) {
    const auto a = reinterpret_cast<uintptr_t>(raw_.get());
    data_ = reinterpret_cast<T*>((a + 63) & ~uintptr_t(63));
  }
  T* data() { return data_; }

 private:
  std::unique_ptr<T[]> raw_;
  T* data_;
};

// Grow-only uninitialised scratch: the partial tiles of K-blocked rows and the raw tiles the rows
// kernel leaves for channels-last / averaged outputs. Every element is written before it is read;
// std::vector::resize zero-filled them on every call (the classifier: 500 rows x 176 pixels per
// thread; memset was 4.7 % of the samples of a 1000-row 13x13 test layer in perf).
template <typename T>
class Scratch {
 public:
  T* get(size_t n) {
    if (n > cap_) {
      buf_ = AlignedBuffer<T>(static_cast<int64_t>(n));
      cap_ = n;
    }
    return buf_.data();
  }

 private:
  AlignedBuffer<T> buf_{0};
  size_t cap_ = 0;
};

// Zeroes n contiguous elements: the few padding columns of a row, thousands of times per call,
// where std::fill became a libc memset call per row (13x13 layers 1.1-1.2x slower than inline).
template <typename T>
inline void zero_row(T* d, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    const __m512 z = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      const int64_t r = n - i;
      _mm512_mask_storeu_ps(d + i, r >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << r) - 1u), z);
    }
    return;
  }
#endif
  std::fill(d, d + n, T(0));
}

// Copies n contiguous elements (a row of a few dozen, many thousand times per call: a libc memcpy
// call per row cost as much as the SpMM of a 1x1 layer).
template <typename T>
inline void copy_row(T* d, const T* s, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, _mm512_loadu_ps(s + i));
    if (i < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
      _mm512_mask_storeu_ps(d + i, m, _mm512_maskz_loadu_ps(m, s + i));
    }
    return;
  }
#endif
  std::memcpy(d, s, sizeof(T) * static_cast<size_t>(n));
}

// copy_row(d, s, n) that also zeroes d[n, room) when that takes no extra store: the last vector
// is loaded under a mask and stored whole (zeros past n) if it ends within room. Returns whether
// it did (AVX-512 float; else false and nothing is written). The per-row zeroing of the pitch
// padding as a separate store cost 13x13 layers 4-5 % (same-process A/B).
template <typename T>
inline bool copy_row_zero_tail(T* d, const T* s, int64_t n, int64_t room) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (n <= 0 || round_up(n, 16) != round_up(room, 16) || room % 16 != 0) return false;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, _mm512_loadu_ps(s + i));
    if (i < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
      _mm512_storeu_ps(d + i, _mm512_maskz_loadu_ps(m, s + i));
    }
    return true;
  }
#endif
  (void)d, (void)s, (void)n, (void)room;
  return false;
}

// d[i] = s[2 i], i < n (a stride-2 conv's column phase): two loads and a permute per 16 outputs
// (a scalar strided copy took ~10 % of conv1's time); never reads past s[2 n - 2].
template <typename T>
inline void copy_row_stride2(T* d, const T* s, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for (; i + 16 <= n; i += 16) {
      const int64_t rest = 2 * n - 1 - (2 * i + 16);  // readable elements from s + 2 i + 16 (>= 15)
      const __mmask16 m = rest >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rest) - 1u);
      const __m512 a = _mm512_loadu_ps(s + 2 * i);
      const __m512 b = _mm512_maskz_loadu_ps(m, s + 2 * i + 16);
      _mm512_storeu_ps(d + i, _mm512_permutex2var_ps(a, even, b));
    }
  }
#endif
  for (; i < n; ++i) d[i] = s[2 * i];
}

// Packs one band of an image into the layout: copy kx, phase py, channel ci, plane row i, column
// j < out_cols holds the input at padded row prow0 + i*sh + py, padded column j*sw + kx (zero
// outside the image). Columns [out_cols, pitch) are zeroed (the kernels compute them, the
// epilogues drop them), so every element of the buffer is written - except with `used`.
// x: one image with element strides (sC, sH, sW), C x H x W. used (optional, channels-last x on
// the AVX-512 float path, see used_channels): every channel with used[ci] != 0 is packed; the
// interior of a channel with used[ci] == 0 may be left unwritten (transpose_2d_used), so the
// layer's rows must never reach it.
template <typename T>
inline void pack_band(const T* x, int64_t sC, int64_t sH, int64_t sW, int64_t C, int64_t H,
                      int64_t W, int64_t prow0, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                      int64_t pw, int64_t out_cols, const Layout& l, T* buf,
                      const uint8_t* used = nullptr) {
  // Copy kx holds columns j in [ja, jb) (0 <= j*sw + kx - pw < W), starting at input column c0.
  std::vector<int64_t> cols(3 * static_cast<size_t>(kw));
  for (int64_t kx = 0; kx < kw; ++kx) {
    int64_t ja = 0;
    while (ja < out_cols && ja * sw + kx - pw < 0) ++ja;
    int64_t jb = ja;
    while (jb < out_cols && jb * sw + kx - pw < W) ++jb;
    cols[3 * kx] = ja;
    cols[3 * kx + 1] = jb;
    cols[3 * kx + 2] = ja * sw + kx - pw;
  }
  // Plane row i of phase py holds input row r; false for a zero (padding) row.
  auto row_in = [&](int64_t i, int64_t py, int64_t& r) {
    r = prow0 + i * sh + py - ph;
    return r >= 0 && r < H;
  };
  // Zero columns outside [ja, jb) of plane row d, up to the pitch (all of it for a padding row):
  // the buffer is not zero-initialised, and the kernels compute the pitch-padding lanes too.
  auto fill_edges = [&](T* d, int64_t kx, bool rin) {
    const int64_t ja = cols[3 * kx], jb = cols[3 * kx + 1];
    if (!rin || ja >= jb) return zero_row(d, l.pitch);
    zero_row(d, ja);
    zero_row(d + jb, l.pitch - jb);
  };
  // Plane row d of copy kx from input row srow (its column 0 of one channel, pixels sW_ apart;
  // unused when !rin): columns [ja, jb) from input column cols[3 kx + 2] on, every sw-th, zeros
  // around (all zeros for a padding row).
  auto copy_plane_row = [&](T* d, const T* srow, int64_t sW_, bool rin, int64_t kx) {
    const int64_t ja = cols[3 * kx], jb = cols[3 * kx + 1];
    const T* s = srow + cols[3 * kx + 2] * sW_;
    if (rin && ja < jb && sw == 1 && sW_ == 1 &&
        copy_row_zero_tail(d + ja, s, jb - ja, l.pitch - ja)) {
      zero_row(d, ja);  // the right padding came with the copy's last vector
      return;
    }
    fill_edges(d, kx, rin);
    if (!rin || ja >= jb) return;
    if (sw == 1 && sW_ == 1) {
      copy_row(d + ja, s, jb - ja);
    } else if (sw == 2 && sW_ == 1) {
      copy_row_stride2(d + ja, s, jb - ja);
    } else {
      const int64_t step = sw * sW_;
      for (int64_t j = ja; j < jb; ++j) d[j] = s[(j - ja) * step];
    }
  };
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    // A channels-last input of <= 4 channels (RGB) under a kernel of several columns: each input
    // row is moved once into a CHW row (gather_columns: for dense RGB pixels by permutes), and the
    // kw column copies are cut from it as from an NCHW row. Gathering every copy's columns from x
    // repeated the 16-load gathers kw times (conv1 of SqueezeNet 1.0: 7x). Same-process A/B, 2
    // threads, conv1 in channels_last at 10 / 33 / 100 %, unstructured and block-4, two runs:
    // SqueezeNet 1.0 (7x7) 1.04-1.10x / 1.03-1.06x / 1.00-1.02x, 1.1 (3x3) 0.96-1.04x (what
    // remains of the packing is reading x, ~0.6 MB a call, from L3).
    if (pixel_major(sC, sW) && C <= 4 && kw > 1 && gather_offsets_fit(sW)) {
      const int64_t wr = round_up(W, kVec);
      AlignedBuffer<T> rowbuf(C * wr);
      for (int64_t i = 0; i < l.plane_rows; ++i)
        for (int64_t py = 0; py < sh; ++py) {
          int64_t r;
          const bool rin = row_in(i, py, r);
          if (rin) gather_columns(x + r * sH, sW, W, C, rowbuf.data(), wr);
          for (int64_t ci = 0; ci < C; ++ci)
            for (int64_t kx = 0; kx < kw; ++kx)
              copy_plane_row(buf + kx * l.copy_stride + py * l.phase_stride + ci * l.plane +
                                 i * l.pitch,
                             rowbuf.data() + ci * wr, 1, rin, kx);
        }
      return;
    }
  }
#endif
  if (pixel_major(sC, sW)) {
    // channels-last-like input: pixels outer, channels innermost in the source.
    for (int64_t kx = 0; kx < kw; ++kx) {
      const int64_t ja = cols[3 * kx], jb = cols[3 * kx + 1], c0 = cols[3 * kx + 2];
      for (int64_t py = 0; py < sh; ++py) {
        T* phase = buf + kx * l.copy_stride + py * l.phase_stride;
        for (int64_t i = 0; i < l.plane_rows; ++i) {
          int64_t r;
          const bool rin = row_in(i, py, r);
          for (int64_t ci = 0; ci < C; ++ci) fill_edges(phase + ci * l.plane + i * l.pitch, kx, rin);
          if (!rin || ja >= jb) continue;
          const T* srow = x + r * sH;
#if defined(__AVX512F__)
          if constexpr (std::is_same<T, float>::value) {
            // An RGB-like input by gathers, one per channel and 16 pixels (a 16x16 transpose of 3
            // channels was a quarter of conv1's samples): same-process A/B, 2 threads, conv1 of
            // SqueezeNet 1.1 / 1.0 in channels_last 1.17-1.24x / 1.12-1.26x (round 11; kernels of
            // several columns now take the row-once path above). Else 16x16 transposes.
            const bool gathers = gather_offsets_fit(sw * sW);
            if (C <= 4 && gathers) {
              gather_columns(srow + c0 * sW, sw * sW, jb - ja, C, phase + i * l.pitch + ja, l.plane);
            } else if (used && gathers) {
              transpose_2d_used(srow + c0 * sW, sw * sW, jb - ja, C, phase + i * l.pitch + ja,
                                l.plane, used);
            } else {
              transpose_2d(srow + c0 * sW, sw * sW, jb - ja, C, phase + i * l.pitch + ja, l.plane);
            }
            continue;
          }
#endif
          for (int64_t j = ja; j < jb; ++j) {
            const T* s = srow + (c0 + (j - ja) * sw) * sW;
            T* d = phase + i * l.pitch + j;
            for (int64_t ci = 0; ci < C; ++ci) d[ci * l.plane] = s[ci];
          }
        }
      }
    }
    return;
  }
  // Channels outer, then input rows in order, then the kx copies of a row: the source is read as
  // one sequential run per channel, each row once while it is in L1. (Copies outer and rows inner
  // read the band kw times and jumped a whole plane between consecutive short rows, C streams at
  // once, which the hardware prefetcher does not follow: the copy was 15 % of a 55x55 Fire and
  // 18 % of conv1 + pool.)
  for (int64_t ci = 0; ci < C; ++ci)
    for (int64_t i = 0; i < l.plane_rows; ++i)
      for (int64_t py = 0; py < sh; ++py) {
        int64_t r;
        const bool rin = row_in(i, py, r);
        for (int64_t kx = 0; kx < kw; ++kx)
          copy_plane_row(buf + kx * l.copy_stride + py * l.phase_stride + ci * l.plane + i * l.pitch,
                         x + ci * sC + r * sH, sW, rin, kx);
      }
}

// Rows per band for H rows of N images on nthreads threads, starting from `rows`: at::parallel_for
// hands each thread one contiguous run of the N * nb (image, band) tasks, so a task count that is
// not a multiple of the threads leaves a thread idle for a whole band (55 rows in 7 bands on 2
// threads: 4 + 3 bands). Takes the largest band of >= rows / 2 rows whose task count is a multiple
// of nthreads (A/B on SqueezeNet 1.1 Fires, see docs/codebook_kernels.md), else `rows`.
inline int64_t balanced_band_rows(int64_t H, int64_t N, int64_t rows, int64_t nthreads) {
  if (nthreads <= 1) return rows;
  for (int64_t b = rows; b >= std::max<int64_t>(1, rows / 2); --b)
    if ((N * ((H + b - 1) / b)) % nthreads == 0) return b;
  return rows;
}

// nb bands over `total` rows, split as evenly as they go: band i is [start(i), start(i + 1)).
// Bands of a fixed size with a short last one left threads unequal work (4 bands of 8 over 27
// rows: 16 rows on one thread, 11 on the other; SqueezeNet 1.0's 54-row Fires 30 against 24).
struct EvenBands {
  int64_t total, n;
  int64_t start(int64_t i) const { return i * total / n; }
  int64_t largest() const { return (total + n - 1) / n; }
};

// Pixel tile length for n pixels (n a multiple of kVec): as few tiles as k.tile allows, of equal
// length rounded up to kVec, so there is no short tail tile that costs a whole pass over a row.
template <typename T>
inline int64_t tile_step(const Kernel<T>& k, int64_t n) {
  const int64_t ntiles = std::max<int64_t>(1, (n + k.tile - 1) / k.tile);
  return std::min<int64_t>(k.tile, round_up((n + ntiles - 1) / ntiles, kVec));
}

// K-blocking: input channels per block so that the slab one block reads for a tile
// (`planes` = kw * sh copies/phases of `step + halo` elements per channel) stays within the
// budget while all rows of the layer walk it; `channels` when the whole slab fits. A block also
// holds enough channels for >= min_entries entries per row on average (`entries` in `rows` rows),
// since every (row, block) has a partial-tile round trip.
// Two budgets. `l1` (rows without quads on the AVX-512 float kernels, see l1_kblocks): a layer of
// >= l1_min_rows rows (and >= l1_min_row_entries entries per row) whose slab exceeds L1 (48 KB a
// core here) gets L1-sized blocks (40 KB, >= 16 entries per row), walked by rows_kb_avx512. The
// convs take >= 64 rows, their channels_last squeezes and the Fire's three layers >= 16 rows of
// >= 32 entries (the Fire's squeezes have 16-64 rows: same-process A/B against >= 64 rows, 2
// threads, unstructured Fires 0.97-1.12x, mean ~1.04x; as standalone NCHW convs, 16-32-row
// squeezes of 42 entries per row lost 4-8 %). Those row kernels load one input vector per
// multiply-add, and a 13x13 3x3 layer with 64 input channels (a 184 KB slab) took twice as long
// per multiply-add as one whose slab fitted L1 (1 thread). Same-process A/B, 2 threads, 33 %
// unstructured, SqueezeNet 1.1, against the 512 KB budget: 13x13 expand3x3 1.08-1.15x, classifier
// 1.09-1.17x, 13x13 Fires 1.04-1.20x, 27x27 Fires 1.00-1.13x. With L1 blocks for every row count
// the 55x55 Fires lost 9-12 % (16-row squeezes: too little reuse of a block); from 64 rows instead
// of 128: Fires 0.94-1.08x (mean ~1.02), the 64-row 13x13 squeezes 1.05-1.07x. Otherwise (quads,
// other ISAs, float64): 512 KB, half the L2 of a core, >= 48 entries per row, which only blocks
// slabs that would push the rest of the working set out of L2 (L1 budgets were 0-50 % slower
// through the generic per-row kernels).
// SQZ_KBLOCK_BYTES / SQZ_KBLOCK_MIN_ENTRIES override the two limits (tuning, and tests that force
// tiny blocks through every block-boundary case).
template <typename T>
inline int64_t chunk_channels(int64_t channels, int64_t planes, int64_t step, int64_t halo,
                              int64_t entries, int64_t rows, bool l1, int64_t l1_min_rows = 64,
                              int64_t l1_min_row_entries = 0) {
  const char* eb = std::getenv("SQZ_KBLOCK_BYTES");
  const char* em = std::getenv("SQZ_KBLOCK_MIN_ENTRIES");
  const int64_t per_ch = planes * (step + halo) * static_cast<int64_t>(sizeof(T));
  const bool l1_blocks = l1 && rows >= l1_min_rows && entries >= l1_min_row_entries * rows &&
                         per_ch * channels > 48 * 1024;
  const int64_t budget =
      eb ? std::max<int64_t>(1, std::atoll(eb)) : l1_blocks ? 40 * 1024 : 512 * 1024;
  const double min_entries = em ? std::max(0.0, std::atof(em)) : l1_blocks ? 16.0 : 48.0;
  int64_t cch = std::max<int64_t>(1, budget / std::max<int64_t>(per_ch, 1));
  const double per_row_ch = static_cast<double>(entries) /
                            static_cast<double>(std::max<int64_t>(1, rows * channels));
  if (per_row_ch * static_cast<double>(cch) < min_entries)
    cch = per_row_ch > 0 ? static_cast<int64_t>(min_entries / per_row_ch) + 1 : channels;
  return std::min(cch, channels);
}

// Whether a layer's K-blocks are sized for L1 (chunk_channels): rows without quads on the AVX-512
// float kernels, whose K-blocked rows kernel (rows_kb_avx512) resumes each row's walk cheaply.
template <typename T>
inline bool l1_kblocks(const Rows<T>& L, const Kernel<T>& k) {
  return std::is_same<T, float>::value && k.wide && L.quads == nullptr;
}

// The usual sink of a layer: a finished tile of row o goes to the output through the Epilogue;
// when the output rows are contiguous (sW == 1) the AVX-512 kernels store it themselves.
template <typename T>
struct OutSink {
  Epilogue<T> e;
  bool wide;

  void store(const T* acc, int64_t q0, int len, int64_t o) const { store_tile(acc, q0, len, o, e, wide); }

  // Channels-last output (channel stride 1): tiles of all rows are collected and written 16
  // channels x 16 pixels at a time through register transposes (AVX-512 float builds).
  bool row_blocks() const {
#if defined(__AVX512F__)
    return std::is_same<T, float>::value && wide && pixel_major(e.sC, e.sW) && e.in_w % 16 == 0;
#else
    return false;
#endif
  }

  // Tiles of rows [o0, o1) at part[(o - o0) * ld], pixels [q0, q0 + len).
  void store_rows(T* part, int64_t ld, int64_t q0, int len, int64_t o0, int64_t o1) const {
#if defined(__AVX512F__)
    if constexpr (std::is_same<T, float>::value) {
      // Bias + ReLU after the transpose, on vectors of 16 channels of one pixel: one pass over
      // the tiles instead of a bias/ReLU pass and a transpose pass (conv1: 4-12 % faster, A/B).
      const __m512 z = _mm512_setzero_ps();
      for (int64_t og = o0; og < o1; og += 16) {
        const int nr = static_cast<int>(std::min<int64_t>(16, o1 - og));
        const __mmask16 rm = nr >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nr) - 1u);
        const __m512 vb = e.bias ? _mm512_maskz_loadu_ps(rm, e.bias + og) : z;
        const float* src = part + (og - o0) * ld;
        for (int v = 0; v < len / 16; ++v) {
          const int64_t q = q0 + 16 * v, row = q / e.in_w, col = q - row * e.in_w;
          const int valid = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(16, e.out_w - col)));
          if (valid == 0) continue;
          __m512 r[16];
          for (int i = 0; i < 16; ++i) r[i] = i < nr ? _mm512_loadu_ps(src + i * ld + 16 * v) : z;
          transpose16x16(r);
          float* dst = e.out + og + row * e.sH + col * e.sW;
          for (int c = 0; c < valid; ++c) {
            __m512 y = _mm512_add_ps(r[c], vb);
            if (e.relu) y = _mm512_max_ps(z, y);  // max(0, NaN) = NaN, like torch.relu
            _mm512_mask_storeu_ps(dst + c * e.sW, rm, y);
          }
        }
      }
      return;
    }
#endif
    (void)part, (void)ld, (void)q0, (void)len, (void)o0, (void)o1;
  }

  bool plan(int64_t q0, int len, TileDst<T>& td) const {
    if (e.sW != 1 || len % 16 != 0 || e.in_w % 16 != 0) return false;
    td.nd = 1;
    td.base[0] = e.out;
    td.row_stride[0] = e.sC;
    td.bias = e.bias;
    td.relu = e.relu;
    for (int v = 0; v < len / 16; ++v) {
      const int64_t q = q0 + 16 * v, row = q / e.in_w, col = q - row * e.in_w;
      const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(16, e.out_w - col));
      td.off[0][v] = valid > 0 ? row * e.sH + col : 0;
      td.mask[0][v] = static_cast<uint16_t>(valid >= 16 ? 0xFFFFu : (1u << valid) - 1u);
    }
    return true;
  }
};

// Rows [o0, o1) of a layer over pixels q in [0, n) of an aligned band (n a multiple of kVec):
// tiles outside, rows inside (the input slab of a tile stays in cache across rows). The sink
// takes finished tiles: sink.plan(q0, len, td) lets a direct kernel store them itself, otherwise
// sink.store(acc, q0, len, o) gets them from the accumulator buffer.
// K-blocked layers (L.nblocks > 1) walk block c of every row before block c + 1: each row resumes
// where its walk stopped (`walk`: entry and cursor per row), its partial tile waits in `part` (L2).
template <typename T, typename Sink>
inline void spmm_rows(const Kernel<T>& k, const T* in, const Rows<T>& L, int64_t o0, int64_t o1,
                      int64_t n, const Sink& sink, Scratch<T>& part,
                      std::vector<Walk>& walk) {
  alignas(64) T acc[kMaxTile];
  TileDst<T> td;
  if (n <= 0 || o0 >= o1) return;
  const int64_t step = tile_step(k, n);
  const bool rowblocks = sink.row_blocks();
  for (int64_t q0 = 0; q0 < n; q0 += step) {
    const int len = static_cast<int>(std::min<int64_t>(step, n - q0));
    const TileDst<T>* dst = !rowblocks && k.direct && sink.plan(q0, len, td) ? &td : nullptr;
#if defined(__AVX512F__)
    if constexpr (std::is_same<T, float>::value) {
      // One block: the rows kernel stores final tiles itself (dst) or, for channels-last outputs
      // (rowblocks), leaves them in `part` for the transposing store.
      const RowsFn rf = L.nblocks <= 1 && k.wide && (dst || rowblocks) ? rows_avx512(len) : nullptr;
      if (rf && !rowblocks) {
        rf(in + q0, L.gaps, L.codes, L.row_start, L.table, L.cb, o0, o1, dst, L.quads, nullptr, step);
        continue;
      }
      if (rf) {
        // Channels-last output: 16 rows at a time, each block transposed out while its raw tiles
        // are still in L1. All rows' tiles first (64 rows x 256 pixels = 64 KB) made the
        // transposing store wait on L2 for its strided loads (~45 % of its samples, perf):
        // same-process A/B, 2 threads, the 1x1 expands 1.00-1.17x (55x55 at 10 %: 1.11-1.15x),
        // other layers 0.97-1.07x. Blocks end at multiples of 16, so no quad is split.
        float* raw = part.get(16 * static_cast<size_t>(step));
        for (int64_t a = o0; a < o1;) {
          const int64_t b = std::min(o1, (a / 16 + 1) * 16);
          rf(in + q0, L.gaps, L.codes, L.row_start, L.table, L.cb, a, b, nullptr, L.quads, raw, step);
          sink.store_rows(raw, step, q0, len, a, b);
          a = b;
        }
        continue;
      }
    }
#endif
    if (L.nblocks <= 1 && !rowblocks) {
      for (int64_t o = o0; o < o1; ++o) {
        const int64_t rs = L.row_start[o];
        k.fn(in + q0, L.gaps + rs, L.codes + rs, L.row_start[o + 1] - rs, -1, kNoBound, L.table,
             L.cb, len, acc, false, dst, o);
        if (!dst) sink.store(acc, q0, len, o);
      }
      continue;
    }
    const size_t rows = static_cast<size_t>(o1 - o0);
    T* const pbase = part.get(rows * step);
    walk.resize(rows);
    for (int64_t o = o0; o < o1; ++o) walk[o - o0] = {L.row_start[o], -1};
#if defined(__AVX512F__)
    if constexpr (std::is_same<T, float>::value) {
      // Rows without quads: the K-blocked rows kernel (one call per block for all rows).
      const RowsKbFn kf = k.wide && L.quads == nullptr ? rows_kb_avx512(len) : nullptr;
      if (kf) {
        for (int64_t c = 0; c < L.nblocks; ++c) {
          const bool last = c == L.nblocks - 1;
          kf(in + q0, L.gaps, L.codes, L.row_start, L.table, L.cb, o0, o1, last ? dst : nullptr,
             walk.data(), last ? kNoBound : (c + 1) * L.block_pos, c > 0, pbase, step);
        }
        if (rowblocks) {  // all rows' partial tiles are needed until the last block: one store
          sink.store_rows(pbase, step, q0, len, o0, o1);
        } else if (!dst) {
          for (int64_t o = o0; o < o1; ++o) sink.store(pbase + (o - o0) * step, q0, len, o);
        }
        continue;
      }
    }
#endif
    for (int64_t c = 0; c < L.nblocks; ++c) {
      const bool last = c == L.nblocks - 1;
      const int64_t bound = last ? kNoBound : (c + 1) * L.block_pos;
      for (int64_t o = o0; o < o1; ++o) {
        Walk& wk = walk[o - o0];
        T* p = pbase + (o - o0) * step;
        const Walk r = k.fn(in + q0, L.gaps + wk.n, L.codes + wk.n, L.row_start[o + 1] - wk.n,
                            wk.cur, bound, L.table, L.cb, len, p, c > 0, last ? dst : nullptr, o);
        wk = {wk.n + r.n, r.cur};
        if (last && !dst && !rowblocks) sink.store(p, q0, len, o);
      }
    }
    if (rowblocks) sink.store_rows(pbase, step, q0, len, o0, o1);
  }
}

// Sets up K-blocking of a layer with `channels` input channels of `taps` positions each in blocks
// of `cch` channels (no blocking when cch >= channels).
template <typename T>
inline void set_blocks(Rows<T>& L, int64_t channels, int64_t taps, int64_t cch) {
  if (cch >= channels) return;
  L.block_pos = cch * taps;
  L.nblocks = (channels + cch - 1) / cch;
}

// Conv geometry of codebook_conv2d / codebook_linear (linear = 1x1 conv over a 1 x M "image").
struct ConvGeom {
  int64_t N, C, H, W, O;
  int64_t kh, kw, sh, sw, ph, pw;
  int64_t Ho, Wo;
};

// Checks the x / geometry arguments of the conv ops and returns their geometry (O from the
// stream's row_counts, which check_stream validates). Shared by codebook_conv2d and
// codebook_conv2d_max_pool.
inline ConvGeom checked_conv_geom(const char* op, const at::Tensor& x, const Stream& s,
                                  at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1, op,
              ": kernel_size must be two positive ints, got ", kernel_size);
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op,
              ": stride must be two positive ints, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": padding must be two non-negative ints, got ", padding);
  ConvGeom g;
  g.O = check_stream(op, "", x, s);
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.kh = kernel_size[0];
  g.kw = kernel_size[1];
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  TORCH_CHECK(g.C >= 1, op, ": x must have at least one channel");
  // Every size below 2^31 (the kernels address a band with 32-bit offsets anyway), so that the
  // sums and products below cannot wrap: 2 * padding of 2^63 - 1 once made a wrong output shape.
  constexpr int64_t big = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(g.H <= big && g.W <= big && g.kh <= big && g.kw <= big && g.ph <= big && g.pw <= big,
              op, ": x's height / width, kernel_size and padding must be < 2^31, got x ",
              x.sizes(), ", kernel_size ", kernel_size, ", padding ", padding);
  TORCH_CHECK(g.H + 2 * g.ph >= g.kh && g.W + 2 * g.pw >= g.kw, op,
              ": kernel_size ", kernel_size, " is larger than the padded input ", x.sizes());
  // One weight position per (ci, ky, kx) in an int32-indexed table, checked before it is sized
  // (C * kh * kw of 2^64 once wrapped to 0).
  TORCH_CHECK(g.C <= big / (g.kh * g.kw), op, ": input too large for 32-bit address offsets (",
              g.C, " channels x ", g.kh, " x ", g.kw, " kernel)");
  // A stride beyond the padded input leaves one output row / column whatever its value; the band
  // layout holds `stride` row phases, so it takes the smallest stride with the same output (2^60
  // once wrapped the layout's size and overran it).
  g.sh = std::min(g.sh, g.H + 2 * g.ph - g.kh + 1);
  g.sw = std::min(g.sw, g.W + 2 * g.pw - g.kw + 1);
  g.Ho = (g.H + 2 * g.ph - g.kh) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.kw) / g.sw + 1;
  return g;
}

// A conv layer's validated stream as the kernels walk it: the row starts, the (ci, ky, kx) ->
// band address table (filled by set_table once the band layout is chosen: the layout may depend on
// whether the layer has row quads), the contiguous streams and the row quads own what `L` points
// to (moving a ConvRows keeps those buffers in place).
template <typename T>
struct ConvRows {
  RowStarts rs;
  std::vector<int32_t> tab;
  at::Tensor gaps, codes;
  std::vector<uint8_t> quads;
  Rows<T> L;
};

template <typename T>
inline ConvRows<T> conv_rows(const char* op, const Stream& s, const ConvGeom& g, const T* cb,
                             const Kernel<T>& k) {
  const int64_t K = g.C * g.kh * g.kw;
  ConvRows<T> r{validate_stream(op, "", s, K), std::vector<int32_t>(K), s.gaps.contiguous(),
                s.codes.contiguous(), {}, {}};
  r.L = Rows<T>{r.gaps.template data_ptr<uint8_t>(), r.codes.template data_ptr<uint8_t>(),
                r.rs.data(), r.tab.data(), cb};
  find_quads(r.L, g.O, k, r.quads);
  return r;
}

// The address of every weight position in the packed band `lay`.
template <typename T>
inline void set_table(ConvRows<T>& r, const ConvGeom& g, const Layout& lay, const char* op) {
  TORCH_CHECK(lay.elems < std::numeric_limits<int32_t>::max(), op,
              ": input too large for 32-bit address offsets");
  lay.fill_offsets(r.tab.data(), g.C, g.kh, g.kw);
}

// The conv driver: x [N, C, H, W] and out [N, O, Ho, Wo] given by element strides xs / os (any
// layout; the tensors only supply data pointers and dtype, float32 or float64). Validates the
// stream. Defined in codebook_conv.cpp; codebook_linear runs a linear as a 1 x M "image".
// mean: out is [N, O, 1, 1], the global average pool of the conv output (never written whole).
void conv_forward(const at::Tensor& x, const int64_t* xs, const ConvGeom& g, const Stream& s,
                  bool relu, at::Tensor& out, const int64_t* os, const char* op, bool mean = false);

}  // namespace codebook
}  // namespace sqz
