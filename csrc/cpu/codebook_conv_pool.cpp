// CPU codebook_conv2d_max_pool: max_pool2d(act(conv2d(x, W) + b)) with W in the resident codebook
// form, in one parallel region. Why: SqueezeNet's conv1 writes a 64 x 111 x 111 map (3.2 MB) that
// the next max-pool reads back once; both passes went through L3 and cost more than the conv's
// arithmetic. Here each task computes a band of conv rows into a per-thread buffer (sized to stay
// in L2) and pools it right away, so only the pooled map (a quarter) is written.
//
// Bands are bands of pooled rows: P pooled rows need the conv rows [p0 * sp, (p1 - 1) * sp + kp),
// so adjacent bands share kp - sp conv rows, which are computed twice (conv1 of SqueezeNet 1.1:
// 1 row of 9). The conv part is codebook_conv2d's (same packing, micro-kernels, quads, K-blocking),
// the pool part max_pool2d's per-plane routines.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <vector>

#include "codebook.h"
#include "memory_format.h"
#include "cpu/codebook_spmm.h"
#include "cpu/max_pool_plane.h"

namespace sqz {
namespace codebook {
namespace {

constexpr int64_t kBandBytes = 384 * 1024;      // packed input band per task (as codebook_conv2d)
// Conv output of a band, pooled while in L2 (1 MB per core here). Same-process A/B of conv1 +
// first pool, 2 threads: 256 KB 1.4x faster than unfused on SqueezeNet 1.1 but 1.2x slower on 1.0
// (96 channels: bands of 2 pooled rows recompute 2 of every 5 conv rows), 512 KB 1.4x / 1.15x,
// 900 KB no better; 64-128 KB (1 pooled row per band) even with unfused.
// SQZ_CONV_POOL_BAND_BYTES overrides it (tuning).
inline int64_t conv_band_bytes() {
  const char* e = std::getenv("SQZ_CONV_POOL_BAND_BYTES");
  return e ? std::max<int64_t>(1, std::atoll(e)) : 512 * 1024;
}


// g: the conv; pg: the pool over the conv output (N, C = O, H = Ho, W = Wo; no padding).
template <typename T>
void conv_pool_forward_t(const T* x, const int64_t* xs, const ConvGeom& g, const pool::PoolGeom& pg,
                         const Stream& s, const T* cb, const T* bias, bool relu, T* out,
                         const int64_t* os, const char* op) {
  const Kernel<T> k = select_kernel<T>(active_isa());
  const int64_t C = g.C;
  const int64_t extra_rows = (g.kh - 1) / g.sh;
  const int64_t planes = g.kw * g.sh;
  const int64_t nthreads = at::get_num_threads();
  auto conv_rows_of = [&](int64_t P) { return std::min(g.Ho, (P - 1) * pg.sh + pg.kh); };

  // Pooled rows per band: the largest P whose conv band and packed input band fit their budgets.
  const int64_t in_row_bytes = planes * C * round_up(g.Wo, kVec) * static_cast<int64_t>(sizeof(T));
  const int64_t out_row_bytes = g.O * g.Wo * static_cast<int64_t>(sizeof(T));
  const int64_t conv_budget = conv_band_bytes();
  int64_t P = 1;
  while (P < pg.Ho && conv_rows_of(P + 1) * out_row_bytes <= conv_budget &&
         (conv_rows_of(P + 1) + extra_rows) * in_row_bytes <= kBandBytes)
    ++P;
  int64_t nb = ceil_div(pg.Ho, P);
  if (g.N * nb < nthreads) nb = std::min(pg.Ho, ceil_div(nthreads, g.N));
  P = ceil_div(pg.Ho, nb);
  if (g.N * nb >= nthreads) P = balanced_band_rows(pg.Ho, g.N, P, nthreads);
  nb = ceil_div(pg.Ho, P);
  const EvenBands bands{pg.Ho, nb};  // of pooled rows
  P = bands.largest();
  int64_t ob = 1;
  if (g.N * nb < nthreads) ob = std::min(g.O, ceil_div(nthreads, g.N * nb));
  const int64_t OB = ceil_div(g.O, ob);
  ob = ceil_div(g.O, OB);

  const int64_t CR = conv_rows_of(P);  // conv rows of the largest band
  const Layout lay = make_layout(C, g.kh, g.kw, g.sh, CR, g.Wo);
  const int64_t pitch = lay.pitch;
  ConvRows<T> cr = conv_rows(op, s, g, cb, k);
  set_table(cr, g, lay, op);
  Rows<T>& L = cr.L;
  const int64_t step = tile_step(k, CR * pitch);
  const int64_t cch = chunk_channels<T>(C, planes, step, extra_rows * pitch, s.codes.numel(), g.O,
                                           l1_kblocks(L, k));
  set_blocks(L, C, g.kh * g.kw, cch);
  const int64_t conv_plane = CR * g.Wo;  // one channel of the band's conv output
  const bool fast = pool::fast3s2_applies<T>(pg, k.wide);

  at::parallel_for(0, g.N * nb * ob, 1, [&](int64_t b, int64_t e) {
    AlignedBuffer<T> buf(lay.elems);
    // every element the pool reads is written by the band's epilogue first: no zero fill
    std::unique_ptr<T[]> conv(new T[static_cast<size_t>(g.O * conv_plane)]);
    Scratch<T> part;
    std::vector<T> tmp;
    std::vector<Walk> walk;
    std::vector<T> row = pool::plane_scratch<T>(pg);
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / (nb * ob), band = (t / ob) % nb, blk = t % ob;
      const int64_t p0 = bands.start(band), p1 = bands.start(band + 1);
      const int64_t o0 = blk * OB, o1 = std::min(g.O, o0 + OB);
      if (p0 >= p1 || o0 >= o1) continue;
      const int64_t r0 = p0 * pg.sh;
      const int64_t rows = std::min(g.Ho, (p1 - 1) * pg.sh + pg.kh) - r0;
      pack_band(x + n * xs[0], xs[1], xs[2], xs[3], C, g.H, g.W, r0 * g.sh, g.kw, g.sh, g.sw, g.ph,
                g.pw, g.Wo, lay, buf.data());
      const Epilogue<T> ep{conv.get(), conv_plane, g.Wo, 1, pitch, g.Wo, bias, relu};
      spmm_rows(k, buf.data(), L, o0, o1, rows * pitch, OutSink<T>{ep, k.wide}, part, walk);
      // the band's pool: local rows [0, rows); ceil_mode windows are cut only at the real bottom
      const pool::PoolGeom bg{1, 1, rows, g.Wo, pg.kh, pg.kw, pg.sh, pg.sw, 0, 0, p1 - p0, pg.Wo};
      pool::pool_band(conv.get(), conv_plane, bg, o0, o1, out + n * os[0] + p0 * os[2], os, tmp, row,
                      k.wide, fast);
    }
  });
}

at::Tensor codebook_conv2d_max_pool_cpu(const at::Tensor& x, const at::Tensor& codebook,
                                        const at::Tensor& codes, const at::Tensor& gaps,
                                        const at::Tensor& row_counts,
                                        const c10::optional<at::Tensor>& bias,
                                        at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, bool relu,
                                        at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
                                        bool pool_ceil_mode) {
  const char* op = "codebook_conv2d_max_pool";
  const Stream s{codebook, codes, gaps, row_counts, bias};
  const ConvGeom g = checked_conv_geom(op, x, s, kernel_size, stride, padding);
  const pool::PoolGeom pg = pool::checked_pool_geom(op, "conv", g.N, g.O, g.Ho, g.Wo, pool_kernel,
                                                     pool_stride, pool_ceil_mode);
  at::Tensor out = at::empty({g.N, g.O, pg.Ho, pg.Wo},
                             x.options().memory_format(sqz::output_memory_format(x)));
  if (g.N == 0) {  // nothing to compute, but the stream is still validated
    (void)validate_stream(op, "", s, g.C * g.kh * g.kw);
    return out;
  }
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t ost[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  const at::Tensor cb = codebook.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "codebook_conv2d_max_pool", [&] {
    conv_pool_forward_t<scalar_t>(x.data_ptr<scalar_t>(), xs, g, pg, s, cb.data_ptr<scalar_t>(),
                                  b.defined() ? b.data_ptr<scalar_t>() : nullptr, relu,
                                  out.data_ptr<scalar_t>(), ost, op);
  });
  return out;
}

}  // namespace
}  // namespace codebook
}  // namespace sqz

TORCH_LIBRARY_IMPL(sqz_kernels, CPU, m) {
  m.impl("codebook_conv2d_max_pool", &sqz::codebook::codebook_conv2d_max_pool_cpu);
}
