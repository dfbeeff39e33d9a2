"""The resident compressed-weight format (what Codebook modules hold and the kernels execute).

A weight W [O, I, kh, kw] (Linear: [O, I]) is seen as O rows of K = I*kh*kw entries in
(ci, ky, kx) row-major order. Per layer:
  codebook   float  [n]   shared centroids, n <= 2**bits
  codes      uint8  [E]   one code per entry (a filler's code is 0 and ignored)
  gaps       uint8  [E]   relative index per entry
  row_counts int32  [O]   entries per row, fillers included; sum == E
Decoding row r: cursor c = -1; per entry (g, code): g == 255 -> c += 255 (filler, no weight);
else c += g + 1 and W[r, c] = codebook[code]. Every cursor value must stay < K.

`decode_dense` is the reference path and the oracle for the kernels: plain vectorised torch,
differentiable with respect to the codebook (the gradient of a centroid is then the sum of the
gradients of the weights that share it, which is Deep Compression's grouped gradient).
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["FILLER", "encode_rows", "encode_positions", "entry_cursors", "decode_positions", "decode_dense",
           "validate", "resident_nbytes"]

FILLER = 255  # a gap byte of 255 advances the cursor by 255 and carries no weight


def _as_shape(shape: Sequence[int]) -> Tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 4) or any(s < 0 for s in shape):
        raise ValueError(f"shape must be [O, I] or [O, I, kh, kw] with sizes >= 0, got {list(shape)}")
    k = 1
    for s in shape[1:]:
        k *= s
    return shape[0], k


def encode_positions(rows: Tensor, cols: Tensor, codes: Tensor, num_rows: int,
                     filler: int = FILLER) -> Tuple[Tensor, Tensor, Tensor]:
    """Entries for weights at (rows[i], cols[i]) with codes[i], sorted row-major (row, then col,
    strictly increasing). Returns (codes uint8, gaps uint8, row_counts int32); a gap longer than
    `filler - 1` is split into fillers (gap byte `filler`) followed by the remainder."""
    rows = rows.to(torch.int64)
    cols = cols.to(torch.int64)
    n = rows.numel()
    if n == 0:
        z = torch.zeros(0, dtype=torch.uint8)
        return z, z.clone(), torch.zeros(num_rows, dtype=torch.int32)
    # Cursor before each weight: -1 at the start of a row, else the previous weight's column.
    prev = torch.full_like(cols, -1)
    same_row = rows[1:] == rows[:-1]
    prev[1:] = torch.where(same_row, cols[:-1], torch.full_like(cols[1:], -1))
    d = cols - prev - 1
    if (d < 0).any():
        raise ValueError("encode_positions: positions must be strictly increasing within each row")
    nfill = torch.div(d, filler, rounding_mode="floor")
    g = d - nfill * filler
    per = nfill + 1                                   # entries emitted per weight
    total = int(per.sum())
    last = torch.cumsum(per, 0) - 1                   # index of each weight's own entry
    out_gaps = torch.full((total,), filler, dtype=torch.uint8)
    out_codes = torch.zeros(total, dtype=torch.uint8)
    out_gaps[last] = g.to(torch.uint8)
    out_codes[last] = codes.to(torch.uint8)
    row_counts = torch.zeros(num_rows, dtype=torch.int64).index_add_(0, rows, per)
    return out_codes, out_gaps, row_counts.to(torch.int32)


def encode_rows(mask_2d: Tensor, codes_2d: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Resident streams of a [O, K] matrix: entries where `mask_2d` is non-zero (a bool mask or
    the pruned dense weight itself), with code `codes_2d[r, c]` (an integer tensor [O, K], or a
    1-D tensor holding the codes of the non-zeros in row-major order)."""
    if mask_2d.dim() != 2:
        raise ValueError(f"encode_rows: mask_2d must be 2-D [O, K], got shape {list(mask_2d.shape)}")
    nz = (mask_2d != 0).nonzero()
    rows, cols = nz[:, 0], nz[:, 1]
    if codes_2d.dim() == 2:
        if codes_2d.shape != mask_2d.shape:
            raise ValueError(f"encode_rows: codes_2d shape {list(codes_2d.shape)} != mask_2d shape "
                             f"{list(mask_2d.shape)}")
        codes = codes_2d[rows, cols]
    elif codes_2d.dim() == 1 and codes_2d.numel() == rows.numel():
        codes = codes_2d
    else:
        raise ValueError("encode_rows: codes_2d must be [O, K] or 1-D with one code per non-zero")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 255):
        raise ValueError("encode_rows: codes must lie in [0, 255]")
    return encode_positions(rows, cols, codes, mask_2d.shape[0])


def _check_basic(codes: Tensor, gaps: Tensor, row_counts: Tensor, num_rows: int) -> None:
    for name, t, dt in (("codes", codes, torch.uint8), ("gaps", gaps, torch.uint8),
                        ("row_counts", row_counts, torch.int32)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != dt:
            raise ValueError(f"{name} must have dtype {dt}, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {list(t.shape)}")
    if codes.numel() != gaps.numel():
        raise ValueError(f"codes has {codes.numel()} entries but gaps has {gaps.numel()}")
    if row_counts.numel() != num_rows:
        raise ValueError(f"row_counts has {row_counts.numel()} rows, the weight has {num_rows}")
    if row_counts.numel() and int(row_counts.min()) < 0:
        raise ValueError("row_counts has a negative count")
    total = int(row_counts.to(torch.int64).sum())
    if total != gaps.numel():
        raise ValueError(f"row_counts sum to {total} but the streams hold {gaps.numel()} entries")


def entry_cursors(gaps: Tensor, row_counts: Tensor, filler: int = FILLER) -> Tuple[Tensor, Tensor, Tensor]:
    """(real, row, cursor) of every entry of a stream, with shape-static ops only (so the autograd
    of the codebook ops traces under torch.compile): real = not a filler, row = the row the entry
    belongs to, cursor = its column (for a filler: where the walk stands after it). No validation.
    `filler` is the gap value of a filler entry (255 resident; 2**index_bits - 1 in the file).
    The one stream decoder of the package: the loader, decode_dense and the kernels' backward
    (codebook_ops.codebook_positions) all use it."""
    g = gaps.to(torch.int64)
    counts = row_counts.to(torch.int64)
    rows = counts.shape[0]
    real = g != filler
    step = torch.where(real, g + 1, torch.full_like(g, filler))
    cs = torch.cumsum(step, 0)
    ends = torch.cumsum(counts, 0)
    row = torch.searchsorted(ends, torch.arange(g.shape[0], device=g.device), right=True)
    before = torch.cat([cs.new_zeros(1), cs])[ends - counts]  # walk total before each row
    cursor = cs - before[row.clamp(max=max(rows - 1, 0))] - 1
    return real, row, cursor


def decode_positions(gaps: Tensor, row_counts: Tensor, k: int, filler: int = FILLER) -> Tuple[Tensor, Tensor]:
    """(real, cursor): for every entry, whether it carries a weight (not a filler) and its column.
    Raises ValueError when a cursor runs to K or past it. Assumes _check_basic passed."""
    if gaps.numel() == 0:
        return (torch.zeros(0, dtype=torch.bool, device=gaps.device),
                torch.zeros(0, dtype=torch.int64, device=gaps.device))
    real, _, cursor = entry_cursors(gaps, row_counts, filler)
    if int(cursor.max()) >= k:
        bad = int((cursor >= k).nonzero()[0, 0])
        raise ValueError(f"gaps run past the row: entry {bad} reaches column {int(cursor[bad])} "
                         f"but rows have K={k} columns")
    return real, cursor


def validate(codebook: Tensor, codes: Tensor, gaps: Tensor, row_counts: Tensor,
             shape: Sequence[int], bits: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Check every invariant of the resident format; raise ValueError naming what is wrong.
    Returns (rows, cols) of the real (non-filler) entries, in entry order."""
    o, k = _as_shape(shape)
    if not isinstance(codebook, Tensor) or not codebook.is_floating_point() or codebook.dim() != 1:
        raise ValueError("codebook must be a 1-D floating-point tensor")
    n = codebook.numel()
    if bits is not None:
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
        if n > 2 ** bits:
            raise ValueError(f"codebook has {n} centroids, more than 2**bits = {2 ** bits}")
    _check_basic(codes, gaps, row_counts, o)
    real, cursor = decode_positions(gaps, row_counts, k)
    real_codes = codes[real]
    if real_codes.numel():
        cmax = int(real_codes.max())
        if cmax >= n:
            raise ValueError(f"a code ({cmax}) is >= the codebook size n = {n}")
        if bits is not None and cmax >= 2 ** bits:
            raise ValueError(f"a code ({cmax}) is >= 2**bits = {2 ** bits}")
    rows = torch.repeat_interleave(torch.arange(o, device=gaps.device), row_counts.to(torch.int64),
                                   output_size=gaps.numel())
    return rows[real], cursor[real]


def decode_dense(codebook: Tensor, codes: Tensor, gaps: Tensor, row_counts: Tensor,
                 shape: Sequence[int], bits: Optional[int] = None) -> Tensor:
    """The dense weight (shape `shape`, codebook's dtype) that the streams describe. Validates
    first. Differentiable w.r.t. `codebook`: gradient of centroid j = sum of dL/dW over the
    positions whose code is j."""
    o, k = _as_shape(shape)
    rows, cols = validate(codebook, codes, gaps, row_counts, shape, bits)
    real_codes = codes.to(torch.int64)[(gaps != FILLER)]
    flat = rows * k + cols
    vals = codebook[real_codes]                        # gather: the grouped gradient comes from here
    w = torch.zeros(o * k, dtype=codebook.dtype, device=codebook.device)
    w = w.index_put((flat.to(codebook.device),), vals)
    return w.reshape(tuple(int(s) for s in shape))


def resident_nbytes(codebook: Tensor, codes: Tensor, row_counts: Tensor,
                    bias: Optional[Tensor] = None) -> int:
    """Bytes the kernels need resident: 2 per entry (code + gap), the codebook, row_counts, bias."""
    b = codes.numel() * 2 + codebook.numel() * codebook.element_size()
    b += row_counts.numel() * row_counts.element_size()
    if bias is not None:
        b += bias.numel() * bias.element_size()
    return b
