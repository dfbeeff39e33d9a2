// CUDA FusedFire: squeeze 1x1 + ReLU -> (expand 1x1 + ReLU || expand 3x3 pad 1 + ReLU) -> concat,
// in ONE kernel launch. See the design notes below.
//
// Work decomposition
// ------------------
// A thread block (256 threads, 8 warps) owns (image n, spatial tile, channel group g).
//   * Spatial tile: TW = 16 columns x th rows of output pixels (th <= 8, chosen on the host so that
//     the row tiles cover H evenly). One row of 16 pixels is one 16-row M tile of the tensor-core
//     GEMMs, which makes the 3x3 taps plain pointer offsets (see below).
//   * The squeeze activation is computed for the (th+2) x 18 halo positions of the tile, for a chunk
//     of SC <= 64 squeeze channels, into shared memory ("sq tile", layout [hpos][s], hpos = hy*18+hx).
//     Input channels are staged through shared memory in chunks of CC = 32. Positions outside the
//     image are set to 0 (NOT relu(bias)): that is the zero padding the 3x3 expand sees.
//   * Output channels are cut in chunks of EC = 32 (expand1 chunks and expand3 chunks separately);
//     group g takes the chunks g, g+G, g+2G, ... of each expand. G is chosen on the host so that the
//     GPU is busy at batch 1 (more groups = more squeeze recomputation, the price of parallelism).
//   * For one output chunk the expand is a GEMM: M = tile pixels, N = EC, K = taps x SC. With the
//     sq tile laid out [hpos][s], the A operand of tap (ky, kx) for output row oy is simply the 16
//     rows starting at hpos = (oy+ky)*18 + kx: expand1x1 is the centre tap (1,1) of the same code.
//   * Accumulators are written through a shared-memory staging tile (bias + ReLU + conversion) to
//     the output's channel slice [0,E1) or [E1,E1+E3), in the output's memory format (coalesced for
//     NCHW and for channels_last).
//   * When S <= SC (all SqueezeNet Fire modules) the squeeze is computed once per block and reused by
//     every output chunk of the group. When S > SC the squeeze chunk is recomputed per output chunk
//     (correct for any S, slower).
//
// Arithmetic
//   * float32: exact FFMA in fp32 (no TF32), register-blocked from shared memory.
//   * float16 / bfloat16: tensor cores through WMMA m16n16k16, fp32 accumulation; the squeeze is
//     rounded to the input dtype after bias + ReLU (as the eager module does); channel counts that
//     are not multiples of 16 are zero-padded in shared memory.
//
// Any strides are accepted for x and the weights (NCHW, channels_last, sliced views): the loaders
// use the tensors' strides, so no .contiguous() copy (and no extra launch) is ever made.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "fire.h"
#include "memory_format.h"

namespace sqz {
namespace {

constexpr int kThreads = 256;   // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int TW = 16;          // tile width (output columns) = WMMA M
constexpr int HALO_W = TW + 2;  // 18
constexpr int MAX_TH = 8;       // max tile rows
constexpr int MAX_NPOS = 192;   // (MAX_TH+2)*18 = 180, rounded up to 12 M tiles of 16
constexpr int TILE_PIX = TW * MAX_TH;  // 128 output pixels per tile (rows >= th are discarded)
constexpr int CC = 32;          // input channels per staged chunk
constexpr int EC = 32;          // output channels per expand chunk
constexpr int SQ_FRAGS = 6;     // squeeze accumulator tiles per warp: 12 M x 4 N / 8 warps

static_assert(MAX_NPOS >= (MAX_TH + 2) * HALO_W, "halo tile");
static_assert(MAX_NPOS % 16 == 0 && MAX_NPOS / 32 == 6, "fp32 squeeze mapping assumes 192 = 6x32");
static_assert(TILE_PIX == 4 * 32, "fp32 expand mapping assumes 128 = 4x32 pixels");
static_assert(EC == 4 * kWarps, "fp32 expand mapping assumes 32 = 4x8 channels");

// ---------------------------------------------------------------------------------------------
// Everything the kernel needs, computed on the host.
struct FireParams {
  const void* x;
  const void* w_sq;
  const void* b_sq;  // may be null
  const void* w_e1;
  const void* b_e1;  // may be null
  const void* w_e3;
  const void* b_e3;  // may be null
  void* out;
  int64_t xs[4];    // strides of x (N, C, H, W), in elements
  int64_t os[4];    // strides of out
  int64_t wsq_s[2];  // w_sq strides (out, in)
  int64_t we1_s[2];  // w_e1 strides (out, in)
  int64_t we3_s[4];  // w_e3 strides (out, in, ky, kx)
  int N, C, H, W, S, E1, E3;
  int th;            // tile rows (1..8)
  int tiles_x, tiles_y;
  int G;             // channel groups
  int n1, n3;        // expand chunks (of EC channels) of expand1 / expand3
  int SC;            // squeeze channels per chunk (multiple of 16, <= 64)
  int nsc;           // number of squeeze chunks = ceil(S / SC)
  int channels_last_x;    // x has stride(1) == 1: stage with channels fastest
  int channels_last_out;  // out is channels_last: store with channels fastest
  // shared-memory layout (element counts / byte offsets)
  int ldS;    // row stride of the sq tile (elements of the sq type)
  int ldX;    // row stride of the staged x / w_sq chunk
  int ldW;    // row stride of the staged expand weights
  int ldF;    // row stride of the fp32 squeeze staging (tensor-core path)
  int ldO;    // row stride of the fp32 output staging
  int off_u;  // byte offset of the union region (after the sq tile)
  int off_ws; // byte offset (inside U) of the staged w_sq chunk
  int smem_bytes;
  int64_t total_blocks;
};

// ---------------------------------------------------------------------------------------------
// Element type traits: the torch type T -> the device type D, and conversions of D.
template <typename D> struct Cvt;
template <> struct Cvt<float> {
  __device__ static float to_f(float v) { return v; }
  __device__ static float from_f(float v) { return v; }
};
template <> struct Cvt<__half> {
  __device__ static float to_f(__half v) { return __half2float(v); }
  __device__ static __half from_f(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  __device__ static float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};
template <typename T> struct Elem;
template <> struct Elem<float> { using dev = float; };
template <> struct Elem<c10::Half> { using dev = __half; };
template <> struct Elem<c10::BFloat16> { using dev = __nv_bfloat16; };

template <typename T> struct UsesTensorCores { static constexpr bool value = true; };
template <> struct UsesTensorCores<float> { static constexpr bool value = false; };

// max(0, v) that keeps a NaN (as torch.relu and the CPU kernels: `v > 0 ? v : 0` turned a NaN
// input into 0). Padded / out-of-tile lanes are zeroed or dropped before or after, so no NaN
// reaches an output element that the inputs do not.
__device__ __forceinline__ float relu_f(float v) { return v < 0.f ? 0.f : v; }

// Stage x[n, c0:c0+CC, halo rows/cols] into xs[hpos*ldX + c] (zero outside the image / channel
// range / halo), and w_sq[s0:s0+SC, c0:c0+CC] into ws[s*ldX + c] (zero outside).
template <typename D>
__device__ __forceinline__ void stage_squeeze_chunk(const FireParams& p, const D* __restrict__ x,
                                                    const D* __restrict__ wsq, D* xs, D* ws,
                                                    int n, int ty0, int tx0, int c0, int s0,
                                                    int npos_pad) {
  const D zero = Cvt<D>::from_f(0.f);
  const int npos = (p.th + 2) * HALO_W;
  const int64_t xbase = (int64_t)n * p.xs[0];
  const int total = npos_pad * CC;
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    int hpos, c;
    if (p.channels_last_x) {
      c = idx % CC;
      hpos = idx / CC;
    } else {
      hpos = idx % npos_pad;
      c = idx / npos_pad;
    }
    D v = zero;
    const int gc = c0 + c;
    if (hpos < npos && gc < p.C) {
      const int hy = hpos / HALO_W, hx = hpos - hy * HALO_W;
      const int gy = ty0 - 1 + hy, gx = tx0 - 1 + hx;
      if (gy >= 0 && gy < p.H && gx >= 0 && gx < p.W)
        v = x[xbase + (int64_t)gc * p.xs[1] + (int64_t)gy * p.xs[2] + (int64_t)gx * p.xs[3]];
    }
    xs[hpos * p.ldX + c] = v;
  }
  const int wtotal = p.SC * CC;
  for (int idx = threadIdx.x; idx < wtotal; idx += kThreads) {
    const int c = idx % CC, s = idx / CC;
    const int gc = c0 + c, gs = s0 + s;
    D v = zero;
    if (gc < p.C && gs < p.S) v = wsq[(int64_t)gs * p.wsq_s[0] + (int64_t)gc * p.wsq_s[1]];
    ws[s * p.ldX + c] = v;
  }
}

// Stage expand weights of chunk [e0, e0+EC) x squeeze chunk [s0, s0+SC) into
// wt[(t*EC + e)*ldW + s], t = tap (ntaps = 1 for expand1x1, 9 for expand3x3). Zero outside.
template <typename D>
__device__ __forceinline__ void stage_expand_weights(const FireParams& p, const D* __restrict__ w,
                                                     const int64_t* st, int ntaps, int E, int e0,
                                                     int s0, D* wt) {
  const D zero = Cvt<D>::from_f(0.f);
  const int total = EC * p.SC * ntaps;
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    const int t = idx % ntaps;
    const int r = idx / ntaps;
    const int s = r % p.SC;
    const int e = r / p.SC;
    const int ge = e0 + e, gs = s0 + s;
    D v = zero;
    if (ge < E && gs < p.S) {
      int64_t off = (int64_t)ge * st[0] + (int64_t)gs * st[1];
      if (ntaps == 9) off += (int64_t)(t / 3) * st[2] + (int64_t)(t % 3) * st[3];
      v = w[off];
    }
    wt[(t * EC + e) * p.ldW + s] = v;
  }
}

// Write the fp32 staging tile st[pix*ldO + ch] (128 pixels x EC channels) to the output with
// bias + ReLU, channels [cbase + e0, ...) of the output, skipping pixels outside the tile/image.
template <typename D>
__device__ __forceinline__ void store_output_chunk(const FireParams& p, D* __restrict__ out,
                                                   const float* st, const D* __restrict__ bias,
                                                   int E, int e0, int cbase, int n, int ty0,
                                                   int tx0) {
  const int64_t obase = (int64_t)n * p.os[0];
  const int total = TILE_PIX * EC;
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    int pix, ch;
    if (p.channels_last_out) {
      ch = idx % EC;
      pix = idx / EC;
    } else {
      pix = idx % TILE_PIX;
      ch = idx / TILE_PIX;
    }
    const int oy = pix / TW, ox = pix % TW;
    const int gy = ty0 + oy, gx = tx0 + ox;
    const int ge = e0 + ch;
    if (oy < p.th && gy < p.H && gx < p.W && ge < E) {
      float v = st[pix * p.ldO + ch];
      if (bias != nullptr) v += Cvt<D>::to_f(bias[ge]);
      out[obase + (int64_t)(cbase + ge) * p.os[1] + (int64_t)gy * p.os[2] +
          (int64_t)gx * p.os[3]] = Cvt<D>::from_f(relu_f(v));
    }
  }
}

// Number of chunks of expand j (n chunks in total) that group g takes: g, g+G, ...
__device__ __forceinline__ int group_count(int nchunks, int g, int G) {
  return nchunks > g ? (nchunks - g + G - 1) / G : 0;
}

// ---------------------------------------------------------------------------------------------
// Squeeze of one chunk into the sq tile. float32: FFMA with a register block of
// 6 positions x 8 squeeze channels per thread. Tensor cores: WMMA, 6 accumulator tiles per warp.
template <typename T>
struct Squeeze;

template <>
struct Squeeze<float> {
  __device__ static void run(const FireParams& p, unsigned char* smem, int n, int ty0, int tx0,
                             int s0) {
    float* sq = reinterpret_cast<float*>(smem);
    float* xs = reinterpret_cast<float*>(smem + p.off_u);
    float* ws = reinterpret_cast<float*>(smem + p.off_u + p.off_ws);
    const float* x = static_cast<const float*>(p.x);
    const float* wsq = static_cast<const float*>(p.w_sq);
    const float* bsq = static_cast<const float*>(p.b_sq);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    float acc[6][8];
#pragma unroll
    for (int i = 0; i < 6; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

    for (int c0 = 0; c0 < p.C; c0 += CC) {
      __syncthreads();  // previous users of U are done
      stage_squeeze_chunk<float>(p, x, wsq, xs, ws, n, ty0, tx0, c0, s0, MAX_NPOS);
      __syncthreads();
      const int cn = min(CC, p.C - c0);
      for (int c = 0; c < cn; ++c) {
        float xv[6];
#pragma unroll
        for (int i = 0; i < 6; ++i) xv[i] = xs[(lane + 32 * i) * p.ldX + c];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int s = warp + kWarps * j;  // warp-uniform
          if (s < p.SC) {
            const float wv = ws[s * p.ldX + c];
#pragma unroll
            for (int i = 0; i < 6; ++i) acc[i][j] = fmaf(xv[i], wv, acc[i][j]);
          }
        }
      }
    }
    // bias + ReLU, zero outside the image / halo / channel range, into the sq tile.
    const int npos = (p.th + 2) * HALO_W;
#pragma unroll
    for (int i = 0; i < 6; ++i) {
      const int hpos = lane + 32 * i;
      const int hy = hpos / HALO_W, hx = hpos - hy * HALO_W;
      const int gy = ty0 - 1 + hy, gx = tx0 - 1 + hx;
      const bool inside = hpos < npos && gy >= 0 && gy < p.H && gx >= 0 && gx < p.W;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int s = warp + kWarps * j;
        if (s < p.SC) {
          float v = 0.f;
          if (inside && s0 + s < p.S) {
            v = acc[i][j];
            if (bsq != nullptr) v += bsq[s0 + s];
            v = relu_f(v);
          }
          sq[hpos * p.ldS + s] = v;
        }
      }
    }
    __syncthreads();
  }
};

template <typename T>
struct Squeeze {
  __device__ static void run(const FireParams& p, unsigned char* smem, int n, int ty0, int tx0,
                             int s0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // the host refuses tensor-core dtypes below sm_80
#else
    using namespace nvcuda;
    using D = typename Elem<T>::dev;
    D* sq = reinterpret_cast<D*>(smem);
    D* xs = reinterpret_cast<D*>(smem + p.off_u);
    D* ws = reinterpret_cast<D*>(smem + p.off_u + p.off_ws);
    float* sqf = reinterpret_cast<float*>(smem + p.off_u);  // after the C loop only
    const D* x = static_cast<const D*>(p.x);
    const D* wsq = static_cast<const D*>(p.w_sq);
    const D* bsq = static_cast<const D*>(p.b_sq);
    const int warp = threadIdx.x >> 5;
    const int npos = (p.th + 2) * HALO_W;
    const int nmt = (npos + 15) / 16;  // M tiles of halo positions (<= 12)
    const int nnt = p.SC / 16;         // N tiles of squeeze channels (<= 4)
    const int nfr = nmt * nnt;         // <= 48 = 8 warps x SQ_FRAGS

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[SQ_FRAGS];
#pragma unroll
    for (int i = 0; i < SQ_FRAGS; ++i) wmma::fill_fragment(acc[i], 0.f);

    for (int c0 = 0; c0 < p.C; c0 += CC) {
      __syncthreads();
      stage_squeeze_chunk<D>(p, x, wsq, xs, ws, n, ty0, tx0, c0, s0, nmt * 16);
      __syncthreads();
      const int kn = min(CC, p.C - c0);  // channels beyond are zero in both operands
#pragma unroll
      for (int k = 0; k < CC / 16; ++k) {
        if (k * 16 < kn) {
#pragma unroll
          for (int i = 0; i < SQ_FRAGS; ++i) {
            const int f = warp + kWarps * i;
            if (f < nfr) {
              const int m = f % nmt, nt = f / nmt;
              wmma::fragment<wmma::matrix_a, 16, 16, 16, D, wmma::row_major> a;
              wmma::fragment<wmma::matrix_b, 16, 16, 16, D, wmma::col_major> b;
              wmma::load_matrix_sync(a, xs + (m * 16) * p.ldX + k * 16, p.ldX);
              wmma::load_matrix_sync(b, ws + (nt * 16) * p.ldX + k * 16, p.ldX);
              wmma::mma_sync(acc[i], a, b, acc[i]);
            }
          }
        }
      }
    }
    __syncthreads();  // everybody is done with xs / ws: reuse U as fp32 staging
#pragma unroll
    for (int i = 0; i < SQ_FRAGS; ++i) {
      const int f = warp + kWarps * i;
      if (f < nfr) {
        const int m = f % nmt, nt = f / nmt;
        wmma::store_matrix_sync(sqf + (m * 16) * p.ldF + nt * 16, acc[i], p.ldF,
                                wmma::mem_row_major);
      }
    }
    __syncthreads();
    // bias + ReLU + zero outside -> sq tile in the input dtype. All MAX_NPOS rows are written.
    const int total = MAX_NPOS * p.SC;
    for (int idx = threadIdx.x; idx < total; idx += kThreads) {
      const int s = idx % p.SC, hpos = idx / p.SC;
      const int hy = hpos / HALO_W, hx = hpos - hy * HALO_W;
      const int gy = ty0 - 1 + hy, gx = tx0 - 1 + hx;
      float v = 0.f;
      if (hpos < npos && gy >= 0 && gy < p.H && gx >= 0 && gx < p.W && s0 + s < p.S) {
        v = sqf[hpos * p.ldF + s];
        if (bsq != nullptr) v += Cvt<D>::to_f(bsq[s0 + s]);
        v = relu_f(v);
      }
      sq[hpos * p.ldS + s] = Cvt<D>::from_f(v);
    }
    __syncthreads();
#endif
  }
};

// ---------------------------------------------------------------------------------------------
// Expand of one output chunk over one squeeze chunk, accumulated in registers.
// float32: 4 pixels (lane + 32i) x 4 channels (warp + 8j) per thread.
struct ExpandF32 {
  float acc[4][4];
  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }
  __device__ void accumulate(const FireParams& p, const float* sq, const float* wt, int ntaps,
                             int sn) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int hp[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int pix = lane + 32 * i;
      hp[i] = (pix / TW) * HALO_W + (pix % TW);  // halo position of tap (0, 0)
    }
    for (int t = 0; t < ntaps; ++t) {
      const int tt = ntaps == 1 ? 4 : t;  // expand1x1 = centre tap
      const int off = (tt / 3) * HALO_W + (tt % 3);
      const float* wrow = wt + (t * EC + warp) * p.ldW;
      for (int s = 0; s < sn; ++s) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = sq[(hp[i] + off) * p.ldS + s];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = wrow[(kWarps * j) * p.ldW + s];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
  }
  __device__ void to_staging(const FireParams& p, float* st) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) st[(lane + 32 * i) * p.ldO + warp + kWarps * j] = acc[i][j];
  }
};

// Tensor cores: warp w owns output row w (one M tile) x EC/16 = 2 N tiles.
template <typename D>
struct ExpandTC {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[EC / 16];
#endif
  __device__ void zero() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#pragma unroll
    for (int j = 0; j < EC / 16; ++j) nvcuda::wmma::fill_fragment(acc[j], 0.f);
#endif
  }
  __device__ void accumulate(const FireParams& p, const D* sq, const D* wt, int ntaps, int sn) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    const int warp = threadIdx.x >> 5;  // output row oy = warp (rows >= th are discarded)
    const int kt = (sn + 15) / 16;      // padded squeeze channels are zero in sq and wt
    for (int t = 0; t < ntaps; ++t) {
      const int tt = ntaps == 1 ? 4 : t;
      const int off = (tt / 3) * HALO_W + (tt % 3);
      const D* arow = sq + (warp * HALO_W + off) * p.ldS;
      const D* brow = wt + (t * EC) * p.ldW;
      for (int k = 0; k < kt; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, D, wmma::row_major> a;
        wmma::load_matrix_sync(a, arow + k * 16, p.ldS);
#pragma unroll
        for (int j = 0; j < EC / 16; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, D, wmma::col_major> b;
          wmma::load_matrix_sync(b, brow + (j * 16) * p.ldW + k * 16, p.ldW);
          wmma::mma_sync(acc[j], a, b, acc[j]);
        }
      }
    }
#endif
  }
  __device__ void to_staging(const FireParams& p, float* st) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int j = 0; j < EC / 16; ++j)
      nvcuda::wmma::store_matrix_sync(st + (warp * 16) * p.ldO + j * 16, acc[j], p.ldO,
                                      nvcuda::wmma::mem_row_major);
#endif
  }
};

template <typename T>
struct ExpandSel {
  using type = ExpandTC<typename Elem<T>::dev>;
};
template <>
struct ExpandSel<float> {
  using type = ExpandF32;
};

// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads, UsesTensorCores<T>::value ? 2 : 1) fused_fire_kernel(const FireParams p) {
  using D = typename Elem<T>::dev;
  // sq tile type: fp32 for the FFMA path, the input dtype for tensor cores.
  using SqT = typename std::conditional<UsesTensorCores<T>::value, D, float>::type;
  extern __shared__ __align__(128) unsigned char smem[];
  SqT* sq = reinterpret_cast<SqT*>(smem);
  SqT* wt = reinterpret_cast<SqT*>(smem + p.off_u);     // staged expand weights
  float* st = reinterpret_cast<float*>(smem + p.off_u);  // output staging (after a barrier)
  D* out = static_cast<D*>(p.out);

  const int ntiles = p.tiles_x * p.tiles_y;
  for (int64_t blk = blockIdx.x; blk < p.total_blocks; blk += gridDim.x) {
    const int g = (int)(blk % p.G);
    const int64_t rest = blk / p.G;
    const int tile = (int)(rest % ntiles);
    const int n = (int)(rest / ntiles);
    const int ty0 = (tile / p.tiles_x) * p.th;
    const int tx0 = (tile % p.tiles_x) * TW;

    const int cnt1 = group_count(p.n1, g, p.G);
    const int cnt3 = group_count(p.n3, g, p.G);
    bool sq_ready = false;  // the sq tile holds squeeze chunk 0 (only used when nsc == 1)
    for (int q = 0; q < cnt1 + cnt3; ++q) {
      const bool is3 = q >= cnt1;
      const int chunk = g + p.G * (is3 ? q - cnt1 : q);
      const int e0 = chunk * EC;
      const int ntaps = is3 ? 9 : 1;
      const int E = is3 ? p.E3 : p.E1;
      typename ExpandSel<T>::type ex;
      ex.zero();
      for (int sc = 0; sc < p.nsc; ++sc) {
        const int s0 = sc * p.SC;
        if (p.nsc > 1 || !sq_ready) {
          Squeeze<T>::run(p, smem, n, ty0, tx0, s0);  // ends with a barrier
          sq_ready = true;
        }
        __syncthreads();  // previous readers of wt / st are done
        if (is3)
          stage_expand_weights<SqT>(p, static_cast<const SqT*>(p.w_e3), p.we3_s, 9,
                                               p.E3, e0, s0, wt);
        else
          stage_expand_weights<SqT>(p, static_cast<const SqT*>(p.w_e1), p.we1_s, 1,
                                               p.E1, e0, s0, wt);
        __syncthreads();
        ex.accumulate(p, sq, wt, ntaps, min(p.SC, p.S - s0));
      }
      __syncthreads();  // all warps done reading wt: reuse U as output staging
      ex.to_staging(p, st);
      __syncthreads();
      store_output_chunk<D>(p, out, st, static_cast<const D*>(is3 ? p.b_e3 : p.b_e1), E, e0,
                                is3 ? p.E1 : 0, n, ty0, tx0);
      // the next writer of U (weights or squeeze staging) starts with a barrier
    }
    __syncthreads();  // the next block-tile's squeeze overwrites the sq tile
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

inline int round_up(int v, int m) { return (v + m - 1) / m * m; }

// Shared-memory layout for a given squeeze chunk SC; fills the ld*/off* fields, returns bytes.
template <typename T>
int plan_smem(FireParams& p, int SC) {
  constexpr bool tc = UsesTensorCores<T>::value;
  const int esz = tc ? 2 : 4;  // size of the sq / staged operands
  p.SC = SC;
  if (tc) {
    // 32-byte aligned WMMA rows need multiples of 16 elements; an odd multiple of 32 bytes per
    // row spreads 4 consecutive rows over all banks.
    p.ldS = (SC % 32 == 0) ? SC + 16 : SC;
    p.ldX = CC + 16;
    p.ldW = p.ldS;
    p.ldF = SC + 4;
    p.ldO = EC + 4;
  } else {
    p.ldS = SC + 1;  // odd: the pixel-per-lane reads are conflict free
    p.ldX = CC + 1;
    p.ldW = SC;      // weights are read as warp-wide broadcasts
    p.ldF = 0;
    p.ldO = EC + 1;
  }
  const int sq_bytes = round_up(MAX_NPOS * p.ldS * esz, 128);
  const int xs_bytes = round_up(MAX_NPOS * p.ldX * esz, 128);
  const int ws_bytes = round_up(SC * p.ldX * esz, 128);
  const int sqf_bytes = tc ? round_up(MAX_NPOS * p.ldF * 4, 128) : 0;
  const int wt_bytes = round_up(9 * EC * p.ldW * esz, 128);
  const int st_bytes = round_up(TILE_PIX * p.ldO * 4, 128);
  const int u_bytes = std::max(std::max(xs_bytes + ws_bytes, sqf_bytes), std::max(wt_bytes, st_bytes));
  p.off_u = sq_bytes;
  p.off_ws = xs_bytes;
  p.smem_bytes = sq_bytes + u_bytes;
  return p.smem_bytes;
}

template <typename T>
void ensure_smem_attribute(int device, int bytes) {
  static std::mutex mu;
  static int configured[64] = {0};
  std::lock_guard<std::mutex> lock(mu);
  TORCH_CHECK(device >= 0 && device < 64, "fused_fire: device index out of range");
  if (configured[device] >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(fused_fire_kernel<T>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  configured[device] = bytes;
}

// Resident blocks per SM for a shared-memory size (cached: the query costs a few microseconds).
template <typename T>
int blocks_per_sm(int device, int bytes) {
  static std::mutex mu;
  static std::vector<std::pair<int64_t, int>> cache;
  const int64_t key = (int64_t)device << 32 | (int64_t)bytes;
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& kv : cache)
    if (kv.first == key) return kv.second;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fused_fire_kernel<T>,
                                                               kThreads, bytes));
  per_sm = std::max(per_sm, 1);
  cache.emplace_back(key, per_sm);
  return per_sm;
}

template <typename T>
void launch_fire(const at::Tensor& x, const at::Tensor& w_sq, const c10::optional<at::Tensor>& b_sq,
                 const at::Tensor& w_e1, const c10::optional<at::Tensor>& b_e1,
                 const at::Tensor& w_e3, const c10::optional<at::Tensor>& b_e3, at::Tensor& out,
                 const FireGeometry& geo) {
  FireParams p{};
  p.x = x.data_ptr();
  p.w_sq = w_sq.data_ptr();
  p.b_sq = b_sq.has_value() ? b_sq->data_ptr() : nullptr;
  p.w_e1 = w_e1.data_ptr();
  p.b_e1 = b_e1.has_value() ? b_e1->data_ptr() : nullptr;
  p.w_e3 = w_e3.data_ptr();
  p.b_e3 = b_e3.has_value() ? b_e3->data_ptr() : nullptr;
  p.out = out.data_ptr();
  for (int i = 0; i < 4; ++i) {
    p.xs[i] = x.stride(i);
    p.os[i] = out.stride(i);
    p.we3_s[i] = w_e3.stride(i);
  }
  for (int i = 0; i < 2; ++i) {
    p.wsq_s[i] = w_sq.stride(i);
    p.we1_s[i] = w_e1.stride(i);
  }
  // Bias vectors are 1-D of the right length (checked); they must be unit-stride for the kernel.
  // (A strided 1-D bias would be unusual; we refuse it rather than copy.)
  auto unit = [](const c10::optional<at::Tensor>& b) { return !b.has_value() || b->numel() <= 1 || b->stride(0) == 1; };
  TORCH_CHECK(unit(b_sq) && unit(b_e1) && unit(b_e3),
              "fused_fire (CUDA): bias vectors must be contiguous");

  // int32 loop and tile arithmetic: c0 + CC, H + MAX_TH - 1 and W + TW - 1 must not wrap
  // (a channel count within 32 of INT32_MAX made the staging loop run forever)
  constexpr int64_t kRoom = 64;
  TORCH_CHECK(geo.in_channels < INT32_MAX - kRoom && geo.height < INT32_MAX - kRoom &&
                  geo.width < INT32_MAX - kRoom &&
                  geo.squeeze < INT32_MAX / 16 && geo.expand1 < INT32_MAX / 2 &&
                  geo.expand3 < INT32_MAX / 2 && geo.batch < INT32_MAX,
              "fused_fire (CUDA): sizes too large");
  p.N = (int)geo.batch;
  p.C = (int)geo.in_channels;
  p.H = (int)geo.height;
  p.W = (int)geo.width;
  p.S = (int)geo.squeeze;
  p.E1 = (int)geo.expand1;
  p.E3 = (int)geo.expand3;
  p.channels_last_x = x.stride(1) == 1 && p.C > 1 ? 1 : 0;
  p.channels_last_out = out.stride(1) == 1 && (p.E1 + p.E3) > 1 ? 1 : 0;

  // Tile rows: the fewest row tiles of <= 8 rows, then rows spread evenly over them.
  const int tiles_y = (p.H + MAX_TH - 1) / MAX_TH;
  p.th = (p.H + tiles_y - 1) / tiles_y;
  p.tiles_y = (p.H + p.th - 1) / p.th;
  p.tiles_x = (p.W + TW - 1) / TW;
  p.n1 = (p.E1 + EC - 1) / EC;
  p.n3 = (p.E3 + EC - 1) / EC;

  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  constexpr bool tc = UsesTensorCores<T>::value;
  TORCH_CHECK(!tc || prop->major >= 8,
              "fused_fire (CUDA): float16/bfloat16 need a GPU of compute capability >= 8.0, got ",
              prop->major, ".", prop->minor);

  // Squeeze chunk: as many channels as fit (<= 64), so that SqueezeNet's S <= 64 is one chunk.
  const int smem_limit = (int)std::max<size_t>(prop->sharedMemPerBlockOptin, prop->sharedMemPerBlock);
  int SC = std::min(round_up(p.S, 16), 64);
  while (plan_smem<T>(p, SC) > smem_limit && SC > 16) SC -= 16;
  TORCH_CHECK(p.smem_bytes <= smem_limit, "fused_fire (CUDA): needs ", p.smem_bytes,
              " bytes of shared memory per block, the GPU allows ", smem_limit);
  p.nsc = (p.S + SC - 1) / SC;

  const int device = x.get_device();
  ensure_smem_attribute<T>(device, p.smem_bytes);
  const int per_sm = blocks_per_sm<T>(device, p.smem_bytes);
  const int64_t slots = (int64_t)prop->multiProcessorCount * per_sm;

  // Channel groups: minimise (waves) x (work per block) with a simple MAC-count model.
  // Squeeze work per block ~ halo positions x C x S (times the output chunks if S > SC);
  // expand work ~ tile pixels x S x (chunks1 + 9 chunks3) x EC.
  const int64_t tiles = (int64_t)p.N * p.tiles_x * p.tiles_y;
  const int gmax = std::max(1, std::max(p.n1, p.n3));
  const double npos = (double)((p.th + 2) * HALO_W);
  const double sq_cost = npos * p.C * (double)round_up(p.S, 16);
  int bestG = 1;
  double best = 0.0;
  for (int G = 1; G <= gmax; ++G) {
    const int c1 = (p.n1 + G - 1) / G, c3 = (p.n3 + G - 1) / G;
    const double ex_cost = (double)TW * p.th * round_up(p.S, 16) * (c1 + 9.0 * c3) * EC;
    const double per_block = sq_cost * (p.nsc > 1 ? (c1 + c3) : 1) + ex_cost + 2.0e4;  // + fixed
    const int64_t blocks = tiles * G;
    const double waves = (double)((blocks + slots - 1) / slots);
    const double cost = waves * per_block;
    if (G == 1 || cost < best * 0.97) {  // prefer fewer groups on near-ties
      best = cost;
      bestG = G;
    }
  }
  p.G = bestG;
  p.total_blocks = tiles * p.G;
  const int64_t grid = std::min<int64_t>(p.total_blocks, (int64_t)INT32_MAX);

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  fused_fire_kernel<T><<<(unsigned)grid, kThreads, p.smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor fused_fire_cuda(const at::Tensor& x, const at::Tensor& w_sq,
                           const c10::optional<at::Tensor>& b_sq, const at::Tensor& w_e1,
                           const c10::optional<at::Tensor>& b_e1, const at::Tensor& w_e3,
                           const c10::optional<at::Tensor>& b_e3) {
  const FireGeometry geo = check_fire_args(x, w_sq, b_sq, w_e1, b_e1, w_e3, b_e3);
  TORCH_CHECK(x.is_cuda(), "fused_fire (CUDA): x must be a CUDA tensor, got ", x.device());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "fused_fire (CUDA): dtype must be float32, float16 or bfloat16, got ", st);
  c10::cuda::CUDAGuard guard(x.device());

  // Output memory format = x's: channels_last iff x is channels_last-contiguous and not plain
  // contiguous (the same rule as the fake kernel in sqz_kernels/ops.py).
  at::Tensor out = at::empty({geo.batch, geo.out_channels(), geo.height, geo.width},
                             x.options().memory_format(sqz::output_memory_format(x)));
  if (geo.batch == 0) return out;

  switch (st) {
    case at::kFloat:
      launch_fire<float>(x, w_sq, b_sq, w_e1, b_e1, w_e3, b_e3, out, geo);
      break;
    case at::kHalf:
      launch_fire<c10::Half>(x, w_sq, b_sq, w_e1, b_e1, w_e3, b_e3, out, geo);
      break;
    default:
      launch_fire<c10::BFloat16>(x, w_sq, b_sq, w_e1, b_e1, w_e3, b_e3, out, geo);
      break;
  }
  return out;
}

}  // namespace
}  // namespace sqz

TORCH_LIBRARY_IMPL(sqz_kernels, CUDA, m) {
  m.impl("fused_fire", &sqz::fused_fire_cuda);
}
