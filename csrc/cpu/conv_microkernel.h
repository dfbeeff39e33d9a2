// Register-blocked direct-convolution micro-kernel in "CHW" orientation, shared by the CPU kernels.
//
//   acc[i][j] = bias[i] + sum_k sum_t A[i*a_m + k*a_k + a_tap[t]] * B[k*b_k + b_tap[t] + j*L + lane]
//
// i runs over MR output channels (weights are broadcast from A), j over NV consecutive vectors of
// L flat pixel positions (loaded from B). A 1x1 conv has one tap; a 3x3 conv on a zero-padded
// buffer has nine taps that are plain address offsets, so both share this kernel. After the sum,
// ReLU is applied and `store(i, j, vec)` writes each vector wherever the caller maps it.
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
// accumulators + NV loaded vectors + one broadcast fit the register file.
template <class V>
struct Blocking {
  static constexpr int MR = 4;
  static constexpr int NV = 2;
};
#if defined(__AVX512F__)
template <>
struct Blocking<simd::Avx512F> {  // 32 zmm: 24 accumulators + 6 loads + 1 broadcast
  static constexpr int MR = 4;
  static constexpr int NV = 6;
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
  const T* A;             // weights of output channel 0
  int64_t a_m, a_k;       // A strides: per output channel, per reduction index
  const int64_t* a_tap;   // A offset of each tap
  const T* B;             // input at flat position 0 of the run
  int64_t b_k;            // B stride per reduction index (a channel plane)
  const int64_t* b_tap;   // B offset of each tap
  int64_t K;              // reduction length (input channels)
  int64_t span;           // valid flat positions readable from B (loads beyond are masked)
  const T* bias;          // per output channel, may be null
};

template <class V, int MR, int NV, int TAPS, class Store>
SQZ_ALWAYS_INLINE void conv_block(const ConvPass<typename V::T>& p, int64_t m0, int64_t v0,
                                  const Store& store) {
  using T = typename V::T;
  constexpr int L = V::L;
  const simd::Mask full = simd::full_mask<L>();
  // Only the last vector of the run can reach past `span`.
  const int64_t rem = p.span - (v0 + NV - 1) * L;
  const simd::Mask last = rem >= L ? full : (rem <= 0 ? 0 : ((simd::Mask(1) << rem) - 1));

  V acc[MR][NV];
  SQZ_UNROLL
  for (int i = 0; i < MR; ++i) {
    const V b0 = p.bias ? V::set1(p.bias[m0 + i]) : V::zero();
    SQZ_UNROLL
    for (int j = 0; j < NV; ++j) acc[i][j] = b0;
  }
  const T* A = p.A + m0 * p.a_m;
  const T* B = p.B + v0 * L;
  int64_t a_tap[TAPS], b_tap[TAPS];
  SQZ_UNROLL
  for (int t = 0; t < TAPS; ++t) {
    a_tap[t] = p.a_tap[t];
    b_tap[t] = p.b_tap[t];
  }
  for (int64_t k = 0; k < p.K; ++k) {
    const T* Ak = A + k * p.a_k;
    const T* Bk = B + k * p.b_k;
    SQZ_UNROLL
    for (int t = 0; t < TAPS; ++t) {
      V b[NV];
      SQZ_UNROLL
      for (int j = 0; j < NV; ++j) b[j] = V::load(Bk + b_tap[t] + j * L, j == NV - 1 ? last : full);
      SQZ_UNROLL
      for (int i = 0; i < MR; ++i) {
        const V a = V::set1(Ak[i * p.a_m + a_tap[t]]);
        SQZ_UNROLL
        for (int j = 0; j < NV; ++j) acc[i][j] = V::fma(a, b[j], acc[i][j]);
      }
    }
  }
  SQZ_UNROLL
  for (int i = 0; i < MR; ++i)
    SQZ_UNROLL
    for (int j = 0; j < NV; ++j) store(m0 + i, v0 + j, V::relu(acc[i][j]));
}

template <class V, int MR, int TAPS, class Store>
SQZ_ALWAYS_INLINE void conv_block_nv(const ConvPass<typename V::T>& p, int64_t m0, int64_t v0,
                                     int nv, const Store& store) {
  constexpr int NV = Blocking<V>::NV;
  static_assert(NV <= 6, "extend the switch below");
  switch (nv) {
    case 1: conv_block<V, MR, 1, TAPS>(p, m0, v0, store); break;
    case 2: if constexpr (NV >= 2) conv_block<V, MR, 2, TAPS>(p, m0, v0, store); break;
    case 3: if constexpr (NV >= 3) conv_block<V, MR, 3, TAPS>(p, m0, v0, store); break;
    case 4: if constexpr (NV >= 4) conv_block<V, MR, 4, TAPS>(p, m0, v0, store); break;
    case 5: if constexpr (NV >= 5) conv_block<V, MR, 5, TAPS>(p, m0, v0, store); break;
    case 6: if constexpr (NV >= 6) conv_block<V, MR, 6, TAPS>(p, m0, v0, store); break;
    default: break;
  }
}

// Output channels [m_begin, m_end) x vectors [0, nvec): blocks of MR channels (outer, so a
// block's weights stay in L1) by NV vectors (inner).
template <class V, int TAPS, class Store>
void conv_pass(const ConvPass<typename V::T>& p, int64_t m_begin, int64_t m_end, int64_t nvec,
               const Store& store) {
  constexpr int MR = Blocking<V>::MR;
  constexpr int NV = Blocking<V>::NV;
  int64_t m0 = m_begin;
  for (; m0 + MR <= m_end; m0 += MR)
    for (int64_t v0 = 0; v0 < nvec; v0 += NV)
      conv_block_nv<V, MR, TAPS>(p, m0, v0, (int)std::min<int64_t>(NV, nvec - v0), store);
  for (; m0 < m_end; ++m0)
    for (int64_t v0 = 0; v0 < nvec; v0 += NV)
      conv_block_nv<V, 1, TAPS>(p, m0, v0, (int)std::min<int64_t>(NV, nvec - v0), store);
}

}  // namespace sqz
