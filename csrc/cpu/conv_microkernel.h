// Register-blocked direct-convolution micro-kernel in "CHW" orientation, shared by the CPU kernels.
//
//   acc[i][j] = bias[i] + sum_k sum_(ty,tx) A[i*a_m + k*TAPS + ty*3 + tx] * B[k*b_k + ty*b_row + tx + j*L + lane]
//
// i runs over MR output channels (weights are broadcast from A), j over NV consecutive vectors of
// L flat pixel positions (loaded from B). A 1x1 conv has one tap (TAPS = 1); a 3x3 conv (TAPS = 9,
// weights [out][in][3][3]) on a zero-padded buffer with row stride b_row has nine taps that are
// plain address offsets, so both share this kernel. After the sum, ReLU is applied and
// `store(i, j, vec)` writes each vector wherever the caller maps it.
//
// Code generation matters more than anything else here (measured: the first version, with the tap
// offsets in runtime arrays, kept offsets and accumulators on the stack and ran at ~45 % of
// sgemm). So: tap offsets are compile-time immediates off three row pointers, the MR weight rows
// are separate pointers, and only a block that reaches past `span` uses a masked load.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/simd.h"

#if defined(__GNUC__)
#define SQZ_ALWAYS_INLINE inline __attribute__((always_inline))
// Full unrolling of the register-tile loops: without it GCC keeps the accumulator array in memory
// across loop back-edges (measured: 4-8x slower).
#define SQZ_UNROLL _Pragma("GCC unroll 16")
#else
#define SQZ_ALWAYS_INLINE inline
#define SQZ_UNROLL
#endif

namespace sqz {

// Register blocking per vector type: MR channels x NV vectors of accumulators, chosen so that
// accumulators + NV loaded vectors + one broadcast fit the register file with room to spare, and
// MR * NV >= 8 independent FMA chains (FMA latency 4 x 2 ports) even in the NV = 1 tail block.
template <class V>
struct Blocking {
  static constexpr int MR = 4;
  static constexpr int NV = 2;
};
#if defined(__AVX512F__)
template <>
struct Blocking<simd::Avx512F> {  // 32 zmm: 24 accumulators + 3 loads + 1 broadcast
  static constexpr int MR = 8;
  static constexpr int NV = 3;
};
#endif
#if defined(__AVX2__) && defined(__FMA__)
template <>
struct Blocking<simd::Avx2F> {  // 16 ymm: 12 accumulators + 3 loads + 1 broadcast
  static constexpr int MR = 4;
  static constexpr int NV = 3;
};
#endif

// Operands of one convolution pass over a run of flat vectors.
template <typename T>
struct ConvPass {
  const T* A;      // weights of output channel 0, [out][K][TAPS]
  int64_t a_m;     // A stride per output channel
  const T* B;      // input at flat position 0 of the run (for 3x3: the top-left tap)
  int64_t b_k;     // B stride per reduction index (a channel plane)
  int64_t b_row;   // B row stride (3x3 taps)
  int64_t K;       // reduction length (input channels)
  int64_t span;    // flat positions readable from B at (k, tap 0); reads beyond need a mask
  const T* bias;   // per output channel, may be null
};

template <class V, int MR, int NV, int TAPS, bool MASKED, class Store>
SQZ_ALWAYS_INLINE void conv_block(const ConvPass<typename V::T>& p, int64_t m0, int64_t v0,
                                  const Store& store) {
  using T = typename V::T;
  constexpr int L = V::L;
  constexpr int KS = TAPS == 9 ? 3 : 1;
  simd::Mask last = simd::full_mask<L>();
  if (MASKED) {
    const int64_t rem = p.span - (v0 + NV - 1) * L;
    last = rem >= L ? last : (rem <= 0 ? 0 : ((simd::Mask(1) << rem) - 1));
  }

  V acc[MR][NV];
  SQZ_UNROLL
  for (int i = 0; i < MR; ++i) {
    const V b0 = p.bias ? V::set1(p.bias[m0 + i]) : V::zero();
    SQZ_UNROLL
    for (int j = 0; j < NV; ++j) acc[i][j] = b0;
  }
  const T* Ar[MR];
  SQZ_UNROLL
  for (int i = 0; i < MR; ++i) Ar[i] = p.A + (m0 + i) * p.a_m;
  const T* Bk = p.B + v0 * L;
  const int64_t b_k = p.b_k, b_row = p.b_row;
  for (int64_t k = 0; k < p.K; ++k) {
    // B planes are far apart (b_k), too far for the hardware prefetchers: fetch the lines of a
    // later plane now (the next one for 3x3, whose iteration is long; PD ahead for 1x1).
    {
      constexpr int PD = TAPS == 9 ? 1 : 6;
      const T* pf = Bk + PD * b_k;
      SQZ_UNROLL
      for (int ty = 0; ty < KS; ++ty) {
        SQZ_UNROLL
        for (int j = 0; j < NV; ++j) simd::prefetch(pf + ty * b_row + j * L);
        simd::prefetch(pf + ty * b_row + NV * L + KS - 2);
      }
    }
    SQZ_UNROLL
    for (int ty = 0; ty < KS; ++ty) {
      const T* Brow = Bk + ty * b_row;
      SQZ_UNROLL
      for (int tx = 0; tx < KS; ++tx) {
        V b[NV];
        SQZ_UNROLL
        for (int j = 0; j < NV; ++j) {
          if (MASKED && j == NV - 1)
            b[j] = V::load(Brow + tx + j * L, last);
          else
            b[j] = V::loadu(Brow + tx + j * L);
        }
        SQZ_UNROLL
        for (int i = 0; i < MR; ++i) {
          const V a = V::set1(Ar[i][ty * KS + tx]);
          SQZ_UNROLL
          for (int j = 0; j < NV; ++j) acc[i][j] = V::fma(a, b[j], acc[i][j]);
        }
      }
    }
    SQZ_UNROLL
    for (int i = 0; i < MR; ++i) Ar[i] += TAPS;
    Bk += b_k;
  }
  SQZ_UNROLL
  for (int i = 0; i < MR; ++i)
    SQZ_UNROLL
    for (int j = 0; j < NV; ++j) store(m0 + i, v0 + j, V::relu(acc[i][j]));
}

// One block of MR channels x nv (<= NV) vectors; the masked variant only where the block reads
// past `span` (3x3 taps read up to 2*b_row + 2 past their flat position).
template <class V, int MR, int TAPS, class Store>
SQZ_ALWAYS_INLINE void conv_block_nv(const ConvPass<typename V::T>& p, int64_t m0, int64_t v0,
                                     int nv, const Store& store) {
  constexpr int NV = Blocking<V>::NV;
  constexpr int L = V::L;
  static_assert(NV <= 6, "extend the switch below");
  const int64_t reach = (v0 + nv) * L + (TAPS == 9 ? 2 * p.b_row + 2 : 0);
  const bool masked = reach > p.span;
#define SQZ_CASE(N)                                                         \
  case N:                                                                   \
    if constexpr (NV >= N) {                                                \
      if (masked)                                                           \
        conv_block<V, MR, N, TAPS, true>(p, m0, v0, store);                 \
      else                                                                  \
        conv_block<V, MR, N, TAPS, false>(p, m0, v0, store);                \
    }                                                                       \
    break;
  switch (nv) {
    SQZ_CASE(1)
    SQZ_CASE(2)
    SQZ_CASE(3)
    SQZ_CASE(4)
    SQZ_CASE(5)
    SQZ_CASE(6)
    default: break;
  }
#undef SQZ_CASE
}

// Output channels [m_begin, m_end) x vectors [0, nvec): blocks of MR channels (outer, so a
// block's weights stay in L1) by NV vectors (inner). Leftover channels run in blocks of MR/2, ...
template <class V, int TAPS, class Store>
void conv_pass(const ConvPass<typename V::T>& p, int64_t m_begin, int64_t m_end, int64_t nvec,
               const Store& store) {
  constexpr int MR = Blocking<V>::MR;
  constexpr int NV = Blocking<V>::NV;
  int64_t m0 = m_begin;
  for (; m0 + MR <= m_end; m0 += MR)
    for (int64_t v0 = 0; v0 < nvec; v0 += NV)
      conv_block_nv<V, MR, TAPS>(p, m0, v0, (int)std::min<int64_t>(NV, nvec - v0), store);
  if constexpr (MR >= 8) {
    for (; m0 + 4 <= m_end; m0 += 4)
      for (int64_t v0 = 0; v0 < nvec; v0 += NV)
        conv_block_nv<V, 4, TAPS>(p, m0, v0, (int)std::min<int64_t>(NV, nvec - v0), store);
  }
  for (; m0 < m_end; ++m0)
    for (int64_t v0 = 0; v0 < nvec; v0 += NV)
      conv_block_nv<V, 1, TAPS>(p, m0, v0, (int)std::min<int64_t>(NV, nvec - v0), store);
}

}  // namespace sqz
