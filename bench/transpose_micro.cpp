// Stand-alone micro-benchmark of the channels_last -> CHW packing the codebook kernels do
// (docs/codebook_kernels.md, round 13): 16x16 float transposes of a channels_last x into a band
// buffer, in variants (rounds 13-14), and the RGB deinterleave against 16-lane gathers. 1 thread, best of 200
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

// transpose_2d with a software prefetch of the 16 source rows `ahead` pixels on (round 14: no
// faster; the source is read in order and the hardware prefetchers already follow it).
void transpose_2d_prefetch(const float* src, int64_t ss, int64_t np, int64_t nc, float* dst,
                           int64_t ds, int64_t ahead) {
  for (int64_t p0 = 0; p0 < np; p0 += 16)
    for (int64_t c0 = 0; c0 < nc; c0 += 16) {
      if (p0 + ahead + 16 <= np)
        for (int r = 0; r < 16; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(src + (p0 + ahead + r) * ss + c0), _MM_HINT_T0);
      transpose_tile16(src + p0 * ss + c0, ss, std::min<int64_t>(16, np - p0),
                       std::min<int64_t>(16, nc - c0), dst + c0 * ds + p0, ds);
    }
}

// Variant v of packing np pixels x nc channels (np, nc multiples of 16):
// 0 = transpose_2d (in use); 1 = masked broadcasts; 2..4 = one channel group in v gathered;
// 5 / 6 = transpose_2d with a prefetch 16 / 32 pixels ahead.
void pack(int v, const float* src, int64_t ss, int64_t np, int64_t nc, float* dst, int64_t ds) {
  if (v == 0) return transpose_2d(src, ss, np, nc, dst, ds);
  if (v >= 5) return transpose_2d_prefetch(src, ss, np, nc, dst, ds, 16 * (v - 4));
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
// A channels_last map of C x HW floats, 64-byte aligned like a torch tensor's storage (a
// std::vector's data may start 16 bytes into a cache line; each 16-float row load then spans two
// lines, which made the tiles 10-30 % slower here, round 14).
struct Map {
  Map(int C, int HW) : buf(static_cast<size_t>(C) * HW), n(static_cast<size_t>(C) * HW) {
    for (size_t i = 0; i < n; ++i) buf.data[i] = static_cast<float>(i % (1 << 24));  // exact: the checks compare positions
  }
  float operator[](size_t i) const { return buf.data[i]; }
  const float* data() const { return buf.data; }
  AlignedBufferLike buf;
  size_t n;
};

double run(int v, int C, int HW, int band) {
  const Map x(C, HW);
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
                         "1 group in 2 gathered", "1 group in 3 gathered", "1 group in 4 gathered",
                         "prefetch 16 px ahead", "prefetch 32 px ahead"};
  std::printf("| variant | 32 ch x 128 px (in L1) | 128 ch x 3024 px, 672-px bands | 512 ch x 160 px |\n");
  std::printf("|---|---:|---:|---:|\n");
  for (int v = 0; v < 7; ++v)
    std::printf("| %s | %.1f ns | %.1f ns | %.1f ns |\n", names[v], run(v, 32, 128, 128),
                run(v, 128, 3024, 672), run(v, 512, 160, 160));

  // fire3.squeeze's geometry again, its band buffer (344 KB, in L2) against K-blocks of 16 / 32
  // channels of one 256-pixel tile transposed into an L1 buffer and consumed there (round 14:
  // no faster; the time is in reading the source, not in writing the destination).
  {
    const int C = 128, HW = 3024;
    const Map x(C, HW);
    AlignedBufferLike tile(static_cast<size_t>(32) * 256);
    std::printf("\n128 ch x 3024 px:");
    for (int cb : {16, 32}) {
      const double us = best_us([&] {
        for (int p0 = 0; p0 + 256 <= HW; p0 += 256)
          for (int c0 = 0; c0 < C; c0 += cb)
            transpose_2d(x.data() + static_cast<size_t>(p0) * C + c0, C, 256, cb, tile.data, 256);
      });
      // the last tile's block, checked (and so kept: its stores are not dead)
      const int p0 = (HW / 256 - 1) * 256, c0 = C - cb;
      for (int c = 0; c < cb; ++c)
        for (int p = 0; p < 256; ++p)
          if (tile.data[c * 256 + p] != x[static_cast<size_t>(p0 + p) * C + c0 + c]) {
            std::printf("K-blocks: wrong element c %d p %d\n", c, p);
            std::exit(1);
          }
      std::printf(" %d-channel K-blocks of 256-px tiles into L1 %.1f ns;", cb,
                  us * 1e3 / (static_cast<double>(C) * (HW / 256 * 256) / 256));
    }
    std::printf(" (672-px bands: row 1 above)\n");
  }

  // RGB: dense pixels of 3 channels into CHW rows, by the permutes gather_columns uses for
  // them (deinterleave_columns) against 16-lane gathers.
  const int np = 224 * 16;
  const Map rgb(3, np);
  AlignedBufferLike out_buf(3 * static_cast<size_t>(np));
  float* const out_data = out_buf.data;
  struct {
    float* d;
    float& operator[](size_t i) { return d[i]; }
    float* data() { return d; }
  } out{out_data};
  const __m512i idx = pixel_offsets(3);
  auto check = [&](const char* what) {
    for (int c = 0; c < 3; ++c)
      for (int p = 0; p < np; ++p)
        if (out[static_cast<size_t>(c) * np + p] != rgb[static_cast<size_t>(p) * 3 + c]) {
          std::printf("rgb %s: wrong element\n", what);
          std::exit(1);
        }
    std::fill(out_data, out_data + 3 * np, -1.0f);
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
