"""The resident format: encode/decode against a dense oracle, fillers, validation, gradients."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sqz_kernels.compression import resident as R


def _oracle(mask, codes, codebook):
    return torch.where(mask, codebook[codes.long()], torch.zeros(()))


def _random_case(o, k, density, n, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(o, k, generator=g) < density
    codes = torch.randint(0, n, (o, k), generator=g)
    codebook = torch.randn(n, generator=g) + 3.0        # never 0: a lost weight shows
    return mask, codes, codebook


@settings(max_examples=40, deadline=None)
@given(o=st.integers(0, 6), k=st.integers(1, 900), density=st.sampled_from([0.0, 0.003, 0.05, 0.5, 1.0]),
       bits=st.integers(1, 8), seed=st.integers(0, 2 ** 16))
def test_encode_decode_matches_dense_oracle(o, k, density, bits, seed):
    n = 2 ** bits
    mask, codes, cb = _random_case(o, k, density, n, seed)
    c, g, rc = R.encode_rows(mask, codes)
    assert c.dtype == g.dtype == torch.uint8 and rc.dtype == torch.int32
    assert int(rc.sum()) == c.numel() == g.numel()
    w = R.decode_dense(cb, c, g, rc, (o, k), bits)
    assert torch.equal(w, _oracle(mask, codes, cb))
    # canonical: re-encoding the decoded matrix gives the same streams
    c2, g2, rc2 = R.encode_rows(w != 0, codes)
    assert torch.equal(c2, c) and torch.equal(g2, g) and torch.equal(rc2, rc)


def test_long_gap_uses_filler():
    mask = torch.zeros(2, 1000, dtype=torch.bool)
    mask[0, 299] = True            # 300 past the cursor's start (-1): filler (255) then 44
    mask[0, 810] = True            # 511 further: 2 fillers + 0
    mask[1, 254] = True            # gap 254 fits
    codes = torch.full((2, 1000), 3)
    c, g, rc = R.encode_rows(mask, codes)
    assert g.tolist() == [255, 44, 255, 255, 0, 254]
    assert c.tolist() == [0, 3, 0, 0, 3, 3]
    assert rc.tolist() == [5, 1]
    w = R.decode_dense(torch.arange(4.0), c, g, rc, (2, 1000))
    assert w.nonzero().tolist() == [[0, 299], [0, 810], [1, 254]]


def test_conv_shape_row_major_ci_ky_kx():
    w = torch.zeros(2, 3, 3, 3)
    w[1, 2, 1, 0] = 1.0            # column 2*9 + 1*3 + 0 = 21 of row 1
    c, g, rc = R.encode_rows(w.reshape(2, -1), torch.zeros(2, 27, dtype=torch.int64))
    assert rc.tolist() == [0, 1] and g.tolist() == [21]
    assert torch.equal(R.decode_dense(torch.tensor([1.0]), c, g, rc, (2, 3, 3, 3)), w)


def _valid():
    mask, codes, cb = _random_case(4, 600, 0.1, 16, 0)
    mask[0, 500] = True
    c, g, rc = R.encode_rows(mask, codes)
    return cb, c, g, rc, (4, 600)


@pytest.mark.parametrize("mutate, msg", [
    (lambda a: a.__setitem__(1, a[1].to(torch.int64)), "dtype"),
    (lambda a: a.__setitem__(2, a[2].to(torch.int32)), "dtype"),
    (lambda a: a.__setitem__(3, a[3].to(torch.int64)), "dtype"),
    (lambda a: a.__setitem__(3, a[3] + torch.tensor([1, -1, 0, 0], dtype=torch.int32)), None),
    (lambda a: a.__setitem__(3, a[3] + torch.tensor([1, 0, 0, 0], dtype=torch.int32)), "sum"),
    (lambda a: a.__setitem__(3, torch.tensor([-1, 0, 0, int(a[3].sum()) + 1], dtype=torch.int32)), "negative"),
    (lambda a: a.__setitem__(1, a[1][:-1]), "entries"),
    (lambda a: a.__setitem__(0, a[0][:5]), "codebook size"),
    (lambda a: a.__setitem__(2, torch.full_like(a[2], 250)), "run past"),
    (lambda a: a.__setitem__(4, (3, 600)), "rows"),
    (lambda a: a.__setitem__(0, torch.zeros(4, dtype=torch.int64)), "floating"),
])
def test_validate_rejects(mutate, msg):
    a = list(_valid())
    mutate(a)
    if msg is None:               # moving a count between rows shifts entries: cursor check or ok
        try:
            R.validate(*a)
        except ValueError:
            pass
        return
    with pytest.raises(ValueError, match=msg):
        R.validate(*a)


def test_validate_bits():
    cb, c, g, rc, shape = _valid()                 # 16 centroids
    R.validate(cb, c, g, rc, shape, bits=4)
    with pytest.raises(ValueError, match="2\\*\\*bits"):
        R.validate(cb, c, g, rc, shape, bits=3)
    with pytest.raises(ValueError, match="bits"):
        R.validate(cb, c, g, rc, shape, bits=9)
    # a code >= 2**bits with a codebook that is large enough for it
    c2 = c.clone()
    c2[g != R.FILLER] = 9
    with pytest.raises(ValueError, match="2\\*\\*bits|codebook size"):
        R.validate(torch.zeros(16), c2, g, rc, shape, bits=3)


def test_trailing_filler_past_k_rejected():
    c = torch.zeros(1, dtype=torch.uint8)
    g = torch.tensor([255], dtype=torch.uint8)
    rc = torch.tensor([1], dtype=torch.int32)
    R.validate(torch.zeros(1), c, g, rc, (1, 255))          # a lone filler: cursor -1 + 255 = 254
    with pytest.raises(ValueError, match="run past"):
        R.validate(torch.zeros(1), c, g, rc, (1, 254))


def test_codebook_gradient_is_grouped_sum():
    mask, codes, cb = _random_case(5, 40, 0.4, 8, 1)
    c, g, rc = R.encode_rows(mask, codes)
    cb = cb.clone().requires_grad_(True)
    w = R.decode_dense(cb, c, g, rc, (5, 40))
    upstream = torch.randn(5, 40)
    (w * upstream).sum().backward()
    expect = torch.zeros(8).index_add_(0, codes[mask], upstream[mask])
    torch.testing.assert_close(cb.grad, expect)


def test_resident_bytes():
    cb, c, g, rc, _ = _valid()
    assert R.resident_nbytes(cb, c, rc, torch.zeros(4)) == 2 * c.numel() + 16 * 4 + 4 * 4 + 4 * 4
