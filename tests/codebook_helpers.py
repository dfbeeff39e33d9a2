"""Builds the resident codebook format from a random pruned, weight-shared dense weight (test and
benchmark helper; the compression package has its own encoder)."""
import numpy as np
import torch


def encode_rows(codes_dense: np.ndarray, mask: np.ndarray):
    """codes_dense/mask: [O, K]. Returns (codes uint8 [E], gaps uint8 [E], row_counts int32 [O])
    with filler entries (gap 255 = +255, no weight) wherever a jump exceeds 255."""
    O, K = mask.shape
    rows, cols = np.nonzero(mask)
    prev = np.full(rows.shape, -1, dtype=np.int64)
    same = np.zeros(rows.shape, dtype=bool)
    same[1:] = rows[1:] == rows[:-1]
    prev[1:][same[1:]] = cols[:-1][same[1:]]
    delta = cols - prev
    nf = (delta - 1) // 255
    per = nf + 1
    total = int(per.sum())
    gaps = np.full(total, 255, dtype=np.uint8)
    codes = np.zeros(total, dtype=np.uint8)
    last = np.cumsum(per) - 1
    gaps[last] = (delta - 1 - 255 * nf).astype(np.uint8)
    codes[last] = codes_dense[rows, cols].astype(np.uint8)
    row_counts = np.bincount(np.repeat(rows, per), minlength=O).astype(np.int32)
    return codes, gaps, row_counts


def make_layer(O, K, density, bits, dtype=torch.float32, seed=0, bias=True, force_fillers=False,
               quads=False):
    """Random compressed layer. Returns dict(codebook, codes, gaps, row_counts, bias, dense) where
    dense is the float64 [O, K] decoded weight (oracle). quads: rows 4g..4g+3 share one random
    pattern (a block-pruned layer); row 1 is emptied (so quad 0 is broken), force_fillers turns
    rows 4-7 into a shared quad with fillers (row 0 without quads), and the last O % 4 rows stay
    single, so shared quads and single rows alternate."""
    rng = np.random.default_rng(seed)
    n = 2 ** bits
    codebook = rng.standard_normal(n) * 0.5
    if quads:
        mask = np.repeat(rng.random(((O + 3) // 4, K)) < density, 4, axis=0)[:O]
    else:
        mask = rng.random((O, K)) < density
    if O > 2 and density > 0:
        mask[1, :] = False  # an empty row
    if force_fillers and K > 300:
        rows = slice(4, 8) if quads and O >= 8 else slice(0, 1)  # quads: a whole shared quad
        mask[rows, :] = False
        mask[rows, K - 1] = True  # one weight after a run of > 255 zeros -> fillers
    codes_dense = rng.integers(0, n, size=(O, K))
    codes, gaps, row_counts = encode_rows(codes_dense, mask)
    dense = np.where(mask, codebook[codes_dense], 0.0)
    out = dict(
        codebook=torch.tensor(codebook, dtype=dtype),
        codes=torch.from_numpy(codes),
        gaps=torch.from_numpy(gaps),
        row_counts=torch.from_numpy(row_counts),
        bias=torch.tensor(rng.standard_normal(O) * 0.1, dtype=dtype) if bias else None,
        dense=torch.from_numpy(dense),
    )
    return out


def args(layer):
    return layer["codebook"], layer["codes"], layer["gaps"], layer["row_counts"], layer["bias"]


def bad_stream_args(L, row_counts_long=False, codes_oob=False):
    """args(L) with row_counts as int64 and / or every code out of range (bad-input tests)."""
    cb, codes, gaps, counts, bias = args(L)
    if row_counts_long:
        counts = counts.long()
    if codes_oob:
        codes = codes.clone().fill_(200)
    return cb, codes, gaps, counts, bias
