// Stand-alone micro-benchmark of the channels_last -> CHW packing the codebook kernels do
// (docs/codebook_kernels.md, round 13): 16x16 float transposes of a channels_last x into a band
// buffer, in variants, and the RGB deinterleave against 16-lane gathers. 1 thread, best of 200
// repetitions, ns per 16x16 tile (256 floats) or per 16-pixel vector.
//
//   g++ -O3 -march=native -I csrc/cpu bench/transpose_micro.cpp -o /tmp/transpose_micro
//   /tmp/transpose_micro
//
// Same flags as the extension (setup.py: -O3 -march=native). Needs AVX-512 (F, BW, DQ, VL).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "fire_transpose.h"

using namespace sqz;

namespace {

// 64-byte aligned float storage (the band buffers of the kernels are aligned).
struct AlignedBufferLike {
  explicit AlignedBufferLike(size_t n)
      : data(static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64))) {}
  ~AlignedBufferLike() { std::free(data); }
  float* data;
};

// An in-lane 4x4 transpose after 128-bit masked broadcasts from memory: 32 shuffles a tile, the
// lane moves done by merges of loads (measured slower than the 64 shuffles).
void tile_broadcasts(const float* src, int64_t ss, float* dst, int64_t ds) {
  for (int j = 0; j < 4; ++j) {
    __m512 a[4];
    for (int t = 0; t < 4; ++t) {
      const float* p = src + t * ss + 4 * j;
      __m512 v = _mm512_broadcast_f32x4(_mm_loadu_ps(p));
      v = _mm512_mask_broadcast_f32x4(v, 0x00F0, _mm_loadu_ps(p + 4 * ss));
      v = _mm512_mask_broadcast_f32x4(v, 0x0F00, _mm_loadu_ps(p + 8 * ss));
      a[t] = _mm512_mask_broadcast_f32x4(v, 0xF000, _mm_loadu_ps(p + 12 * ss));
    }
    const __m512d u0 = _mm512_castps_pd(_mm512_unpacklo_ps(a[0], a[1]));
    const __m512d u1 = _mm512_castps_pd(_mm512_unpackhi_ps(a[0], a[1]));
    const __m512d u2 = _mm512_castps_pd(_mm512_unpacklo_ps(a[2], a[3]));
    const __m512d u3 = _mm512_castps_pd(_mm512_unpackhi_ps(a[2], a[3]));
    _mm512_storeu_ps(dst + (4 * j + 0) * ds, _mm512_castpd_ps(_mm512_unpacklo_pd(u0, u2)));
    _mm512_storeu_ps(dst + (4 * j + 1) * ds, _mm512_castpd_ps(_mm512_unpackhi_pd(u0, u2)));
    _mm512_storeu_ps(dst + (4 * j + 2) * ds, _mm512_castpd_ps(_mm512_unpacklo_pd(u1, u3)));
    _mm512_storeu_ps(dst + (4 * j + 3) * ds, _mm512_castpd_ps(_mm512_unpackhi_pd(u1, u3)));
  }
}

// Variant v of packing np pixels x nc channels (np, nc multiples of 16):
// 0 = transpose_2d (in use); 1 = masked broadcasts; 2..4 = one channel group in v gathered.
void pack(int v, const float* src, int64_t ss, int64_t np, int64_t nc, float* dst, int64_t ds) {
  if (v == 0) return transpose_2d(src, ss, np, nc, dst, ds);
  const __m512i idx = pixel_offsets(ss);
  for (int64_t p0 = 0; p0 < np; p0 += 16)
    for (int64_t c0 = 0; c0 < nc; c0 += 16) {
      const float* s = src + p0 * ss + c0;
      float* d = dst + c0 * ds + p0;
      if (v == 1) {
        tile_broadcasts(s, ss, d, ds);
      } else if ((c0 / 16) % v == v - 1) {
        for (int c = 0; c < 16; ++c)
          _mm512_storeu_ps(d + c * ds, _mm512_i32gather_ps(idx, s + c, 4));
      } else {
        transpose_tile16(s, ss, 16, 16, d, ds);
      }
    }
}

template <class F>
double best_us(F&& f) {
  double best = 1e30;
  for (int r = 0; r < 200; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, us);
  }
  return best;
}

// Packs a C x HW channels_last map band by band (band pixels each) with variant v; checks the
// last band against the source. Returns ns per tile.
double run(int v, int C, int HW, int band) {
  std::vector<float> x(static_cast<size_t>(C) * HW);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 1000);
  AlignedBufferLike buf(static_cast<size_t>(C) * band);
  const double us = best_us([&] {
    for (int p0 = 0; p0 + band <= HW; p0 += band)
      pack(v, x.data() + static_cast<size_t>(p0) * C, C, band, C, buf.data, band);
  });
  const int p0 = (HW / band - 1) * band;
  for (int c = 0; c < C; ++c)
    for (int p = 0; p < band; ++p)
      if (buf.data[static_cast<size_t>(c) * band + p] != x[static_cast<size_t>(p0 + p) * C + c]) {
        std::printf("variant %d: wrong element c %d p %d\n", v, c, p);
        std::exit(1);
      }
  return us * 1e3 / (static_cast<double>(C) * (HW / band * band) / 256);
}

}  // namespace

int main() {
  const char* names[] = {"64 shuffles (transpose_2d, in use)", "masked broadcasts + in-lane 4x4",
                         "1 group in 2 gathered", "1 group in 3 gathered", "1 group in 4 gathered"};
  std::printf("| variant | 32 ch x 128 px (in L1) | 128 ch x 3024 px, 672-px bands | 512 ch x 160 px |\n");
  std::printf("|---|---:|---:|---:|\n");
  for (int v = 0; v < 5; ++v)
    std::printf("| %s | %.1f ns | %.1f ns | %.1f ns |\n", names[v], run(v, 32, 128, 128),
                run(v, 128, 3024, 672), run(v, 512, 160, 160));

  // RGB: dense pixels of 3 channels into CHW rows, by the permutes gather_columns uses for
  // them (deinterleave_columns) against 16-lane gathers.
  const int np = 224 * 16;
  std::vector<float> rgb(3 * np);
  for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<float>(i);
  std::vector<float> out(3 * np);
  const __m512i idx = pixel_offsets(3);
  auto check = [&](const char* what) {
    for (int c = 0; c < 3; ++c)
      for (int p = 0; p < np; ++p)
        if (out[static_cast<size_t>(c) * np + p] != rgb[static_cast<size_t>(p) * 3 + c]) {
          std::printf("rgb %s: wrong element\n", what);
          std::exit(1);
        }
    std::fill(out.begin(), out.end(), -1.0f);
  };
  const double perm = best_us([&] { deinterleave_columns(rgb.data(), np, 3, out.data(), np); });
  check("permutes");
  const double gath = best_us([&] {
    for (int p0 = 0; p0 < np; p0 += 16)
      for (int c = 0; c < 3; ++c)
        _mm512_storeu_ps(out.data() + c * np + p0,
                         _mm512_i32gather_ps(idx, rgb.data() + p0 * 3 + c, 4));
  });
  check("gathers");
  std::printf("\nRGB 3 x %d pixels, per 16-pixel channel vector: permutes %.2f ns, gathers %.2f ns\n",
              np, perm * 1e3 / (3.0 * np / 16), gath * 1e3 / (3.0 * np / 16));
  return 0;
}
