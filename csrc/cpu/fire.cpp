// CPU fused Fire: squeeze 1x1 + ReLU -> (expand 1x1 + ReLU || expand 3x3 + ReLU) -> concat, in
// one at::parallel_for region and without any ATen compute.
//
// Work item = (image, band of output rows, group of expand channels). For a band [r0, r1) the
// squeeze rows [r0-1, r1+1) go into a thread-local, zero-bordered buffer laid out CHW with a
// padded row stride Wp = W + 2 (columns 0 and W+1, and rows outside the image, stay 0: a zero-
// padded conv sees 0 there, not relu(bias)). Both expands then read that buffer as *flat* vectors
// of positions q = row*Wp + col: the 3x3 taps are the constant offsets ty*Wp + tx, so the inner
// loop has no branches; lanes that land on the two padding columns are computed and discarded.
// The micro-kernel stores each expand's results 16 channels at a time into a small per-thread CHW
// tile with full vector stores; from there they go to the output's channel slices [0, E1) and
// [E1, E1+E3) (so there is no concat): NCHW by row copies, channels_last by 16x16 AVX-512
// register transposes (scatter on the narrower ISAs).
//
// channels_last input, AVX-512 float: the squeeze reads the HWC band directly (16 pixels x 16
// squeeze channels per block, broadcasting x against a per-call transposed w_sq, then one 16x16
// register transpose into the CHW buffer; fire_squeeze_hwc.h), so no input staging. Other ISAs and
// float64 stage the band CHW first (scalar loop), because the micro-kernel needs pixel-contiguous
// vectors.
//
// Per-thread scratch (squeeze buffer, staging, tile, store maps) persists across calls: no
// allocation or page faults per call, and the buffer's zero padding columns stay zero.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "cpu/conv_microkernel.h"
#include "cpu/fire_squeeze_hwc.h"
#include "cpu/fire_transpose.h"
#include "cpu/isa.h"
#include "cpu/simd.h"
#include "fire.h"
#include "memory_format.h"

namespace sqz {
namespace {

using simd::Mask;

// Where the valid lanes of one flat vector go: lane l of the vector is stored at base + l.
struct Segment {
  int64_t base;
  Mask mask;
};

// Store map for a run of flat source positions q in [0, span) with row stride src_w, of which
// columns < valid_w are real pixels; the pixel at (row, col) goes to dest_off + row*dest_w + col.
struct VecMap {
  int64_t nvec = 0;
  std::vector<int32_t> first;  // segments of vector v: [first[v], first[v+1])
  std::vector<Segment> segs;
  std::vector<int32_t> index;  // per lane: destination index * index_scale (for scatter)
  std::vector<Mask> valid;     // per vector: lanes that hold real pixels

  // Rebuilt only when its arguments change (bands of one call mostly share a map).
  int64_t key[6] = {-1, -1, -1, -1, -1, -1};

  void build(int L, int64_t span, int64_t src_w, int64_t valid_w, int64_t dest_w, int64_t dest_off,
             int64_t index_scale) {
    const int64_t k[6] = {L, span, src_w, valid_w, dest_w * index_scale, dest_off};
    if (std::equal(k, k + 6, key)) return;
    std::copy(k, k + 6, key);
    nvec = (span + L - 1) / L;
    first.assign(nvec + 1, 0);
    segs.clear();
    index.assign(nvec * L, 0);
    valid.assign(nvec, 0);
    int64_t row = 0, col = 0;  // of flat position q = v*L + l
    for (int64_t v = 0; v < nvec; ++v) {
      first[v] = (int32_t)segs.size();
      for (int l = 0; l < L; ++l, ++col) {
        if (col == src_w) col = 0, ++row;
        const int64_t q = v * L + l;
        if (q >= span) break;
        if (col >= valid_w) continue;
        const int64_t dest = dest_off + row * dest_w + col;
        const int64_t base = dest - l;
        if ((int64_t)segs.size() > first[v] && segs.back().base == base)
          segs.back().mask |= Mask(1) << l;
        else
          segs.push_back({base, Mask(1) << l});
        index[v * L + l] = (int32_t)(dest * index_scale);
        valid[v] |= Mask(1) << l;
      }
    }
    first[nvec] = (int32_t)segs.size();
  }
};

struct FirePlan {
  FireGeometry g;
  bool channels_last;
  bool staged;
  int64_t band_h, nbands, ngroups;
  int64_t Wp, plane;  // squeeze buffer: row stride and channel-plane stride
};

// Bands keep the per-thread buffers (squeeze + staging) within a share of L2; then enough work
// items for all threads, preferring a count that divides evenly among them. Splitting expand
// channels (which recomputes the squeeze) is the last resort, for maps too small to band.
FirePlan make_plan(const FireGeometry& g, bool channels_last, int64_t elem_size, bool staged) {
  FirePlan p;
  p.g = g;
  p.channels_last = channels_last;
  p.staged = staged;
  p.Wp = g.width + 2;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Per band row: squeeze buffer, channels_last staging, the 16-channel output tile.
  const int64_t row_bytes =
      elem_size * (g.squeeze * p.Wp + (channels_last && staged ? g.in_channels * g.width : 0) + 16 * p.Wp);
  const int64_t budget = 384 * 1024;
  int64_t nb = 1;
  while (nb < g.height && row_bytes * ((g.height + nb - 1) / nb + 2) > budget) ++nb;
  if (g.batch * nb < threads) nb = std::min<int64_t>(g.height, (threads + g.batch - 1) / g.batch);
  for (int64_t extra = 0; extra < threads; ++extra) {
    const int64_t cand = nb + extra;
    if (cand > g.height) break;
    if ((g.batch * cand) % threads == 0) {
      // Accept a few more bands for balance only while the halo overhead stays small.
      if ((g.height + cand - 1) / cand >= 4 || extra == 0) nb = cand;
      break;
    }
  }
  p.band_h = (g.height + nb - 1) / nb;
  p.nbands = (g.height + p.band_h - 1) / p.band_h;
  p.ngroups = 1;
  if (g.batch * p.nbands < threads) {
    const int64_t min_ch = std::min(g.expand1, g.expand3);
    p.ngroups = std::max<int64_t>(1, std::min((threads + g.batch * p.nbands - 1) / (g.batch * p.nbands),
                                              min_ch / 8));
  }
  p.plane = (p.band_h + 2) * p.Wp;
  return p;
}

template <class V>
struct FireKernel {
  using T = typename V::T;
  static constexpr int L = V::L;

  const FirePlan& P;
  const T *x, *w_sq, *b_sq, *w_e1, *b_e1, *w_e3, *b_e3;
  T* out;
  // channels_last, AVX-512: squeeze weights transposed to [C][Sp] and the bias padded to Sp
  // (built once per call, before the parallel region), so the squeeze reads the HWC input directly.
  const float* wt_sq = nullptr;
  const float* b_sq_pad = nullptr;
  int64_t Sp = 0;
#if defined(__AVX512F__)
  // channels_last moves data between HWC and the CHW buffers with 16x16 register transposes.
  static constexpr bool kTiles = std::is_same_v<V, simd::Avx512F>;
#else
  static constexpr bool kTiles = false;
#endif
  // Zeroed floats after the last squeeze plane, so that flat vectors never need a mask there.
  static constexpr int64_t kSlack = 4 * L + 16;

  FireKernel(const FirePlan& plan, const T* x_, const T* wsq, const T* bsq, const T* we1,
             const T* be1, const T* we3, const T* be3, T* out_)
      : P(plan), x(x_), w_sq(wsq), b_sq(bsq), w_e1(we1), b_e1(be1), w_e3(we3), b_e3(be3), out(out_) {}

  // Thread-local scratch, reused by all items a thread runs in one call.
  struct Scratch {
    std::vector<T> buf, stage, otile, xtail;
    int64_t otile_stride = 0;
    int64_t buf_key[3] = {-1, -1, -1};
    VecMap sq_map, ex_map;
  };

  void run_item(int64_t item, Scratch& s) const {
    const FireGeometry& g = P.g;
    const int64_t H = g.height, W = g.width, C = g.in_channels, S = g.squeeze;
    const int64_t E1 = g.expand1, E3 = g.expand3, Cout = g.out_channels(), HW = H * W;
    const int64_t group = item % P.ngroups, band = (item / P.ngroups) % P.nbands;
    const int64_t n = item / (P.ngroups * P.nbands);
    const int64_t r0 = band * P.band_h, r1 = std::min(H, r0 + P.band_h), rows = r1 - r0;
    const int64_t rs = std::max<int64_t>(0, r0 - 1), re = std::min(H, r1 + 1);
    const int64_t Wp = P.Wp, plane = P.plane;
    T* buf = s.buf.data();

    // 1. Squeeze rows [rs, re) into buffer rows (r - r0 + 1), columns (c + 1).
    const int64_t sq_span = (re - rs) * W;
    s.sq_map.build(L, sq_span, W, W, Wp, (rs - r0 + 1) * Wp + 1, 1);
    if (r0 == 0)
      for (int64_t c = 0; c < S; ++c) std::fill(buf + c * plane, buf + c * plane + Wp, T(0));
    if (r1 == H)
      for (int64_t c = 0; c < S; ++c)
        std::fill(buf + c * plane + (rows + 1) * Wp, buf + c * plane + (rows + 2) * Wp, T(0));
    bool squeezed = false;
    if constexpr (kTiles) {
      if (P.channels_last && !P.staged) {
        const VecMap& m = s.sq_map;
        squeeze_hwc_avx512(x + (n * HW + rs * W) * C, sq_span, C, wt_sq, b_sq_pad, S, Sp,
                           s.xtail.data(), [&](int64_t ch, int64_t v, __m512 val) {
                             T* dst = buf + ch * plane;
                             for (int32_t k = m.first[v]; k < m.first[v + 1]; ++k)
                               _mm512_mask_storeu_ps(dst + m.segs[k].base,
                                                     (__mmask16)m.segs[k].mask, val);
                           });
        squeezed = true;
      }
    }
    if (!squeezed) {
      const T* src;
      int64_t src_k;
      if (P.channels_last) {
        // Without AVX-512 (and for float64): stage the band CHW first.
        const int64_t npix = (re - rs) * W;
        const T* xn = x + (n * HW + rs * W) * C;
        T* st = s.stage.data();
        if constexpr (kTiles)
          transpose_2d(xn, C, npix, C, st, npix);
        else
          for (int64_t p = 0; p < npix; ++p)
            for (int64_t c = 0; c < C; ++c) st[c * npix + p] = xn[p * C + c];
        src = st;
        src_k = npix;
      } else {
        src = x + n * C * HW + rs * W;
        src_k = HW;
      }
      ConvPass<T> p{w_sq, C, src, src_k, 0, C, sq_span, b_sq};
      const VecMap& m = s.sq_map;
      conv_pass<V, 1>(p, 0, S, m.nvec, [&](int64_t ch, int64_t v, const V& val) {
        T* dst = buf + ch * plane;
        for (int32_t k = m.first[v]; k < m.first[v + 1]; ++k) val.store(dst + m.segs[k].base, m.segs[k].mask);
      });
    }

    // 2. Both expands over flat positions q = row*Wp + col of the band's output rows.
    const int64_t ex_span = rows * Wp;
    T* out_n = out + n * Cout * HW;
    // Relative to the band's first output pixel, so that all full bands share one map.
    s.ex_map.build(L, ex_span, Wp, W, W, 0, P.channels_last ? Cout : 1);
    T* out_band = out_n + r0 * W * (P.channels_last ? Cout : 1);
    const VecMap& m = s.ex_map;
    auto run_expand = [&](auto taps, const T* w, const T* bias, int64_t E, int64_t ch_off) {
      constexpr int TAPS = decltype(taps)::value;
      const int64_t per = (E + P.ngroups - 1) / P.ngroups;
      const int64_t e_begin = std::min(E, group * per), e_end = std::min(E, e_begin + per);
      if (e_begin >= e_end) return;
      // 3x3 reads from the top-left tap (buffer start), 1x1 from the centre; both may read the
      // zero slack after the last plane instead of masking.
      const int64_t off = TAPS == 9 ? 0 : Wp + 1;
      ConvPass<T> p{w, S * TAPS, buf + off, plane, Wp, S, plane + kSlack - off, bias};
      if constexpr (kTiles) {
        if (P.channels_last) {
          // 16 channels at a time into a CHW tile (full vectors, padding lanes included), then
          // 16x16 register transposes into the output's pixel rows.
          T* tile = s.otile.data();
          const int64_t ts = s.otile_stride;
          for (int64_t e0 = e_begin; e0 < e_end; e0 += 16) {
            const int64_t e1 = std::min(e_end, e0 + 16);
            conv_pass<V, TAPS>(p, e0, e1, m.nvec, [&](int64_t ch, int64_t v, const V& val) {
              val.storeu(tile + (ch - e0) * ts + v * L);
            });
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t c0 = 0; c0 < W; c0 += 16)
                transpose_tile16(tile + r * Wp + c0, ts, (int)(e1 - e0),
                                 (int)std::min<int64_t>(16, W - c0),
                                 out_band + (r * W + c0) * Cout + ch_off + e0, Cout);
          }
          return;
        }
      }
      if (!P.channels_last) {
        // 16 channels at a time into a CHW tile with full, unmasked vector stores, then row by
        // row into the output planes: predictable branches and contiguous stores instead of a
        // varying number of masked segment stores per vector in the micro-kernel's epilogue.
        T* tile = s.otile.data();
        const int64_t ts = s.otile_stride;
        const simd::Mask tail_mask = (simd::Mask)((uint64_t(1) << (W % L)) - 1);
        for (int64_t e0 = e_begin; e0 < e_end; e0 += 16) {
          const int64_t e1 = std::min(e_end, e0 + 16);
          conv_pass<V, TAPS>(p, e0, e1, m.nvec, [&](int64_t ch, int64_t v, const V& val) {
            val.storeu(tile + (ch - e0) * ts + v * L);
          });
          for (int64_t e = e0; e < e1; ++e) {
            const T* src_e = tile + (e - e0) * ts;
            T* dst_e = out_band + (ch_off + e) * HW;
            for (int64_t r = 0; r < rows; ++r) {
              const T* sr = src_e + r * Wp;
              T* dr = dst_e + r * W;
              int64_t c = 0;
              for (; c + L <= W; c += L) V::loadu(sr + c).storeu(dr + c);
              if (c < W) V::load(sr + c, tail_mask).store(dr + c, tail_mask);
            }
          }
        }
        return;
      }
      // channels_last without AVX-512 (AVX2, scalar, float64): scatter each vector's lanes.
      conv_pass<V, TAPS>(p, e_begin, e_end, m.nvec, [&](int64_t ch, int64_t v, const V& val) {
        val.scatter(out_band + ch_off + ch, m.index.data() + v * L, m.valid[v]);
      });
    };
    run_expand(std::integral_constant<int, 1>{}, w_e1, b_e1, E1, 0);
    run_expand(std::integral_constant<int, 9>{}, w_e3, b_e3, E3, E1);
  }

  void run() const {
    const FireGeometry& g = P.g;
    const int64_t items = g.batch * P.nbands * P.ngroups;
    // Slack after the last plane: flat vectors of the expands read up to L + 2 positions past it.
    const int64_t buf_len = g.squeeze * P.plane + kSlack;
    const int64_t stage_len =
        P.channels_last && P.staged ? g.in_channels * (P.band_h + 2) * g.width : 0;
    const int64_t xtail_len = P.channels_last && kTiles ? 16 * g.in_channels : 0;
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      // Kept per thread across calls: no allocation (and page faults) per call, store maps stay
      // cached, and the padding columns of the squeeze buffer stay zero as long as its layout
      // does not change (the kernel never writes them).
      static thread_local Scratch s;
      const int64_t key[3] = {buf_len, P.plane, P.Wp};
      if (!std::equal(key, key + 3, s.buf_key)) {
        s.buf.assign(buf_len, T(0));
        std::copy(key, key + 3, s.buf_key);
      }
      if ((int64_t)s.stage.size() < stage_len) s.stage.resize(stage_len);
      if ((int64_t)s.xtail.size() < xtail_len) s.xtail.resize(xtail_len);
      if (kTiles || !P.channels_last) {
        // Flat vectors of a band: rows*Wp rounded up to whole blocks of NV vectors.
        s.otile_stride = (P.band_h * P.Wp + (Blocking<V>::NV + 1) * L + 15) / 16 * 16;
        if ((int64_t)s.otile.size() < 16 * s.otile_stride) s.otile.resize(16 * s.otile_stride);
      }
      for (int64_t it = begin; it < end; ++it) run_item(it, s);
    });
  }
};

template <class V>
void launch(const FirePlan& plan, const at::Tensor& x, const at::Tensor& w_sq,
            const c10::optional<at::Tensor>& b_sq, const at::Tensor& w_e1,
            const c10::optional<at::Tensor>& b_e1, const at::Tensor& w_e3,
            const c10::optional<at::Tensor>& b_e3, at::Tensor& out) {
  using T = typename V::T;
  auto ptr = [](const c10::optional<at::Tensor>& b) -> const T* {
    return b.has_value() ? b->data_ptr<T>() : nullptr;
  };
  FireKernel<V> k(plan, x.data_ptr<T>(), w_sq.data_ptr<T>(), ptr(b_sq), w_e1.data_ptr<T>(),
                  ptr(b_e1), w_e3.data_ptr<T>(), ptr(b_e3), out.data_ptr<T>());
  if constexpr (FireKernel<V>::kTiles) {
    if (plan.channels_last) {
      // Per call (C*S elements): wt[c][s] = w_sq[s][c], zero-padded to a multiple of 16 channels.
      const int64_t C = plan.g.in_channels, S = plan.g.squeeze, Sp = (S + 15) / 16 * 16;
      static thread_local std::vector<float> wt, bp;
      wt.assign(C * Sp, 0.f);
      bp.assign(Sp, 0.f);
      const float* w = w_sq.data_ptr<float>();
      for (int64_t s0 = 0; s0 < S; s0 += 16)
        for (int64_t c0 = 0; c0 < C; c0 += 16)
          transpose_tile16(w + s0 * C + c0, C, (int)std::min<int64_t>(16, S - s0),
                           (int)std::min<int64_t>(16, C - c0), wt.data() + c0 * Sp + s0, Sp);
      if (b_sq.has_value()) std::copy(k.b_sq, k.b_sq + S, bp.begin());
      k.wt_sq = wt.data();
      k.b_sq_pad = bp.data();
      k.Sp = Sp;
    }
  }
  k.run();
}

c10::optional<at::Tensor> contiguous_opt(const c10::optional<at::Tensor>& b) {
  if (!b.has_value()) return b;
  return b->contiguous();
}

at::Tensor fused_fire_cpu(const at::Tensor& x_in, const at::Tensor& w_sq_in,
                          const c10::optional<at::Tensor>& b_sq_in, const at::Tensor& w_e1_in,
                          const c10::optional<at::Tensor>& b_e1_in, const at::Tensor& w_e3_in,
                          const c10::optional<at::Tensor>& b_e3_in) {
  const FireGeometry g = check_fire_args(x_in, w_sq_in, b_sq_in, w_e1_in, b_e1_in, w_e3_in, b_e3_in);
  TORCH_CHECK(x_in.device().is_cpu(), "fused_fire (CPU): x must be a CPU tensor, got ", x_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "fused_fire (CPU): x must be float32 or float64, got ", x_in.scalar_type());
  // Output format follows the input (same rule as the fake kernel in sqz_kernels/ops.py).
  const auto fmt = output_memory_format(x_in);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty({g.batch, g.out_channels(), g.height, g.width}, x_in.options(), fmt);
  if (g.batch == 0) return out;
  TORCH_CHECK(!channels_last || g.height * g.width * g.out_channels() < (int64_t(1) << 31),
              "fused_fire (CPU): channels_last images larger than 2^31 elements are not supported");

  const at::Tensor x = x_in.contiguous(fmt);  // a no-op unless x is non-contiguous
  const at::Tensor w_sq = w_sq_in.contiguous(), w_e1 = w_e1_in.contiguous(), w_e3 = w_e3_in.contiguous();
  const auto b_sq = contiguous_opt(b_sq_in), b_e1 = contiguous_opt(b_e1_in), b_e3 = contiguous_opt(b_e3_in);
  // Read the ISA once: the plan (staging buffer sizes) and the kernel chosen must agree even if
  // another thread calls set_cpu_isa meanwhile.
  const Isa isa = active_isa();
  bool staged = x.scalar_type() == at::kDouble;
#if defined(__AVX512F__)
  staged = staged || isa != Isa::Avx512;
#else
  staged = true;
#endif
  const FirePlan plan = make_plan(g, channels_last, x.element_size(), staged);

  if (x.scalar_type() == at::kDouble) {
    launch<simd::ArrVec<double, 8>>(plan, x, w_sq, b_sq, w_e1, b_e1, w_e3, b_e3, out);
    return out;
  }
  switch (isa) {
#if defined(__AVX512F__)
    case Isa::Avx512:
      launch<simd::Avx512F>(plan, x, w_sq, b_sq, w_e1, b_e1, w_e3, b_e3, out);
      break;
#endif
#if defined(__AVX2__) && defined(__FMA__)
    case Isa::Avx2:
      launch<simd::Avx2F>(plan, x, w_sq, b_sq, w_e1, b_e1, w_e3, b_e3, out);
      break;
#endif
    default:
      launch<simd::ArrVec<float, 4>>(plan, x, w_sq, b_sq, w_e1, b_e1, w_e3, b_e3, out);
      break;
  }
  return out;
}

}  // namespace
}  // namespace sqz

TORCH_LIBRARY_IMPL(sqz_kernels, CPU, m) { m.impl("fused_fire", &sqz::fused_fire_cpu); }
