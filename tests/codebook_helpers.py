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


def compressed_squeezenet(arch="squeezenet1_1"):
    """SqueezeNet (EagerFire) with random weights, compressed at 33 % / 6 bit (the fold tests)."""
    import sqz_kernels as sk
    torch.manual_seed(0)
    model = getattr(sk.models, arch)(fire_cls=sk.EagerFire).eval()
    sk.compress(model, density=0.33, bits=6, progress=False)
    return model


def fold_save_load(model, x, tmp_path):
    """The part the pool-fold tests share, on a compressed SqueezeNet `model` (left unchanged):
    sk.fold_pool_ on a copy folds 4 pools (conv1's and two Fires' max-pools, the classifier's
    mean) and nothing more on a second pass, keeps the state_dict keys and model(x); a file saved
    from `model` loads into another folded copy with the same output. Returns (folded, loaded,
    model(x)) for each test's own checks of its fold."""
    import copy

    import sqz_kernels as sk
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        folded = copy.deepcopy(model)
        assert sk.fold_pool_(folded) == 4
        assert sk.fold_pool_(folded) == 0
        assert list(folded.state_dict()) == keys
        torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)
        path = tmp_path / "model.sqz"
        sk.save(model, path)
        loaded = sk.load(path, copy.deepcopy(folded))
        torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-5)
    return folded, loaded, ref
