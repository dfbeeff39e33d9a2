// The resident compressed weight format of the sparse-codebook ops, its checks, and the decode
// helpers shared by every backend (the index math is __host__ __device__ under nvcc).
//
// Format (Deep Compression's own; a contract with sqz_kernels/compression and codebook.py):
// a weight W of shape [O, I, kh, kw] (Linear: [O, I]) is seen as O rows of K = I*kh*kw positions
// in (ci, ky, kx) row-major order.
//   codebook   float [n], n <= 256, same dtype as x
//   codes      uint8 [E], one per entry, code < n (a filler's code is ignored)
//   gaps       uint8 [E], relative index per entry: 255 = filler (cursor += 255, no weight),
//              otherwise cursor += gap + 1 and W[r, cursor] = codebook[code]
//   row_counts int32 [O], entries per row including fillers, sum == E; rows are consecutive
// Every cursor must stay < K. The kernels never expand this to a dense float weight: the inner loop
// walks gaps and codes as stored, maps the cursor to an input address offset through a per-call
// table of K int32 (one per weight position, not per weight) and reads codebook[code].
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512BW__) && !defined(__CUDACC__)
#include <immintrin.h>

#include "cpu/isa.h"
#endif

#if defined(__CUDACC__)
#define SQZ_HD __host__ __device__
#else
#define SQZ_HD
#endif

namespace sqz {
namespace codebook {

constexpr int kFillerGap = 255;  // a gap of 255 is a filler entry: cursor += 255, no weight
constexpr int64_t kMaxCodebook = 256;

// True if the entry with this gap is a filler (carries no weight).
SQZ_HD inline bool is_filler(uint8_t gap) { return gap == kFillerGap; }

// The cursor after an entry with `gap` (start each row at cursor = -1).
SQZ_HD inline int64_t advance(int64_t cursor, uint8_t gap) {
  return gap == kFillerGap ? cursor + kFillerGap : cursor + static_cast<int64_t>(gap) + 1;
}

// One compressed layer as the kernels see it (arguments of an op).
struct Stream {
  const at::Tensor& codebook;
  const at::Tensor& codes;
  const at::Tensor& gaps;
  const at::Tensor& counts;
  const c10::optional<at::Tensor>& bias;
};

// Row boundaries of a validated stream: row r's entries are [row_start[r], row_start[r+1]).
using RowStarts = std::vector<int64_t>;

// Checks dtypes, shapes and devices of one layer's tensors; returns the number of rows O.
// `pre` names the arguments ("" for single-layer ops, "sq_", "e1_", "e3_" for the Fire).
inline int64_t check_stream(const char* op, const char* pre, const at::Tensor& x, const Stream& s) {
  TORCH_CHECK(s.codebook.dim() == 1, op, ": ", pre, "codebook must be 1-D [n], got ",
              s.codebook.sizes());
  TORCH_CHECK(s.codebook.numel() >= 1 && s.codebook.numel() <= kMaxCodebook, op, ": ", pre,
              "codebook must have 1..256 entries, got ", s.codebook.numel());
  TORCH_CHECK(s.codebook.scalar_type() == x.scalar_type(), op, ": ", pre, "codebook has dtype ",
              s.codebook.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(s.codes.dim() == 1 && s.codes.scalar_type() == at::kByte, op, ": ", pre,
              "codes must be a 1-D uint8 tensor, got ", s.codes.scalar_type(), " ",
              s.codes.sizes());
  TORCH_CHECK(s.gaps.dim() == 1 && s.gaps.scalar_type() == at::kByte, op, ": ", pre,
              "gaps must be a 1-D uint8 tensor, got ", s.gaps.scalar_type(), " ", s.gaps.sizes());
  TORCH_CHECK(s.codes.numel() == s.gaps.numel(), op, ": ", pre, "codes (", s.codes.numel(),
              " entries) and ", pre, "gaps (", s.gaps.numel(), " entries) must have equal length");
  TORCH_CHECK(s.counts.dim() == 1 && s.counts.scalar_type() == at::kInt, op, ": ", pre,
              "row_counts must be a 1-D int32 tensor, got ", s.counts.scalar_type(), " ",
              s.counts.sizes());
  TORCH_CHECK(s.counts.numel() >= 1, op, ": ", pre, "row_counts must have at least one row");
  for (const at::Tensor* t : {&s.codebook, &s.codes, &s.gaps, &s.counts}) {
    TORCH_CHECK(t->device() == x.device(), op, ": ", pre, "codebook/codes/gaps/row_counts must be on ",
                x.device(), " like x, got ", t->device());
  }
  const int64_t rows = s.counts.numel();
  if (s.bias.has_value()) {
    const at::Tensor& b = *s.bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == rows, op, ": ", pre, "bias must have shape [", rows,
                "] (one per row of row_counts), got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), op, ": ", pre, "bias has dtype ",
                b.scalar_type(), " but x has dtype ", x.scalar_type());
    TORCH_CHECK(b.device() == x.device(), op, ": ", pre, "bias is on ", b.device(),
                " but x is on ", x.device());
  }
  return rows;
}

#if defined(__AVX512BW__) && !defined(__CUDACC__)
// True if every non-filler code is <= nmax and every row's last cursor (-1 + sum(gap + 1) -
// #fillers) is < K: validate_stream's two checks in one pass, 64 entries per step (a masked load
// of gaps and codes per row, gap + 1 summed by a SAD; a filler's 255 stays 255). Rows are short
// (SqueezeNet 1.1 at 33 %: 5-170 entries), and the scalar loops ran at ~0.4 ns per entry plus a
// setup per row - 100 us of every forward of the compressed network (26 streams, 0.4 M entries).
// On false, the scalar checks find and name the culprit.
inline bool stream_ok_avx512(const uint8_t* gp, const uint8_t* cp, uint8_t nmax,
                             const int64_t* rs, int64_t rows, int64_t K) {
  const __m512i filler = _mm512_set1_epi8(static_cast<char>(kFillerGap));
  const __m512i vmax = _mm512_set1_epi8(static_cast<char>(nmax));
  const __m512i one = _mm512_set1_epi8(1), zero = _mm512_setzero_si512();
  __mmask64 bad = 0;
  int64_t worst = -1;  // the largest last cursor of any row
  for (int64_t r = 0; r < rows; ++r) {
#if defined(__AVX512VL__)
    // A row of <= 16 entries (a 13x13 1x1 layer at 10 %: ~6) in one 128-bit step: the 512-bit
    // sum's reduction was most of the per-row cost.
    if (rs[r + 1] - rs[r] <= 16) {
      const int n = static_cast<int>(rs[r + 1] - rs[r]);
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
      const __m128i g = _mm_maskz_loadu_epi8(m, gp + rs[r]);
      const __mmask16 real = _mm_mask_cmpneq_epu8_mask(m, g, _mm512_castsi512_si128(filler));
      bad |= _mm_mask_cmpgt_epu8_mask(real, _mm_maskz_loadu_epi8(m, cp + rs[r]),
                                      _mm512_castsi512_si128(vmax));
      const __m128i s = _mm_sad_epu8(_mm_mask_add_epi8(g, real, g, _mm512_castsi512_si128(one)),
                                     _mm512_castsi512_si128(zero));
      worst = std::max<int64_t>(worst, -1 + _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1));
      continue;
    }
#endif
    __m512i acc = zero;  // 8 x u64 partial sums
    for (int64_t e = rs[r]; e < rs[r + 1]; e += 64) {
      const int64_t left = rs[r + 1] - e;
      const __mmask64 m = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
      const __m512i g = _mm512_maskz_loadu_epi8(m, gp + e);  // lanes past the row read as 0
      const __mmask64 real = _mm512_mask_cmpneq_epu8_mask(m, g, filler);
      bad |= _mm512_mask_cmpgt_epu8_mask(real, _mm512_maskz_loadu_epi8(m, cp + e), vmax);
      acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_mask_add_epi8(g, real, g, one), zero));
    }
    worst = std::max(worst, -1 + static_cast<int64_t>(_mm512_reduce_add_epi64(acc)));
  }
  return bad == 0 && worst < K;
}
#endif

// Validates one layer's stream in O(E) with branch-free, vectorisable loops: row_counts >= 0 and
// summing to E; every non-filler code < n; every cursor < K (cursors only grow within a row, so it
// suffices that each row's last cursor -1 + sum(gap + 1) - #fillers is < K). After this, any walk
// of the stream stays inside the tensors and inside [0, K). Returns the row starts.
// CPU tensors only (the CUDA backend validates with its own pass).
inline RowStarts validate_stream(const char* op, const char* pre, const Stream& s, int64_t K) {
  const at::Tensor codes = s.codes.contiguous();
  const at::Tensor gaps = s.gaps.contiguous();
  const at::Tensor counts = s.counts.contiguous();
  const int64_t E = codes.numel();
  const int64_t rows = counts.numel();
  const int64_t n = s.codebook.numel();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint8_t* gp = gaps.data_ptr<uint8_t>();
  const int32_t* rc = counts.data_ptr<int32_t>();
  RowStarts rs(rows + 1);
  int64_t total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(rc[r] >= 0, op, ": ", pre, "row_counts[", r, "] = ", rc[r], " is negative");
    rs[r] = total;
    total += rc[r];
  }
  rs[rows] = total;
  TORCH_CHECK(total == E, op, ": ", pre, "row_counts sum to ", total, " but codes/gaps have ", E,
              " entries");
  const uint8_t nmax = static_cast<uint8_t>(n - 1);  // n in [1, 256]
#if defined(__AVX512BW__) && !defined(__CUDACC__)
  if (sqz::active_isa() == sqz::Isa::Avx512 && stream_ok_avx512(gp, cp, nmax, rs.data(), rows, K))
    return rs;
#endif
  // codes: every non-filler code must be < n (branch-free, in blocks of 64 entries).
  uint8_t bad = 0;
  int64_t e = 0;
  for (; e + 64 <= E; e += 64) {
    uint8_t blk = 0;
    for (int i = 0; i < 64; ++i)
      blk |= static_cast<uint8_t>((gp[e + i] != 0xFF) & (cp[e + i] > nmax));
    bad |= blk;
  }
  for (; e < E; ++e) bad |= static_cast<uint8_t>((gp[e] != 0xFF) & (cp[e] > nmax));
  if (bad) {
    for (int64_t i = 0; i < E; ++i) {
      TORCH_CHECK(is_filler(gp[i]) || cp[i] < n, op, ": ", pre, "codes[", i, "] = ",
                  static_cast<int>(cp[i]), " is out of range for a codebook of ", n, " entries");
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    // sum over entries of (gap + 1), minus 1 per filler: 32-bit partial sums per 2^23 entries.
    int64_t last = -1;
    for (int64_t e0 = rs[r]; e0 < rs[r + 1]; e0 += (int64_t(1) << 23)) {
      const int64_t e1 = std::min(rs[r + 1], e0 + (int64_t(1) << 23));
      uint32_t sum = 0;
      for (int64_t e = e0; e < e1; ++e) sum += uint32_t(gp[e]) + (gp[e] != kFillerGap ? 1u : 0u);
      last += sum;
    }
    TORCH_CHECK(last < K, op, ": ", pre, "gaps run past the end of row ", r, " (position ", last,
                " >= K = ", K, ")");
  }
  return rs;
}

}  // namespace codebook
}  // namespace sqz
