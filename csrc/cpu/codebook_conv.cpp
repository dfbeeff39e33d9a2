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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

template <typename T>
void conv_forward(const T* x, const int64_t* xs, const ConvGeom& g, const Stream& s, const T* cb,
                  const T* bias, bool relu, T* out, const int64_t* os, const char* op) {
  const Kernel<T> k = select_kernel<T>(active_isa());
  const int64_t C = g.C, H = g.H, W = g.W;
  const bool direct = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 &&
                      g.pw == 0 && (W == 1 || xs[3] == 1) && (H == 1 || xs[2] == W) &&
                      (C - 1) * xs[1] + H * W < std::numeric_limits<int32_t>::max();
  const int64_t plane_w = direct ? W : ceil_div(W + 2 * g.pw, g.sw);
  const int64_t extra_rows = (g.kh - 1) / g.sh;  // plane rows = band rows + extra_rows
  const int64_t nthreads = at::get_num_threads();

  // Bands of output rows: the packed band fits the budget; enough (image, band) tasks for the
  // threads; split output channels only when there are still too few.
  int64_t bmax = g.Ho;
  if (!direct) {
    const int64_t row_bytes = g.sh * g.sw * C * plane_w * static_cast<int64_t>(sizeof(T));
    bmax = std::max<int64_t>(1, kBandBytes / std::max<int64_t>(1, row_bytes) - extra_rows);
  }
  int64_t nb = ceil_div(g.Ho, bmax);
  if (g.N * nb < nthreads) nb = std::min(g.Ho, ceil_div(nthreads, g.N));
  const int64_t B = ceil_div(g.Ho, nb);
  nb = ceil_div(g.Ho, B);
  int64_t ob = 1;
  if (g.N * nb < nthreads) ob = std::min(g.O, ceil_div(nthreads, g.N * nb));
  const int64_t OB = ceil_div(g.O, ob);
  ob = ceil_div(g.O, OB);

  const int64_t plane_rows = B + extra_rows;
  const int64_t plane = plane_rows * plane_w;
  const int64_t slack = plane_w + kMaxTile;
  const int64_t buf_elems = direct ? 0 : g.sh * g.sw * C * plane + slack;
  TORCH_CHECK(buf_elems < std::numeric_limits<int32_t>::max(), op,
              ": input too large for 32-bit address offsets");

  const int64_t K = C * g.kh * g.kw;
  const RowStarts rs = validate_stream(op, "", s, K);
  // Per-call table: weight position (ci, ky, kx) -> input address offset (K int32).
  std::vector<int32_t> tab(K);
  for (int64_t ci = 0, pos = 0; ci < C; ++ci)
    for (int64_t ky = 0; ky < g.kh; ++ky)
      for (int64_t kx = 0; kx < g.kw; ++kx, ++pos)
        tab[pos] = static_cast<int32_t>(direct ? ci * xs[1]
                                               : tap_offset(ci, ky, kx, g.sh, g.sw, C, plane, plane_w));
  const at::Tensor gaps = s.gaps.contiguous(), codes = s.codes.contiguous();
  Rows<T> L{gaps.data_ptr<uint8_t>(), codes.data_ptr<uint8_t>(), rs.data(), tab.data(), cb};

  const int64_t halo = extra_rows * plane_w + (g.kw - 1) / g.sw;
  int tile = fit_tile(k, C * g.sh * g.sw, halo);
  const int64_t cch = chunk_channels(k, C, g.sh * g.sw, halo, B * plane_w, s.codes.numel(), g.O);
  Chunks chunks;
  if (cch < C) {
    chunks = build_chunks(L.gaps, rs.data(), g.O, K, cch * g.kh * g.kw);
    tile = k.tile;
    L.nch = chunks.nch;
    L.cs = chunks.start.data();
    L.ccur = chunks.cur.data();
  }
  const int64_t tasks = g.N * nb * ob;
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    std::vector<T> buf(buf_elems);
    if (!direct) std::fill(buf.end() - slack, buf.end(), T(0));
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / (nb * ob);
      const int64_t band = (t / ob) % nb;
      const int64_t blk = t % ob;
      const int64_t r0 = band * B;
      const int64_t rows = std::min(B, g.Ho - r0);
      const int64_t o0 = blk * OB, o1 = std::min(g.O, o0 + OB);
      if (rows <= 0 || o0 >= o1) continue;
      const T* xn = x + n * xs[0];
      const T* in;
      if (direct) {
        in = xn + r0 * W;  // pixel q of the image is at xn[q]
      } else {
        pack_band(xn, xs[1], xs[2], xs[3], C, H, W, r0 * g.sh, g.sh, g.sw, g.ph, g.pw, plane_rows,
                  plane_w, buf.data());
        in = buf.data();
      }
      const Epilogue<T> ep{out + n * os[0] + r0 * os[2], os[1], os[2], os[3], plane_w, g.Wo, bias,
                           relu};
      spmm_rows(k, tile, in, L, o0, o1, 0, rows * plane_w, ep);
    }
  });
}

template void conv_forward<float>(const float*, const int64_t*, const ConvGeom&, const Stream&,
                                  const float*, const float*, bool, float*, const int64_t*,
                                  const char*);
template void conv_forward<double>(const double*, const int64_t*, const ConvGeom&, const Stream&,
                                   const double*, const double*, bool, double*, const int64_t*,
                                   const char*);

namespace {

at::Tensor codebook_conv2d_cpu(const at::Tensor& x, const at::Tensor& codebook,
                               const at::Tensor& codes, const at::Tensor& gaps,
                               const at::Tensor& row_counts, const c10::optional<at::Tensor>& bias,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, bool relu) {
  const char* op = "codebook_conv2d";
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1, op,
              ": kernel_size must be two positive ints, got ", kernel_size);
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op,
              ": stride must be two positive ints, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": padding must be two non-negative ints, got ", padding);
  const Stream s{codebook, codes, gaps, row_counts, bias};
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
  TORCH_CHECK(g.H + 2 * g.ph >= g.kh && g.W + 2 * g.pw >= g.kw, op,
              ": kernel_size ", kernel_size, " is larger than the padded input ", x.sizes());
  g.Ho = (g.H + 2 * g.ph - g.kh) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.kw) / g.sw + 1;
  at::Tensor out = at::empty({g.N, g.O, g.Ho, g.Wo},
                             x.options().memory_format(sqz::output_memory_format(x)));
  const at::Tensor cbc = codebook.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t ost[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  if (g.N == 0) {
    // Still validate the stream.
    (void)validate_stream(op, "", s, g.C * g.kh * g.kw);
    return out;
  }
  if (x.scalar_type() == at::kFloat) {
    conv_forward<float>(x.data_ptr<float>(), xs, g, s, cbc.data_ptr<float>(),
                        bc.defined() ? bc.data_ptr<float>() : nullptr, relu, out.data_ptr<float>(),
                        ost, op);
  } else {
    conv_forward<double>(x.data_ptr<double>(), xs, g, s, cbc.data_ptr<double>(),
                         bc.defined() ? bc.data_ptr<double>() : nullptr, relu,
                         out.data_ptr<double>(), ost, op);
  }
  return out;
}

}  // namespace
}  // namespace codebook
}  // namespace sqz

TORCH_LIBRARY_IMPL(sqz_kernels, CPU, m) {
  m.impl("codebook_conv2d", &sqz::codebook::codebook_conv2d_cpu);
}
