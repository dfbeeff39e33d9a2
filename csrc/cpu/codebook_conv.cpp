// CPU codebook_conv2d: a k x k conv (stride s, padding p) executing the resident compressed weight
// (codebook + uint8 codes + uint8 relative gaps + int32 row counts) directly, without a dense
// float weight. See codebook_spmm.h for the kernel structure.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "codebook.h"
#include "memory_format.h"
#include "cpu/codebook_spmm.h"

namespace sqz {
namespace codebook {

namespace {
constexpr int64_t kBandBytes = 384 * 1024;  // packed input band budget per task (L2 is 2 MB)


template <typename T>
void conv_forward_t(const T* x, const int64_t* xs, const ConvGeom& g, const Stream& s, const T* cb,
                    const T* bias, bool relu, T* out, const int64_t* os, const char* op) {
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

  // Bands of output rows: the packed band fits the budget; enough (image, band) tasks for the
  // threads; split output channels only when there are still too few.
  const int64_t row_bytes = planes * C * row_pitch * static_cast<int64_t>(sizeof(T));
  const int64_t bmax = std::max<int64_t>(1, kBandBytes / std::max<int64_t>(1, row_bytes) - extra_rows);
  int64_t nb = ceil_div(g.Ho, bmax);
  // A map that fits one pixel tile is split by output channels, not bands: bands would only
  // shorten the tiles (fewer vectors per stored weight).
  const bool one_tile = g.Ho * row_pitch <= k.tile && g.O >= 16 * nthreads;
  if (g.N * nb < nthreads && !one_tile) nb = std::min(g.Ho, ceil_div(nthreads, g.N));
  int64_t B = ceil_div(g.Ho, nb);
  if (g.N * nb >= nthreads) B = balanced_band_rows(g.Ho, g.N, B, nthreads);
  nb = ceil_div(g.Ho, B);
  int64_t ob = 1;
  if (g.N * nb < nthreads) ob = std::min(g.O, ceil_div(nthreads, g.N * nb));
  const int64_t OB = ceil_div(g.O, ob);
  ob = ceil_div(g.O, OB);

  // flat: one plane row per channel holding the band's B * Wo pixels
  const Layout lay = flat ? make_layout(C, 1, 1, 1, 1, B * g.Wo) : make_layout(C, g.kh, g.kw, g.sh, B, g.Wo);
  const int64_t pitch = lay.pitch;
  ConvRows<T> cr = conv_rows(op, s, g, lay, cb, k);
  Rows<T>& L = cr.L;

  const int64_t step = tile_step(k, flat ? pitch : B * pitch);
  const int64_t cch = chunk_channels<T>(C, planes, step, extra_rows * pitch, s.codes.numel(), g.O);
  set_blocks(L, C, g.kh * g.kw, cch);
  const int64_t tasks = g.N * nb * ob;
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    AlignedBuffer<T> buf(lay.elems);
    std::vector<T> part;
    std::vector<Walk> walk;
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / (nb * ob);
      const int64_t band = (t / ob) % nb;
      const int64_t blk = t % ob;
      const int64_t r0 = band * B;
      const int64_t rows = std::min(B, g.Ho - r0);
      const int64_t o0 = blk * OB, o1 = std::min(g.O, o0 + OB);
      if (rows <= 0 || o0 >= o1) continue;
      T* on = out + n * os[0] + r0 * os[2];
      if (flat) {
        const int64_t npix = rows * g.W;
        // the band as a 1 x npix image (pixel stride xs[3]), packed by the usual routine
        pack_band(x + n * xs[0] + r0 * xs[2], xs[1], 0, xs[3], C, 1, npix, 0, 1, 1, 1, 0, 0, npix,
                  lay, buf.data());
        const Epilogue<T> ep{on, os[1], 0, os[3], pitch, npix, bias, relu};
        spmm_rows(k, buf.data(), L, o0, o1, round_up(npix, kVec), OutSink<T>{ep, k.wide}, part, walk);
        continue;
      }
      pack_band(x + n * xs[0], xs[1], xs[2], xs[3], C, g.H, g.W, r0 * g.sh, g.kw, g.sh, g.sw,
                g.ph, g.pw, g.Wo, lay, buf.data());
      const Epilogue<T> ep{on, os[1], os[2], os[3], pitch, g.Wo, bias, relu};
      spmm_rows(k, buf.data(), L, o0, o1, rows * pitch, OutSink<T>{ep, k.wide}, part, walk);
    }
  });
}

}  // namespace

void conv_forward(const at::Tensor& x, const int64_t* xs, const ConvGeom& g, const Stream& s,
                  bool relu, at::Tensor& out, const int64_t* os, const char* op) {
  if (g.N == 0) {  // nothing to compute, but the stream is still validated
    (void)validate_stream(op, "", s, g.C * g.kh * g.kw);
    return;
  }
  const at::Tensor cb = s.codebook.contiguous();
  const at::Tensor b = s.bias.has_value() ? s.bias->contiguous() : at::Tensor();
  if (x.scalar_type() == at::kFloat) {
    conv_forward_t<float>(x.data_ptr<float>(), xs, g, s, cb.data_ptr<float>(),
                          b.defined() ? b.data_ptr<float>() : nullptr, relu, out.data_ptr<float>(),
                          os, op);
  } else {
    conv_forward_t<double>(x.data_ptr<double>(), xs, g, s, cb.data_ptr<double>(),
                           b.defined() ? b.data_ptr<double>() : nullptr, relu,
                           out.data_ptr<double>(), os, op);
  }
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

}  // namespace
}  // namespace codebook
}  // namespace sqz

TORCH_LIBRARY_IMPL(sqz_kernels, CPU, m) {
  m.impl("codebook_conv2d", &sqz::codebook::codebook_conv2d_cpu);
}
