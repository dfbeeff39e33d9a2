// Minimal SIMD vector types for the CPU kernels: AVX-512 (16 floats), AVX2+FMA (8 floats), and a
// portable array type (any element type, any lane count) used for the scalar path and float64.
//
// Every type offers the same static interface so that kernels are written once as templates:
//   T, L (lanes), zero(), set1(T), load(const T*, Mask), store(T*, Mask), fma(a, b, c) = a*b + c,
//   relu(v), scatter(T* base, const int32_t* idx, Mask, v)  (lane l -> base[idx[l]]),
//   loadu(const T*) (all L lanes, unmasked), storeu(T*) (all L lanes).
// Masks are lane bit masks (bit l set = lane l active); masked-off lanes are neither read nor
// written, so a masked load past the end of a tensor is safe.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace sqz {
namespace simd {

using Mask = uint32_t;

// Hint: bring the cache line holding p into L1 (never faults, any address).
inline void prefetch(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

template <int L>
inline Mask full_mask() {
  return L >= 32 ? ~Mask(0) : ((Mask(1) << L) - 1);
}

// Portable vector: plain loops the compiler may vectorise. Also the float64 path.
template <typename T_, int L_>
struct ArrVec {
  using T = T_;
  static constexpr int L = L_;
  T v[L];
  static ArrVec zero() {
    ArrVec r;
    for (int l = 0; l < L; ++l) r.v[l] = T(0);
    return r;
  }
  static ArrVec set1(T x) {
    ArrVec r;
    for (int l = 0; l < L; ++l) r.v[l] = x;
    return r;
  }
  static ArrVec load(const T* p, Mask m) {
    ArrVec r;
    for (int l = 0; l < L; ++l) r.v[l] = ((m >> l) & 1) ? p[l] : T(0);
    return r;
  }
  void store(T* p, Mask m) const {
    for (int l = 0; l < L; ++l)
      if ((m >> l) & 1) p[l] = v[l];
  }
  static ArrVec loadu(const T* p) {
    ArrVec r;
    for (int l = 0; l < L; ++l) r.v[l] = p[l];
    return r;
  }
  void storeu(T* p) const {
    for (int l = 0; l < L; ++l) p[l] = v[l];
  }
  void scatter(T* base, const int32_t* idx, Mask m) const {
    for (int l = 0; l < L; ++l)
      if ((m >> l) & 1) base[idx[l]] = v[l];
  }
  static ArrVec fma(const ArrVec& a, const ArrVec& b, const ArrVec& c) {
    ArrVec r;
    for (int l = 0; l < L; ++l) r.v[l] = a.v[l] * b.v[l] + c.v[l];
    return r;
  }
  static ArrVec relu(const ArrVec& a) {
    ArrVec r;
    // NaN propagates like torch.relu: (NaN > 0) is false, but NaN < 0 is false too.
    for (int l = 0; l < L; ++l) r.v[l] = a.v[l] < T(0) ? T(0) : a.v[l];
    return r;
  }
};

#if defined(__AVX512F__)
struct Avx512F {
  using T = float;
  static constexpr int L = 16;
  __m512 v;
  static Avx512F zero() { return {_mm512_setzero_ps()}; }
  static Avx512F set1(float x) { return {_mm512_set1_ps(x)}; }
  static Avx512F load(const float* p, Mask m) { return {_mm512_maskz_loadu_ps((__mmask16)m, p)}; }
  void store(float* p, Mask m) const { _mm512_mask_storeu_ps(p, (__mmask16)m, v); }
  static Avx512F loadu(const float* p) { return {_mm512_loadu_ps(p)}; }
  void storeu(float* p) const { _mm512_storeu_ps(p, v); }
  void scatter(float* base, const int32_t* idx, Mask m) const {
    _mm512_mask_i32scatter_ps(base, (__mmask16)m, _mm512_loadu_si512(idx), v, 4);
  }
  static Avx512F fma(const Avx512F& a, const Avx512F& b, const Avx512F& c) {
    return {_mm512_fmadd_ps(a.v, b.v, c.v)};
  }
  // max(0, v) with v second: vmaxps returns the second operand when either is NaN.
  static Avx512F relu(const Avx512F& a) { return {_mm512_max_ps(_mm512_setzero_ps(), a.v)}; }
};
#endif

#if defined(__AVX2__) && defined(__FMA__)
struct Avx2F {
  using T = float;
  static constexpr int L = 8;
  __m256 v;
  static __m256i lanes(Mask m) {
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i mm = _mm256_set1_epi32((int)m);
    return _mm256_cmpeq_epi32(_mm256_and_si256(mm, bits), bits);
  }
  static Avx2F zero() { return {_mm256_setzero_ps()}; }
  static Avx2F set1(float x) { return {_mm256_set1_ps(x)}; }
  static Avx2F load(const float* p, Mask m) {
    if ((m & 0xFF) == 0xFF) return {_mm256_loadu_ps(p)};
    return {_mm256_maskload_ps(p, lanes(m))};
  }
  static Avx2F loadu(const float* p) { return {_mm256_loadu_ps(p)}; }
  void storeu(float* p) const { _mm256_storeu_ps(p, v); }
  void store(float* p, Mask m) const {
    if ((m & 0xFF) == 0xFF)
      _mm256_storeu_ps(p, v);
    else
      _mm256_maskstore_ps(p, lanes(m), v);
  }
  void scatter(float* base, const int32_t* idx, Mask m) const {
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (int l = 0; l < 8; ++l)
      if ((m >> l) & 1) base[idx[l]] = t[l];
  }
  static Avx2F fma(const Avx2F& a, const Avx2F& b, const Avx2F& c) {
    return {_mm256_fmadd_ps(a.v, b.v, c.v)};
  }
  static Avx2F relu(const Avx2F& a) { return {_mm256_max_ps(_mm256_setzero_ps(), a.v)}; }
};
#endif

}  // namespace simd
}  // namespace sqz
