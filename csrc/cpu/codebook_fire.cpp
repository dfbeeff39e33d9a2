// CPU codebook_fused_fire: the Fire module (squeeze 1x1 + ReLU -> expand1x1 + ReLU || expand3x3
// pad 1 + ReLU -> channel concat) on compressed weights for all three convs, in one parallel
// region. Work item = (image, band of output rows, block of output channels): the squeeze rows
// [r0-1, r1+1) go into a thread-local CHW buffer with a zero 1-pixel border (never a full tensor),
// then both expands read it by address offsets (the 3x3 taps are offsets ky*(W+2)+kx) and write
// straight into their channel slices [0, E1) and [E1, E1+E3) of the output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "codebook.h"
#include "memory_format.h"
#include "cpu/codebook_spmm.h"
#include "cpu/max_pool_plane.h"

namespace sqz {
namespace codebook {
namespace {

constexpr int64_t kFireBandBytes = 512 * 1024;


// ReLU(v) at squeeze column c of row r of the buffer, into the three column copies (copy kx holds
// column c at c + 1 - kx; the zero border columns are left alone). The scalar squeeze epilogues.
template <typename T>
inline void put_squeeze(T* r, int64_t c, T v, int64_t W, int64_t copy_stride) {
  v = v < T(0) ? T(0) : v;  // ReLU (NaN stays NaN, like torch.relu)
  if (c + 1 < W) r[c + 1] = v;                 // copy 0
  r[copy_stride + c] = v;                      // copy 1
  if (c >= 1) r[2 * copy_stride + c - 1] = v;  // copy 2
}

// Squeeze epilogue: a finished tile of squeeze channel o (pixels q of the packed input band, row
// pitch P, valid columns [0, W)) -> ReLU(acc + b) written into the three column copies of the
// squeeze buffer (copy kx, column j = squeeze column j + kx - 1, so copy 1 is the map itself and
// copies 0 / 2 are it shifted right / left by one, with the zero border column kept zero).
template <typename T>
struct SqueezeSink {
  T* sbuf;             // row 0 of the band's squeeze buffer = squeeze row r0 - 1
  int64_t row_off;     // local row of the first packed input row (ra - (r0 - 1))
  int64_t P, W;        // pitch and valid columns
  int64_t plane, copy_stride;
  const T* bias;

  void store(const T* acc, int64_t q0, int len, int64_t o) const {
    const T b = bias ? bias[o] : T(0);
    for (int64_t i = 0; i < len;) {
      const int64_t q = q0 + i;
      const int64_t row = q / P, col = q - row * P;
      const int64_t seg = std::min<int64_t>(len - i, P - col);
      const int64_t c1 = std::min(W, col + seg);
      T* r = sbuf + o * plane + (row + row_off) * P;
      for (int64_t c = col; c < c1; ++c) put_squeeze(r, c, acc[i + c - col] + b, W, copy_stride);
      i += seg;
    }
  }

  bool row_blocks() const { return false; }
  void store_rows(T*, int64_t, int64_t, int, int64_t, int64_t) const {}

  bool plan(int64_t q0, int len, TileDst<T>& td) const {
    if (len % 16 != 0 || P % 16 != 0) return false;
    td.nd = 3;
    for (int d = 0; d < 3; ++d) {
      td.base[d] = sbuf + d * copy_stride + row_off * P;
      td.row_stride[d] = plane;
    }
    td.bias = bias;
    td.relu = true;
    for (int v = 0; v < len / 16; ++v) {
      const int64_t q = q0 + 16 * v, row = q / P, col = q - row * P;
      // lane l is squeeze column c = col + l, valid for c < W; copy d stores it at column
      // c + 1 - d, kept only inside [0, W) so the zero border columns stay zero.
      const uint32_t valid = static_cast<uint32_t>(std::max<int64_t>(0, std::min<int64_t>(16, W - col)));
      const uint32_t m = valid >= 16 ? 0xFFFFu : (1u << valid) - 1u;
      const uint32_t last = valid > 0 && col + valid == W ? 1u << (valid - 1) : 0u;
      td.off[0][v] = row * P + col + 1;
      td.mask[0][v] = static_cast<uint16_t>(m & ~last);  // column c + 1 < W
      td.off[1][v] = row * P + col;
      td.mask[1][v] = static_cast<uint16_t>(m);
      td.off[2][v] = row * P + col - 1;
      td.mask[2][v] = static_cast<uint16_t>(col == 0 ? m & ~1u : m);  // column c - 1 >= 0
    }
    return true;
  }
};

// The squeeze read in place: the same epilogue for a squeeze that reads x itself (NCHW rows of W
// pixels, no pitch), so pixel q of the band is row q / W, column q % W. A vector of 16 pixels may
// end one row and start the next (two rows for W >= 16, three for 8 <= W < 16): per copy a piece
// per row, each P - W further on than the one before (destinations 3 k + copy). Pixels past the
// band's npix are not written.
template <typename T>
struct SqueezeSinkInPlace {
  T* sbuf;
  int64_t row_off;
  int64_t P, W, npix;
  int64_t plane, copy_stride;
  const T* bias;

  void store(const T* acc, int64_t q0, int len, int64_t o) const {
    const T b = bias ? bias[o] : T(0);
    for (int64_t i = 0; i < len && q0 + i < npix; ++i) {
      const int64_t q = q0 + i, row = q / W, c = q - row * W;
      put_squeeze(sbuf + o * plane + (row + row_off) * P, c, acc[i] + b, W, copy_stride);
    }
  }

  bool row_blocks() const { return false; }
  void store_rows(T*, int64_t, int64_t, int, int64_t, int64_t) const {}

  bool plan(int64_t q0, int len, TileDst<T>& td) const {
    if (len % 16 != 0 || W < 8) return false;
    const int pieces = W >= 16 ? 2 : 3;  // rows a vector of 16 pixels can touch
    td.nd = 3 * pieces;
    for (int d = 0; d < td.nd; ++d) {
      td.base[d] = sbuf + (d % 3) * copy_stride + row_off * P;
      td.row_stride[d] = plane;
    }
    td.bias = bias;
    td.relu = true;
    for (int v = 0; v < len / 16; ++v) {
      const int64_t q = q0 + 16 * v, row = q / W, col = q - row * W;
      const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(16, npix - q));
      // Piece k: lanes [s, e) in row row + k, lane l at column col + l - k * W, stored P - W
      // further on per row (piece 0 ends at the row end; lanes past npix are not stored).
      int64_t s = 0;
      for (int k = 0; k < pieces; ++k) {
        const int64_t e = std::min<int64_t>(valid, k == 0 ? W - col : s + W);
        const uint32_t m = e > s ? ((1u << e) - 1u) & ~((1u << s) - 1u) : 0u;
        const int64_t last = (k + 1) * W - 1 - col;  // the lane at column W - 1
        const int64_t first = k * W - col;           // the lane at column 0
        const uint32_t no_last = last >= s && last < e ? ~(1u << last) : ~0u;
        const uint32_t no_first = first >= s && first < e ? ~(1u << first) : ~0u;
        const int64_t at = m ? row * P + col + k * (P - W) : 0;  // no address for no store
        td.off[3 * k][v] = m ? at + 1 : 0;
        td.mask[3 * k][v] = static_cast<uint16_t>(m & no_last);  // copy 0: column c + 1 < W
        td.off[3 * k + 1][v] = at;
        td.mask[3 * k + 1][v] = static_cast<uint16_t>(m);
        td.off[3 * k + 2][v] = m ? at - 1 : 0;
        td.mask[3 * k + 2][v] = static_cast<uint16_t>(m & no_first);  // copy 2: column c - 1 >= 0
        s = std::max(s, e);
      }
    }
    return true;
  }
};

// pg: null for the Fire alone; else codebook_fused_fire_max_pool's pool over the Fire output
// (pg->H, pg->W = H, W). Then bands are bands of pooled rows (as in codebook_conv2d_max_pool):
// the expands write a band of Fire rows into a per-thread buffer that is pooled at once, and
// adjacent bands recompute the kp - sp Fire rows they share.
template <typename T>
void fire_forward(const at::Tensor& x, const Stream& sq, const Stream& e1, const Stream& e3,
                  int64_t S, int64_t E1, int64_t E3, at::Tensor& out, const char* op,
                  const pool::PoolGeom* pg = nullptr) {
  const Kernel<T> k = select_kernel<T>(active_isa());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  const int64_t os[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  const int64_t P = round_up(W, kVec);
  const int64_t nthreads = at::get_num_threads();
  const int64_t Eout = E1 + E3;
  const int64_t row_bytes = (3 * S + C) * P * static_cast<int64_t>(sizeof(T));
  // A map that is one pixel tile (13x13) keeps one band up to twice the budget: two bands would
  // recompute two squeeze rows and halve the expand tiles (A/B, 1 thread: 6-8 % faster; 55x55
  // maps were 13 % slower with the larger budget). Threads still split such maps into bands:
  // splitting output channels instead recomputes the whole squeeze per thread (1.5x slower).
  const char* env_band = std::getenv("SQZ_FIRE_BAND_BYTES");  // tuning override
  const int64_t budget = env_band ? std::max<int64_t>(1, std::atoll(env_band)) : kFireBandBytes;
  const int64_t band_bytes = H * P <= k.tile ? 2 * budget : budget;
  // A map larger than one pixel tile gets bands of at most one tile's rows (k.tile / P: 4 rows of
  // a 55x55 map, 8 of a 27x27), not as many rows as the budget holds: same-process A/B, 2 threads,
  // 33 %: SqueezeNet 1.1's fire2 / fire4 unstructured 1.31-1.38x / 1.22-1.25x (block-4 1.12-1.20x
  // / 1.01-1.11x), 1.0's fire2 1.06-1.12x, the other 55x55 / 27x27 Fires 0.99-1.09x; the whole
  // 1.1 network as a KernelChain 1.03-1.04x unstructured, 1.00-1.01x block-4.
  const int64_t bmax_budget = std::max<int64_t>(1, band_bytes / std::max<int64_t>(1, row_bytes) - 2);
  // (AVX-512 float kernels only: the measured tile is theirs; narrower tiles would give 1-row bands.)
  const int64_t bmax = k.wide && H * P > k.tile
                           ? std::min(bmax_budget, std::max<int64_t>(1, k.tile / P))
                           : bmax_budget;
  // Bands: of B output rows, or (pooled) of PB pooled rows, which need up to B Fire rows.
  const int64_t HB = pg ? pg->Ho : H;  // rows the bands split
  auto fire_rows_of = [&](int64_t pr) { return std::min(H, (pr - 1) * pg->sh + pg->kh); };
  // Pooled: bands compute about as many new Fire rows (PB * sp, the shared rows are carried) as
  // the Fire alone would; the band's Fire output buffer comes on top of the budget. Counting it
  // in the budget gave 1-2-row bands on the 27x27 Fires of SqueezeNet 1.0 (4-vector tiles, the
  // squeeze halo doubled): 1.1x slower than Fire + separate pool.
  const int64_t PB0 = pg ? std::max<int64_t>(1, std::min(HB, bmax / pg->sh)) : 0;
  int64_t nb = ceil_div(HB, pg ? PB0 : bmax);
  if (N * nb < nthreads) nb = std::min(HB, ceil_div(nthreads, std::max<int64_t>(N, 1)));
  int64_t B = ceil_div(HB, nb);
  if (pg) {
    // Pooled bands split the pooled rows as evenly as they go (band i: rows [i HB / nb,
    // (i + 1) HB / nb)), in a band count the threads divide: carried rows make small bands cheap,
    // and equal-size bands with a short last one left SqueezeNet 1.0's 13 pooled rows 8 / 5
    // (fire8 + pool 0.91-0.93x of Fire + separate pool; 0.99-1.06x with this split).
    for (int64_t m = nb; m <= HB; ++m)
      if ((N * m) % nthreads == 0) {
        nb = m;
        break;
      }
  } else {
    if (N * nb >= nthreads) B = balanced_band_rows(HB, N, B, nthreads);
    nb = ceil_div(HB, B);
  }
  // Even bands of rows (pooled: of pooled rows). Same-process A/B against bands of B rows and a
  // short last one, 2 threads, 33 % block-4: 1.0's fire2 / fire3 / fire5 1.10x / 1.08x / 1.10x,
  // 1.1's fire5 without its pool 1.09x. B: Fire rows of the largest band.
  const EvenBands bands{HB, nb};
  B = pg ? fire_rows_of(bands.largest()) : bands.largest();
  int64_t ob = 1;
  if (N * nb < nthreads) ob = std::min(Eout, ceil_div(nthreads, std::max<int64_t>(N, 1) * nb));

  // Packed input band: rows [r0 - 1, r0 + B + 1) of x (1 copy); squeeze buffer: B + 2 rows with
  // the zero border, three column copies for the 3x3 taps.
  const Layout lx = make_layout(C, 1, 1, 1, B + 2, W);
  const Layout ls = make_layout(S, 3, 3, 1, B, W);
  TORCH_CHECK(lx.elems < std::numeric_limits<int32_t>::max() &&
                  ls.elems < std::numeric_limits<int32_t>::max(),
              op, ": input too large for 32-bit address offsets");

  const RowStarts rs_sq = validate_stream(op, "sq_", sq, C);
  const RowStarts rs_e1 = validate_stream(op, "e1_", e1, S);
  const RowStarts rs_e3 = validate_stream(op, "e3_", e3, 9 * S);
  // Output channel blocks [cblk[i], cblk[i+1]) of the concatenated expands with equal numbers of stored
  // entries (an entry costs one tile of multiply-adds in either expand, and an e3 row holds ~9x
  // the entries of an e1 row, so equal channel counts would leave one thread most of the work).
  std::vector<int64_t> cblk(ob + 1, Eout);
  {
    const int64_t n1 = rs_e1[E1], total = n1 + rs_e3[E3];
    int64_t o = 0;
    for (int64_t i = 0; i < ob; ++i) {
      const int64_t target = total * i / ob;
      while (o < Eout && (o < E1 ? rs_e1[o] : n1 + rs_e3[o - E1]) < target) ++o;
      cblk[i] = o;
    }
  }
  // Per-call tables: weight position -> address offset in the packed input / squeeze buffer.
  std::vector<int32_t> t_sq(C), t_e1(S), t_e3(9 * S);
  lx.fill_offsets(t_sq.data(), C, 1, 1);
  ls.fill_offsets(t_e3.data(), S, 3, 3);
  for (int64_t ci = 0; ci < S; ++ci) t_e1[ci] = t_e3[ci * 9 + 4];  // the centre tap (1, 1)
  if (N == 0) return;

  const at::Tensor cb_sq = sq.codebook.contiguous(), cb_e1 = e1.codebook.contiguous(),
                   cb_e3 = e3.codebook.contiguous();
  const at::Tensor b_sq = sq.bias.has_value() ? sq.bias->contiguous() : at::Tensor();
  const at::Tensor b_e1 = e1.bias.has_value() ? e1.bias->contiguous() : at::Tensor();
  const at::Tensor b_e3 = e3.bias.has_value() ? e3.bias->contiguous() : at::Tensor();
  const T* bsq = b_sq.defined() ? b_sq.data_ptr<T>() : nullptr;
  const T* be1 = b_e1.defined() ? b_e1.data_ptr<T>() : nullptr;
  const T* be3 = b_e3.defined() ? b_e3.data_ptr<T>() : nullptr;
  const at::Tensor g_sq = sq.gaps.contiguous(), k_sq = sq.codes.contiguous();
  const at::Tensor g_e1 = e1.gaps.contiguous(), k_e1 = e1.codes.contiguous();
  const at::Tensor g_e3 = e3.gaps.contiguous(), k_e3 = e3.codes.contiguous();
  Rows<T> Lsq{g_sq.data_ptr<uint8_t>(), k_sq.data_ptr<uint8_t>(), rs_sq.data(), t_sq.data(),
              cb_sq.data_ptr<T>()};
  Rows<T> Le1{g_e1.data_ptr<uint8_t>(), k_e1.data_ptr<uint8_t>(), rs_e1.data(), t_e1.data(),
              cb_e1.data_ptr<T>()};
  Rows<T> Le3{g_e3.data_ptr<uint8_t>(), k_e3.data_ptr<uint8_t>(), rs_e3.data(), t_e3.data(),
              cb_e3.data_ptr<T>()};
  std::vector<uint8_t> q_sq, q_e1, q_e3;
  find_quads(Lsq, S, k, q_sq);
  find_quads(Le1, E1, k, q_e1);
  find_quads(Le3, E3, k, q_e3);
  const T* xp = x.data_ptr<T>();
  T* yp = out.data_ptr<T>();
  const int64_t fire_plane = B * W;  // pooled: one channel of the band's Fire output buffer
  const bool fast_pool = pg && pool::fast3s2_applies<T>(*pg, k.wide);

  // K-blocking of the three layers so each one's slab stays in L1 (see chunk_channels).
  const int64_t step_sq = tile_step(k, (B + 2) * P), step_ex = tile_step(k, B * P);
  set_blocks(Lsq, C, 1, chunk_channels<T>(C, 1, step_sq, 0, sq.codes.numel(), S,
                                               l1_kblocks(Lsq, k), 16, 32));
  set_blocks(Le1, S, 1, chunk_channels<T>(S, 1, step_ex, 0, e1.codes.numel(), E1,
                                               l1_kblocks(Le1, k), 16, 32));
  set_blocks(Le3, S, 9, chunk_channels<T>(S, 3, step_ex, 2 * P, e3.codes.numel(), E3,
                                               l1_kblocks(Le3, k), 16, 32));

  // The squeeze reads x in place (no packed copy of its input rows) when x's rows are contiguous
  // runs of W >= 8 pixels (NCHW), on the AVX-512 float kernels: its positions are then channel
  // offsets c * xs[1], and a band's pixels one flat run of (rows) * W per channel. The packed copy
  // was ~11 % of a 55x55 Fire's samples (128 channels). A band whose rounded-up run would read past
  // the end of x's storage is packed as before. Same-process A/B, 2 threads, 33 %: the 55x55 /
  // 27x27 Fires unstructured 0.99-1.05x, block-4 1.02-1.16x; the whole SqueezeNet 1.1 as a
  // KernelChain 1.01x / 1.04x. Maps of 8 <= W < 16 (13x13) take three row pieces per vector:
  // 13x13 Fires 1.00-1.09x, the whole network 1.01-1.02x more (same-process A/B).
  const bool in_place = std::is_same<T, float>::value && k.wide && k.direct && xs[3] == 1 &&
                        xs[2] == W && W >= 8 && channel_offsets_fit(C, xs[1], H * W);
  const int64_t readable = in_place ? readable_elems(x) : 0;
  std::vector<int32_t> t_sq_x;
  const Rows<T> Lsq_x = channel_offset_rows(Lsq, C, xs[1], in_place, t_sq_x);
  // channels_last x: pack only the input channels the squeeze reaches (when few are; see
  // used_channels)
  std::vector<uint8_t> used_keep;
  const uint8_t* used = used_channels(Lsq, S, C, 1, k, pixel_major(xs[1], xs[3]), H * W, used_keep);

  at::parallel_for(0, N * nb * ob, 1, [&](int64_t b, int64_t e) {
    AlignedBuffer<T> sbuf(ls.elems), pbuf(lx.elems);
    // Columns of the squeeze buffer no squeeze row writes (the zero border of the 3x3 taps and the
    // pitch padding): copy kx column j holds squeeze column j + kx - 1 and is written for
    // 0 <= j + kx - 1 < W and j < W (see SqueezeSink). The buffer is not zero-initialised;
    // border rows are zeroed per task below.
    for (int64_t kx = 0; kx < 3; ++kx)
      for (int64_t ci = 0; ci < S; ++ci)
        for (int64_t i = 0; i < ls.plane_rows; ++i) {
          T* r = sbuf.data() + kx * ls.copy_stride + ci * ls.plane + i * P;
          const int64_t written_end = kx == 2 ? W - 1 : W;  // copy 2 stops a column early
          if (kx == 0) r[0] = T(0);
          zero_row(r + written_end, P - written_end);
        }
    Scratch<T> part;
    std::vector<T> ptmp, prow;
    std::vector<Walk> walk;
    // pooled: the band's Fire output (every element the pool reads is written first: no fill)
    std::unique_ptr<T[]> fbuf(pg ? new T[static_cast<size_t>(Eout * fire_plane)] : nullptr);
    if (pg) prow = pool::plane_scratch<T>(*pg);
    // Squeeze rows [held_a, held_b) of image held_n are in sbuf at local row (row - held_base):
    // the rows this thread's previous band computed. A band needs squeeze rows [r0 - 1, r1 + 1),
    // so consecutive bands of a thread share two; they are moved, not recomputed (and their input
    // rows not packed again). With bands of 7-14 rows the two halo rows were 15-30 % more squeeze
    // work and input packing (the copy alone was ~13 % of fire3 + pool's samples); same-process
    // A/B, 2 threads, 33 %: fire2 1.03x, fire3 + pool 1.07x, SqueezeNet 1.0's Fires 1.03x in sum.
    int64_t held_n = -1, held_a = 0, held_b = 0, held_base = 0;
    // Fire rows [r0, r0 + rows) of image n, output channels [c0, c1): into the output, or (pooled)
    // into the band buffer fb.
    auto fire_band = [&](int64_t r0, int64_t rows, int64_t n, int64_t c0, int64_t c1, T* fb) {
      const int64_t base = r0 - 1;  // the squeeze row at local row 0
      const int64_t ra = std::max<int64_t>(r0 - 1, 0);
      const int64_t rb = std::min(r0 + rows + 1, H);
      const int64_t la = ra - base, lb = rb - base;  // local squeeze rows written
      int64_t from = ra;  // the first squeeze row to compute
      if (held_n == n && held_a <= ra && ra < held_b) {
        const int64_t keep = std::min(held_b, rb) - ra;
        if (base != held_base)
          for (int64_t kx = 0; kx < 3; ++kx)
            for (int64_t ci = 0; ci < S; ++ci) {
              T* pl = sbuf.data() + kx * ls.copy_stride + ci * ls.plane;
              std::memmove(pl + (ra - base) * P, pl + (ra - held_base) * P,
                           static_cast<size_t>(keep * P) * sizeof(T));
            }
        from = ra + keep;
      }
      // 1. zero the border rows the expands read but the squeeze does not write (the buffer is
      //    reused across tasks), then squeeze rows [from, rb) into local rows [from - base, lb).
      for (int64_t kx = 0; kx < 3; ++kx)
        for (int64_t ci = 0; ci < S; ++ci) {
          T* pl = sbuf.data() + kx * ls.copy_stride + ci * ls.plane;
          std::fill(pl, pl + la * P, T(0));
          std::fill(pl + lb * P, pl + (rows + 2) * P, T(0));
        }
      const int64_t npix = (rb - from) * W, x0 = n * xs[0] + from * W;
      if (from < rb && in_place && runs_readable(x0, C, xs[1], npix, readable)) {
        const SqueezeSinkInPlace<T> ssq{sbuf.data(), from - base, P, W, npix, ls.plane,
                                        ls.copy_stride, bsq};
        spmm_rows(k, xp + x0, Lsq_x, 0, S, round_up(npix, kVec), ssq, part, walk);
      } else if (from < rb) {
        Layout lp = lx;  // the packed band holds only the input rows still to squeeze
        lp.plane_rows = rb - from;
        pack_band(xp + n * xs[0], xs[1], xs[2], xs[3], C, H, W, from, 1, 1, 1, 0, 0, W, lp,
                  pbuf.data(), used);
        const SqueezeSink<T> ssq{sbuf.data(), from - base, P, W, ls.plane, ls.copy_stride, bsq};
        spmm_rows(k, pbuf.data(), Lsq, 0, S, (rb - from) * P, ssq, part, walk);
      }
      held_n = n, held_a = ra, held_b = rb, held_base = base;
      // 2. expands from the squeeze buffer into the output's channel slices (pooled: into the
      //    band buffer, laid out [channel][row][W]).
      T* yn = pg ? fb : yp + n * os[0] + r0 * os[2];
      const int64_t ys[3] = {pg ? fire_plane : os[1], pg ? W : os[2], pg ? 1 : os[3]};
      const int64_t qn = rows * P;
      if (c0 < E1) {
        const Epilogue<T> ee1{yn, ys[0], ys[1], ys[2], P, W, be1, true};
        spmm_rows(k, sbuf.data(), Le1, c0, std::min(c1, E1), qn,
                  OutSink<T>{ee1, k.wide}, part, walk);
      }
      if (c1 > E1) {
        const Epilogue<T> ee3{yn + E1 * ys[0], ys[0], ys[1], ys[2], P, W, be3, true};
        spmm_rows(k, sbuf.data(), Le3, std::max(c0, E1) - E1, c1 - E1, qn,
                  OutSink<T>{ee3, k.wide}, part, walk);
      }
    };
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / (nb * ob);
      const int64_t band = (t / ob) % nb;
      const int64_t blk = t % ob;
      const int64_t p0 = pg ? bands.start(band) : 0, p1 = pg ? bands.start(band + 1) : 0;
      const int64_t r0 = pg ? p0 * pg->sh : bands.start(band);
      const int64_t rows = pg ? fire_rows_of(p1) - r0 : bands.start(band + 1) - r0;
      const int64_t c0 = cblk[blk], c1 = cblk[blk + 1];
      if (rows <= 0 || c0 >= c1 || (pg && p0 >= p1)) continue;
      // Pooled: Fire rows this thread computed for the previous band of the same channel block
      // (task t - ob) that this band shares (kp - sp of them) are carried over, not recomputed;
      // only a thread's first band recomputes them.
      int64_t carry = 0;
      if (pg && band > 0 && t - ob >= b) {
        const int64_t pr0 = bands.start(band - 1) * pg->sh;
        const int64_t prows = fire_rows_of(p0) - pr0;
        carry = std::max<int64_t>(0, std::min(rows, pr0 + prows - r0));
        for (int64_t o = c0; o < c1 && carry > 0; ++o) {
          T* pl = fbuf.get() + o * fire_plane;
          std::memmove(pl, pl + (prows - carry) * W, static_cast<size_t>(carry * W) * sizeof(T));
        }
      }
      if (carry < rows)
        fire_band(r0 + carry, rows - carry, n, c0, c1, pg ? fbuf.get() + carry * W : nullptr);
      if (pg) {  // 3. the band's pool: local rows [0, rows); ceil_mode cuts only the real bottom
        const pool::PoolGeom bg{1, 1, rows, W, pg->kh, pg->kw, pg->sh, pg->sw, 0, 0, p1 - p0, pg->Wo};
        pool::pool_band(fbuf.get(), fire_plane, bg, c0, c1, yp + n * os[0] + p0 * os[2], os, ptmp,
                        prow, k.wide, fast_pool);
      }
    }
  });
}

// The three layers of a Fire op, checked against x (shared by both Fire ops).
struct FireStreams {
  Stream sq, e1, e3;
  int64_t S, E1, E3;
};

FireStreams checked_fire(const char* op, const at::Tensor& x, const Stream& sq, const Stream& e1,
                         const Stream& e3) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1, op,
              ": x must have C, H, W >= 1, got ", x.sizes());
  const int64_t S = check_stream(op, "sq_", x, sq);
  const int64_t E1 = check_stream(op, "e1_", x, e1);
  const int64_t E3 = check_stream(op, "e3_", x, e3);
  return {sq, e1, e3, S, E1, E3};
}

void run_fire(const at::Tensor& x, const FireStreams& f, at::Tensor& out, const char* op,
              const pool::PoolGeom* pg) {
  if (x.scalar_type() == at::kFloat) {
    fire_forward<float>(x, f.sq, f.e1, f.e3, f.S, f.E1, f.E3, out, op, pg);
  } else {
    fire_forward<double>(x, f.sq, f.e1, f.e3, f.S, f.E1, f.E3, out, op, pg);
  }
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
  const FireStreams f = checked_fire(op, x, {sq_codebook, sq_codes, sq_gaps, sq_counts, sq_bias},
                                     {e1_codebook, e1_codes, e1_gaps, e1_counts, e1_bias},
                                     {e3_codebook, e3_codes, e3_gaps, e3_counts, e3_bias});
  at::Tensor out = at::empty({x.size(0), f.E1 + f.E3, x.size(2), x.size(3)},
                             x.options().memory_format(sqz::output_memory_format(x)));
  run_fire(x, f, out, op, nullptr);
  return out;
}

at::Tensor codebook_fused_fire_max_pool_cpu(
    const at::Tensor& x, const at::Tensor& sq_codebook, const at::Tensor& sq_codes,
    const at::Tensor& sq_gaps, const at::Tensor& sq_counts,
    const c10::optional<at::Tensor>& sq_bias, const at::Tensor& e1_codebook,
    const at::Tensor& e1_codes, const at::Tensor& e1_gaps, const at::Tensor& e1_counts,
    const c10::optional<at::Tensor>& e1_bias, const at::Tensor& e3_codebook,
    const at::Tensor& e3_codes, const at::Tensor& e3_gaps, const at::Tensor& e3_counts,
    const c10::optional<at::Tensor>& e3_bias, at::IntArrayRef pool_kernel,
    at::IntArrayRef pool_stride, bool pool_ceil_mode) {
  const char* op = "codebook_fused_fire_max_pool";
  const FireStreams f = checked_fire(op, x, {sq_codebook, sq_codes, sq_gaps, sq_counts, sq_bias},
                                     {e1_codebook, e1_codes, e1_gaps, e1_counts, e1_bias},
                                     {e3_codebook, e3_codes, e3_gaps, e3_counts, e3_bias});
  const pool::PoolGeom pg = pool::checked_pool_geom(op, "Fire", x.size(0), f.E1 + f.E3, x.size(2),
                                                     x.size(3), pool_kernel, pool_stride,
                                                     pool_ceil_mode);
  at::Tensor out = at::empty({x.size(0), f.E1 + f.E3, pg.Ho, pg.Wo},
                             x.options().memory_format(sqz::output_memory_format(x)));
  run_fire(x, f, out, op, &pg);
  return out;
}

}  // namespace
}  // namespace codebook
}  // namespace sqz

TORCH_LIBRARY_IMPL(sqz_kernels, CPU, m) {
  m.impl("codebook_fused_fire", &sqz::codebook::codebook_fused_fire_cpu);
  m.impl("codebook_fused_fire_max_pool", &sqz::codebook::codebook_fused_fire_max_pool_cpu);
}
