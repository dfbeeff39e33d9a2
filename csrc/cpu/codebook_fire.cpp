// CPU codebook_fused_fire: the Fire module (squeeze 1x1 + ReLU -> expand1x1 + ReLU || expand3x3
// pad 1 + ReLU -> channel concat) on compressed weights for all three convs, in one parallel
// region. Work item = (image, band of output rows, block of output channels): the squeeze rows
// [r0-1, r1+1) go into a thread-local CHW buffer with a zero 1-pixel border (never a full tensor),
// then both expands read it by address offsets (the 3x3 taps are offsets ky*(W+2)+kx) and write
// straight into their channel slices [0, E1) and [E1, E1+E3) of the output.
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

constexpr int64_t kFireBandBytes = 512 * 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
void fire_forward(const at::Tensor& x, const Stream& sq, const Stream& e1, const Stream& e3,
                  int64_t S, int64_t E1, int64_t E3, at::Tensor& out, const char* op) {
  const Kernel<T> k = select_kernel<T>(active_isa());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t os[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  const bool direct = (W == 1 || xs[3] == 1) && (H == 1 || xs[2] == W) &&
                      (C - 1) * xs[1] + H * W < std::numeric_limits<int32_t>::max();
  const int64_t Wp = W + 2;
  const int64_t nthreads = at::get_num_threads();
  const int64_t row_bytes = (S * Wp + (direct ? 0 : C * W)) * static_cast<int64_t>(sizeof(T));
  const int64_t bmax = std::max<int64_t>(1, kFireBandBytes / std::max<int64_t>(1, row_bytes) - 2);
  int64_t nb = ceil_div(H, bmax);
  if (N * nb < nthreads) nb = std::min(H, ceil_div(nthreads, std::max<int64_t>(N, 1)));
  const int64_t B = ceil_div(H, nb);
  nb = ceil_div(H, B);
  const int64_t Eout = E1 + E3;
  int64_t ob = 1;
  if (N * nb < nthreads) ob = std::min(Eout, ceil_div(nthreads, std::max<int64_t>(N, 1) * nb));
  const int64_t OB = ceil_div(Eout, ob);
  ob = ceil_div(Eout, OB);

  const int64_t planeS = (B + 2) * Wp;
  const int64_t planeP = (B + 2) * W;
  const int64_t slack = Wp + kMaxTile;
  const int64_t s_elems = S * planeS + slack;
  const int64_t p_elems = direct ? 0 : C * planeP + slack;
  TORCH_CHECK(s_elems < std::numeric_limits<int32_t>::max() &&
                  p_elems < std::numeric_limits<int32_t>::max(),
              op, ": input too large for 32-bit address offsets");

  const RowStarts rs_sq = validate_stream(op, "sq_", sq, C);
  const RowStarts rs_e1 = validate_stream(op, "e1_", e1, S);
  const RowStarts rs_e3 = validate_stream(op, "e3_", e3, 9 * S);
  // Per-call tables: weight position -> address offset in the (packed) input / squeeze buffer.
  std::vector<int32_t> t_sq(C), t_e1(S), t_e3(9 * S);
  for (int64_t ci = 0; ci < C; ++ci) t_sq[ci] = static_cast<int32_t>(direct ? ci * xs[1] : ci * planeP);
  for (int64_t ci = 0; ci < S; ++ci) {
    t_e1[ci] = static_cast<int32_t>(ci * planeS + Wp + 1);
    for (int64_t ky = 0; ky < 3; ++ky)
      for (int64_t kx = 0; kx < 3; ++kx)
        t_e3[ci * 9 + ky * 3 + kx] = static_cast<int32_t>(ci * planeS + ky * Wp + kx);
  }
  if (N == 0) return;

  const at::Tensor cb_sq = sq.codebook.contiguous(), cb_e1 = e1.codebook.contiguous(),
                   cb_e3 = e3.codebook.contiguous();
  const at::Tensor b_sq = sq.bias.has_value() ? sq.bias->contiguous() : at::Tensor();
  const at::Tensor b_e1 = e1.bias.has_value() ? e1.bias->contiguous() : at::Tensor();
  const at::Tensor b_e3 = e3.bias.has_value() ? e3.bias->contiguous() : at::Tensor();
  const T* csq = cb_sq.data_ptr<T>();
  const T* ce1 = cb_e1.data_ptr<T>();
  const T* ce3 = cb_e3.data_ptr<T>();
  const T* bsq = b_sq.defined() ? b_sq.data_ptr<T>() : nullptr;
  const T* be1 = b_e1.defined() ? b_e1.data_ptr<T>() : nullptr;
  const T* be3 = b_e3.defined() ? b_e3.data_ptr<T>() : nullptr;
  const at::Tensor g_sq = sq.gaps.contiguous(), k_sq = sq.codes.contiguous();
  const at::Tensor g_e1 = e1.gaps.contiguous(), k_e1 = e1.codes.contiguous();
  const at::Tensor g_e3 = e3.gaps.contiguous(), k_e3 = e3.codes.contiguous();
  Rows<T> Lsq{g_sq.data_ptr<uint8_t>(), k_sq.data_ptr<uint8_t>(), rs_sq.data(), t_sq.data(), csq};
  const Rows<T> Le1{g_e1.data_ptr<uint8_t>(), k_e1.data_ptr<uint8_t>(), rs_e1.data(), t_e1.data(), ce1};
  const Rows<T> Le3{g_e3.data_ptr<uint8_t>(), k_e3.data_ptr<uint8_t>(), rs_e3.data(), t_e3.data(), ce3};
  const T* xp = x.data_ptr<T>();
  T* yp = out.data_ptr<T>();

  int tile_sq = fit_tile(k, C, 0);
  const int64_t cch = chunk_channels(k, C, 1, 0, (B + 2) * W, sq.codes.numel(), S);
  Chunks chunks;
  if (cch < C) {  // K-blocked squeeze (many input channels)
    chunks = build_chunks(Lsq.gaps, rs_sq.data(), S, C, cch);
    tile_sq = k.tile;
    Lsq.nch = chunks.nch;
    Lsq.cs = chunks.start.data();
    Lsq.ccur = chunks.cur.data();
  }
  const int tile_ex = fit_tile(k, S, 2 * Wp + 2);
  at::parallel_for(0, N * nb * ob, 1, [&](int64_t b, int64_t e) {
    std::vector<T> sbuf(s_elems, T(0));
    std::vector<T> pbuf(p_elems, T(0));
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / (nb * ob);
      const int64_t band = (t / ob) % nb;
      const int64_t blk = t % ob;
      const int64_t r0 = band * B;
      const int64_t rows = std::min(B, H - r0);
      const int64_t c0 = blk * OB, c1 = std::min(Eout, c0 + OB);
      if (rows <= 0 || c0 >= c1) continue;
      const int64_t ra = std::max<int64_t>(r0 - 1, 0);
      const int64_t rb = std::min(r0 + rows + 1, H);
      const T* xn = xp + n * xs[0];
      // 1. squeeze rows [ra, rb) -> sbuf rows (ra - (r0 - 1)) .. with zero border.
      std::fill(sbuf.begin(), sbuf.begin() + S * planeS, T(0));
      const T* in;
      if (direct) {
        in = xn + ra * W;
      } else {
        pack_band(xn, xs[1], xs[2], xs[3], C, H, W, ra, 1, 1, 0, 0, B + 2, W, pbuf.data());
        in = pbuf.data();
      }
      const Epilogue<T> esq{sbuf.data() + (ra - (r0 - 1)) * Wp + 1, planeS, Wp, 1, W, W, bsq, true};
      spmm_rows(k, tile_sq, in, Lsq, 0, S, 0, (rb - ra) * W, esq);
      // 2. expands from the padded squeeze buffer into the output's channel slices.
      T* yn = yp + n * os[0] + r0 * os[2];
      const int64_t qn = rows * Wp;
      if (c0 < E1) {
        const Epilogue<T> ee1{yn, os[1], os[2], os[3], Wp, W, be1, true};
        spmm_rows(k, tile_ex, sbuf.data(), Le1, c0, std::min(c1, E1), 0, qn, ee1);
      }
      if (c1 > E1) {
        const Epilogue<T> ee3{yn + E1 * os[1], os[1], os[2], os[3], Wp, W, be3, true};
        spmm_rows(k, tile_ex, sbuf.data(), Le3, std::max(c0, E1) - E1, c1 - E1, 0, qn, ee3);
      }
    }
  });
}

at::Tensor codebook_fused_fire_cpu(
    const at::Tensor& x, const at::Tensor& sq_codebook, const at::Tensor& sq_codes,
    const at::Tensor& sq_gaps, const at::Tensor& sq_counts,
    const c10::optional<at::Tensor>& sq_bias, const at::Tensor& e1_codebook,
    const at::Tensor& e1_codes, const at::Tensor& e1_gaps, const at::Tensor& e1_counts,
    const c10::optional<at::Tensor>& e1_bias, const at::Tensor& e3_codebook,
    const at::Tensor& e3_codes, const at::Tensor& e3_gaps, const at::Tensor& e3_counts,
    const c10::optional<at::Tensor>& e3_bias) {
  const char* op = "codebook_fused_fire";
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1, op,
              ": x must have C, H, W >= 1, got ", x.sizes());
  const Stream sq{sq_codebook, sq_codes, sq_gaps, sq_counts, sq_bias};
  const Stream e1{e1_codebook, e1_codes, e1_gaps, e1_counts, e1_bias};
  const Stream e3{e3_codebook, e3_codes, e3_gaps, e3_counts, e3_bias};
  const int64_t S = check_stream(op, "sq_", x, sq);
  const int64_t E1 = check_stream(op, "e1_", x, e1);
  const int64_t E3 = check_stream(op, "e3_", x, e3);
  at::Tensor out = at::empty({x.size(0), E1 + E3, x.size(2), x.size(3)},
                             x.options().memory_format(sqz::output_memory_format(x)));
  if (x.scalar_type() == at::kFloat) {
    fire_forward<float>(x, sq, e1, e3, S, E1, E3, out, op);
  } else {
    fire_forward<double>(x, sq, e1, e3, S, E1, E3, out, op);
  }
  return out;
}

}  // namespace
}  // namespace codebook
}  // namespace sqz

TORCH_LIBRARY_IMPL(sqz_kernels, CPU, m) {
  m.impl("codebook_fused_fire", &sqz::codebook::codebook_fused_fire_cpu);
}
