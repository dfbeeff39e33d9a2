// CPU codebook_conv2d: a k x k conv (stride s, padding p) executing the resident compressed weight
// (codebook + uint8 codes + uint8 relative gaps + int32 row counts) directly, without a dense
// float weight. See codebook_spmm.h for the kernel structure. Also codebook_conv2d_global_avg_pool,
// the same driver with an epilogue that sums the tiles instead of storing them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "codebook.h"
#include "memory_format.h"
#include "cpu/codebook_spmm.h"

namespace sqz {
namespace codebook {

namespace {
constexpr int64_t kBandBytes = 384 * 1024;  // packed input band budget per task (L2: 1 MB a core)
// A flat layer over a channels_last x: bands of the packed (transposed) channels within this, but
// of at least kClBandMinPixels pixels (see conv_forward_t).
constexpr int64_t kClBandBytes = 96 * 1024;
constexpr int64_t kClBandMinPixels = 160;


// codebook_conv2d_global_avg_pool's sink: instead of storing a tile, adds act(tile + bias) over
// its valid pixels (column < out_w of rows in_w apart) to sums[o]. Takes raw tiles of whole row
// blocks (row_blocks), so the AVX-512 rows kernel and its quads run as for a stored output.
template <typename T>
struct MeanSink {
  T* sums;  // [O] of one (image, band); each (image, band, o) belongs to one task
  int64_t in_w, out_w;
  const T* bias;
  bool relu, wide;

  // Scalar: the column is carried along, not recomputed with a division per pixel.
  void store(const T* acc, int64_t q0, int len, int64_t o) const {
    const T b = bias ? bias[o] : T(0);
    T total = T(0);
    int64_t col = q0 % in_w;
    for (int64_t i = 0; i < len; ++i) {
      if (col < out_w) {
        T v = acc[i] + b;
        if (relu && v < T(0)) v = T(0);  // NaN stays NaN, like torch.relu
        total += v;
      }
      if (++col == in_w) col = 0;
    }
    sums[o] += total;
  }
  bool row_blocks() const { return true; }
  void store_rows(T* part, int64_t ld, int64_t q0, int len, int64_t o0, int64_t o1) const {
#if defined(__AVX512F__)
    if constexpr (std::is_same<T, float>::value) {
      if (wide && in_w % 16 == 0 && q0 % 16 == 0 && len % 16 == 0) {  // a vector never spans two rows
        // The valid-column masks of the tile, once for all its rows: a 64-bit division per vector
        // and row was ~20 % of a layer with 32 entries per row (perf, 1 thread).
        __mmask16 m[kMaxTile / 16];
        const int nv = len / 16;
        for (int v = 0, col = static_cast<int>(q0 % in_w); v < nv; ++v) {
          const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(16, out_w - col));
          m[v] = valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1u);
          col += 16;
          if (col == in_w) col = 0;
        }
        const __m512 z = _mm512_setzero_ps();
        for (int64_t o = o0; o < o1; ++o) {
          const float* acc = part + (o - o0) * ld;
          const __m512 vb = _mm512_set1_ps(bias ? bias[o] : 0.0f);
          __m512 sum = z;
          for (int v = 0; v < nv; ++v) {
            __m512 y = _mm512_add_ps(_mm512_loadu_ps(acc + 16 * v), vb);
            if (relu) y = _mm512_max_ps(z, y);  // max(0, NaN) = NaN, like torch.relu
            sum = _mm512_mask_add_ps(sum, m[v], sum, y);
          }
          sums[o] += _mm512_reduce_add_ps(sum);
        }
        return;
      }
    }
#endif
    for (int64_t o = o0; o < o1; ++o) store(part + (o - o0) * ld, q0, len, o);
  }
  bool plan(int64_t, int, TileDst<T>&) const { return false; }
};

// mean_out: null for codebook_conv2d (output at out, strides os); else the global average pool of
// the output, [N, O] at mean_out (os then only describes a virtual NCHW output for the layout
// choice). Each task adds into its own per-(image, band) partial sums, reduced after the parallel
// region: no two tasks write the same sum.
template <typename T>
void conv_forward_t(const T* x, const int64_t* xs, const ConvGeom& g, const Stream& s, const T* cb,
                    const T* bias, bool relu, T* out, const int64_t* os, const char* op,
                    int64_t readable, T* mean_out = nullptr) {
  const Kernel<T> k = select_kernel<T>(active_isa());
  const int64_t C = g.C;
  const int64_t extra_rows = (g.kh - 1) / g.sh;  // plane rows = band rows + extra_rows
  const int64_t planes = g.kw * g.sh;             // copies x phases of the aligned layout
  // A 1x1 stride-1 unpadded conv whose pixels are evenly strided in x and in out (NCHW or
  // channels_last, rows not padded) has no halo: a band of rows is one flat run of pixels per
  // channel, with no pitch padding per row (13x13: 11 vectors instead of 13).
  const bool flat = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 &&
                    (g.H == 1 || xs[2] == g.W * xs[3]) && (g.Ho == 1 || os[2] == g.Wo * os[3]) &&
                    (xs[3] == 1 || xs[1] == 1);
  const int64_t row_pitch = round_up(g.Wo, kVec);  // of one output row (band sizing)
  const int64_t nthreads = at::get_num_threads();
  ConvRows<T> cr = conv_rows(op, s, g, cb, k);
  Rows<T>& L = cr.L;
  const bool cl_input = pixel_major(xs[1], xs[3]) && C > 4;
  // channels_last x: pack only the channels the rows reach (when few are; see used_channels)
  std::vector<uint8_t> used_keep;
  const uint8_t* used = used_channels(L, g.O, C, g.kh * g.kw, k, cl_input, g.H * g.W, used_keep);

  // Bands of output rows: the packed band fits the budget; enough (image, band) tasks for the
  // threads; split output channels only when there are still too few.
  const int64_t row_bytes = planes * C * row_pitch * static_cast<int64_t>(sizeof(T));
  // A map that fits one pixel tile is split by output channels, not bands: bands would only
  // shorten the tiles (fewer vectors per stored weight). Except where every thread would then pack
  // the whole input: over a channels_last x (each thread transposing it, and the 3 column copies
  // of a 3x3), and for a squeeze-like layer (O <= C), whose input is the bulk of its work. Bands
  // split that. Same-process A/B, 2 threads, SqueezeNet 1.0 / 1.1's 13x13 layers at 10-100 %,
  // unstructured and block-4 (those with row quads were already in bands, see whole_map:
  // 0.97-1.01x): channels_last squeezes 1.08-1.32x, 1x1 expands 0.98-1.28x (mostly 1.02-1.09x),
  // 3x3 expands 1.00-1.16x, the classifier 1.06-1.18x; NCHW squeezes 1.02-1.15x. (NCHW 1x1
  // expands in bands: 0.63-0.94x.)
  const bool one_tile = g.Ho * row_pitch <= k.tile && g.O >= 16 * nthreads && !cl_input &&
                        !(C > 4 && g.O <= C);
  // Such a flat map stays one band even when its packed input exceeds the budget (up to twice
  // it), unless the layer has row quads. SqueezeNet's classifier (512 channels x 13 x 13) ran as
  // two bands of 6 / 5 vectors; as one 11-vector tile split by output channels, the row kernel
  // amortises each entry's scalar work over twice the multiply-adds. Same-process A/B at 33 %:
  // 1.13x / 1.17x (2 threads), 1.14x (1 thread). Quads walk at most 7 vectors per chunk (an
  // 11-vector tile takes two walks), so for them the two bands stay (block-4 classifier 0.97x as
  // one band).
  const bool whole_map =
      flat && one_tile && L.quads == nullptr && g.Ho * row_bytes <= 2 * kBandBytes;
  const int64_t bmax_budget =
      whole_map ? g.Ho
                : std::max<int64_t>(1, kBandBytes / std::max<int64_t>(1, row_bytes) - extra_rows);
  // Bands of a map larger than one pixel tile hold at most max(8, one tile's) rows: a 27x27 3x3
  // layer ran as two 14-row bands (two tiles each) within the budget; as 8-row bands (one tile):
  // same-process A/B, 2 threads, SqueezeNet 1.1's 27x27 expand3x3 unstructured 1.04-1.16x (block-4
  // 0.99-1.03x), 55x55 expand3x3 and conv1 0.96-1.04x. (Bands of one tile's rows, 4 at 55x55, as
  // the Fire takes: 55x55 0.93-0.99x, conv1 0.86-1.01x.) AVX-512 float kernels only (their tile).
  int64_t bmax = k.wide && !flat && g.Ho * row_pitch > k.tile
                     ? std::min(bmax_budget, std::max<int64_t>(8, k.tile / row_pitch))
                     : bmax_budget;
  // A flat squeeze-like layer (O <= C) over a wide channels_last x transposes each band into its
  // buffer and then reads it back tile by tile: bands of at most kClBandBytes of packed channels
  // (the used ones, see used_channels), but of >= kClBandMinPixels pixels (shorter tiles cost more
  // per entry than the smaller buffer saves). The 384 KB budget gave 128 channels 672-pixel bands
  // of 344 KB. Same-process A/B, 2 threads, 21 rounds, the 55x55 squeezes of SqueezeNet 1.0 / 1.1
  // in channels_last at 10 / 33 / 100 %, unstructured and block-4 (30 cases): 128 input channels
  // 1.00-1.15x, 96 0.99-1.08x, 64 0.94-1.05x, geometric mean 1.04x. Not for narrower maps (27x27
  // squeezes, 6-row bands: 0.92-1.06x) or the 1x1 expands (0.93-1.09x, mean ~1.0).
  if (flat && cl_input && k.wide && g.O <= C && g.W >= 32) {
    int64_t packed = C;
    if (used) packed = std::count_if(used, used + C, [](uint8_t u) { return u != 0; });
    const int64_t row_packed = std::max<int64_t>(1, packed * g.W * static_cast<int64_t>(sizeof(T)));
    bmax = std::min(bmax, std::max(kClBandBytes / row_packed, ceil_div(kClBandMinPixels, g.W)));
  }
  int64_t nb = ceil_div(g.Ho, bmax);
  if (g.N * nb < nthreads && !one_tile) nb = std::min(g.Ho, ceil_div(nthreads, g.N));
  int64_t B = ceil_div(g.Ho, nb);
  if (g.N * nb >= nthreads) B = balanced_band_rows(g.Ho, g.N, B, nthreads);
  nb = ceil_div(g.Ho, B);
  // Even bands (same-process A/B, 2 threads: SqueezeNet 1.1's conv1 without its pool 1.26x over
  // bands of B rows and a short last one).
  const EvenBands bands{g.Ho, nb};
  B = bands.largest();
  int64_t ob = 1;
  if (g.N * nb < nthreads) ob = std::min(g.O, ceil_div(nthreads, g.N * nb));
  const int64_t OB = ceil_div(g.O, ob);
  ob = ceil_div(g.O, OB);

  // flat: one plane row per channel holding the band's B * Wo pixels
  const Layout lay = flat ? make_layout(C, 1, 1, 1, 1, B * g.Wo) : make_layout(C, g.kh, g.kw, g.sh, B, g.Wo);
  const int64_t pitch = lay.pitch;
  set_table(cr, g, lay, op);

  const int64_t step = tile_step(k, flat ? pitch : B * pitch);
  // L1-sized K-blocks from 64 rows (see chunk_channels); a squeeze-like layer over a
  // channels_last x takes them as the Fire's layers do, from 16 rows of >= 32 entries: its slab
  // comes from the band buffer it just transposed. Same-process A/B, 2 threads, unstructured
  // channels_last squeezes of SqueezeNet 1.0 / 1.1 at 33 %: 27x27 and 13x13 ones up to 1.18x
  // (1.0's fire4-7 1.12-1.18x, 1.1's fire5 / fire7 1.08-1.16x), the others 0.98-1.02x; at 10 %
  // (rows of < 32 entries) and 100 % unchanged. (In NCHW, 16-row squeezes lost 4-8 %, round 11.)
  const bool cl_squeeze = cl_input && g.O <= C;
  const int64_t cch = chunk_channels<T>(C, planes, step, extra_rows * pitch, s.codes.numel(), g.O,
                                        l1_kblocks(L, k), cl_squeeze ? 16 : 64,
                                        cl_squeeze ? 32 : 0);
  set_blocks(L, C, g.kh * g.kw, cch);
  // A flat squeeze-like layer (O <= C) over NCHW x (pixels contiguous, rows W apart) reads x in
  // place: a band is one run of rows * W pixels per channel, so the kernels walk x itself with
  // channel offsets c * xs[1] (same streams, blocks and quads) instead of a packed copy of the
  // band; a band whose run, rounded up to whole vectors, would read past the end of x's storage
  // (`readable` elements from x) is packed as before. The copy was ~37 % of a 55x55 squeeze's
  // samples (1 thread), but x's runs are not 64-byte aligned, so each vector load from them spans
  // two cache lines: it pays only while the row kernels load each input vector a few times
  // (vector_loads) and the map has >= 256 pixels. Same-process A/B, 2 threads, NCHW 1x1 convs
  // of SqueezeNet 1.0 / 1.1: 55x55 / 54x54 squeezes 1.12-1.93x at 10 % (1.2-1.4x block-4 at
  // 33 %), 27x27 ones 1.05-1.26x at 10 %; at 3.5 loads per input vector and beyond they lost up to
  // 28 % (1.0's 27x27 squeezes at 33 %), 13x13 maps 1-8 %, the 1x1 expands (O > C) 0-3 %.
  const bool in_place = flat && xs[3] == 1 && g.O <= C && g.H * g.W >= 256 &&
                        vector_loads(L, g.O) <= 3.5 * static_cast<double>(C) &&
                        channel_offsets_fit(C, xs[1], g.H * g.W);
  std::vector<int32_t> t_x;
  const Rows<T> L_x = channel_offset_rows(L, C, xs[1], in_place, t_x);
  const int64_t tasks = g.N * nb * ob;
  std::vector<T> sums(mean_out ? static_cast<size_t>(g.N * nb * g.O) : 0, T(0));
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    AlignedBuffer<T> buf(lay.elems);
    Scratch<T> part;
    std::vector<Walk> walk;
    // Rows [o0, o1) over the first npix pixels of `in` (the packed band, or x in place, each with
    // its address table in rl): stored through ep, or (mean) summed into the (image, band)'s
    // partial sums over ep's valid columns.
    auto emit = [&](const T* in, const Rows<T>& rl, const Epilogue<T>& ep, int64_t npix,
                    int64_t n, int64_t band, int64_t o0, int64_t o1) {
      if (mean_out) {
        const MeanSink<T> ms{sums.data() + (n * nb + band) * g.O, ep.in_w, ep.out_w, bias, relu,
                             k.wide};
        spmm_rows(k, in, rl, o0, o1, npix, ms, part, walk);
      } else {
        spmm_rows(k, in, rl, o0, o1, npix, OutSink<T>{ep, k.wide}, part, walk);
      }
    };
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / (nb * ob);
      const int64_t band = (t / ob) % nb;
      const int64_t blk = t % ob;
      const int64_t r0 = bands.start(band);
      const int64_t rows = bands.start(band + 1) - r0;
      const int64_t o0 = blk * OB, o1 = std::min(g.O, o0 + OB);
      if (rows <= 0 || o0 >= o1) continue;
      T* on = out ? out + n * os[0] + r0 * os[2] : nullptr;  // null: mean_out
      if (flat) {
        const int64_t npix = rows * g.W, x0 = n * xs[0] + r0 * xs[2];
        const Epilogue<T> ep{on, os[1], 0, os[3], pitch, npix, bias, relu};
        if (in_place && runs_readable(x0, C, xs[1], npix, readable)) {
          emit(x + x0, L_x, ep, round_up(npix, kVec), n, band, o0, o1);
          continue;
        }
        // the band as a 1 x npix image (pixel stride xs[3]), packed by the usual routine
        pack_band(x + x0, xs[1], 0, xs[3], C, 1, npix, 0, 1, 1, 1, 0, 0, npix, lay, buf.data(),
                  used);
        emit(buf.data(), L, ep, round_up(npix, kVec), n, band, o0, o1);
        continue;
      }
      pack_band(x + n * xs[0], xs[1], xs[2], xs[3], C, g.H, g.W, r0 * g.sh, g.kw, g.sh, g.sw,
                g.ph, g.pw, g.Wo, lay, buf.data(), used);
      emit(buf.data(), L, Epilogue<T>{on, os[1], os[2], os[3], pitch, g.Wo, bias, relu},
           rows * pitch, n, band, o0, o1);
    }
  });
  if (!mean_out) return;
  const T inv = T(1) / static_cast<T>(g.Ho * g.Wo);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t o = 0; o < g.O; ++o) {
      T total = T(0);
      for (int64_t band = 0; band < nb; ++band) total += sums[(n * nb + band) * g.O + o];
      mean_out[n * g.O + o] = total * inv;
    }
}

}  // namespace

void conv_forward(const at::Tensor& x, const int64_t* xs, const ConvGeom& g, const Stream& s,
                  bool relu, at::Tensor& out, const int64_t* os, const char* op, bool mean) {
  if (g.N == 0) {  // nothing to compute, but the stream is still validated
    (void)validate_stream(op, "", s, g.C * g.kh * g.kw);
    return;
  }
  const at::Tensor cb = s.codebook.contiguous();
  const at::Tensor b = s.bias.has_value() ? s.bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "codebook_conv2d", [&] {
    scalar_t* y = out.data_ptr<scalar_t>();
    conv_forward_t<scalar_t>(x.data_ptr<scalar_t>(), xs, g, s, cb.data_ptr<scalar_t>(),
                             b.defined() ? b.data_ptr<scalar_t>() : nullptr, relu,
                             mean ? nullptr : y, os, op, readable_elems(x), mean ? y : nullptr);
  });
}

namespace {

at::Tensor codebook_conv2d_cpu(const at::Tensor& x, const at::Tensor& codebook,
                               const at::Tensor& codes, const at::Tensor& gaps,
                               const at::Tensor& row_counts, const c10::optional<at::Tensor>& bias,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, bool relu) {
  const char* op = "codebook_conv2d";
  const Stream s{codebook, codes, gaps, row_counts, bias};
  const ConvGeom g = checked_conv_geom(op, x, s, kernel_size, stride, padding);
  at::Tensor out = at::empty({g.N, g.O, g.Ho, g.Wo},
                             x.options().memory_format(sqz::output_memory_format(x)));
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t ost[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  conv_forward(x, xs, g, s, relu, out, ost, op);
  return out;
}

// The conv's output is never written: each tile is summed into per-(image, band) partial sums in
// the epilogue (MeanSink). SqueezeNet's classifier conv (1000 x 13 x 13) + AdaptiveAvgPool2d(1).
at::Tensor codebook_conv2d_global_avg_pool_cpu(const at::Tensor& x, const at::Tensor& codebook,
                                               const at::Tensor& codes, const at::Tensor& gaps,
                                               const at::Tensor& row_counts,
                                               const c10::optional<at::Tensor>& bias,
                                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                               at::IntArrayRef padding, bool relu) {
  const char* op = "codebook_conv2d_global_avg_pool";
  const Stream s{codebook, codes, gaps, row_counts, bias};
  const ConvGeom g = checked_conv_geom(op, x, s, kernel_size, stride, padding);
  at::Tensor out = at::empty({g.N, g.O, 1, 1}, x.options());
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  // the layout choice sees a contiguous NCHW output (its strides only decide the flat 1x1 path)
  const int64_t ost[4] = {g.O * g.Ho * g.Wo, g.Ho * g.Wo, g.Wo, 1};
  conv_forward(x, xs, g, s, relu, out, ost, op, /*mean=*/true);
  return out;
}

}  // namespace
}  // namespace codebook
}  // namespace sqz

TORCH_LIBRARY_IMPL(sqz_kernels, CPU, m) {
  m.impl("codebook_conv2d", &sqz::codebook::codebook_conv2d_cpu);
  m.impl("codebook_conv2d_global_avg_pool", &sqz::codebook::codebook_conv2d_global_avg_pool_cpu);
}
