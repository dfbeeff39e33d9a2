"""codebook_conv2d_max_pool (conv + ReLU + max-pool in one kernel) against the float64 reference
(decoded weight + ATen conv + ATen max-pool), and fold_pool_ surgery."""
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sqz_kernels as sk
from sqz_kernels import codebook_ops as co

sys.path.insert(0, os.path.dirname(__file__))
from codebook_helpers import (args, bad_stream_args, compressed_squeezenet, fold_save_load,  # noqa: E402
                              make_layer)

def _ref(x, L, C, k, s, p, relu, pk, ps, ceil):
    O = L["row_counts"].shape[0]
    b = L["bias"].double() if L["bias"] is not None else None
    y = F.conv2d(x.double(), L["dense"].reshape(O, C, *k), b, s, p)
    y = F.relu(y) if relu else y
    return F.max_pool2d(y, pk, ps, 0, ceil_mode=ceil)


CASES = [
    # C, O, conv k, stride, pad, H, W, pool k, pool stride, ceil
    (3, 64, (3, 3), (2, 2), (0, 0), 61, 59, 3, 2, True),     # SqueezeNet 1.1's conv1 + pool, small
    (3, 20, (7, 7), (2, 2), (0, 0), 45, 41, 3, 2, True),     # SqueezeNet 1.0's
    (5, 9, (3, 3), (1, 1), (1, 1), 12, 12, 3, 2, True),      # ceil_mode: a cut-off last window
    (5, 9, (3, 3), (1, 1), (1, 1), 12, 12, 3, 2, False),
    (4, 7, (1, 1), (1, 1), (0, 0), 9, 40, 2, 2, False),      # general pool path (2x2)
    (6, 5, (3, 3), (1, 1), (1, 1), 10, 37, (3, 2), (1, 2), True),
    (3, 33, (3, 3), (2, 2), (1, 1), 9, 300, 3, 2, True),     # wide rows: column strips of 4 vectors
    (2, 3, (3, 3), (1, 1), (0, 0), 5, 5, 3, 3, False),       # one window
    (70, 6, (3, 3), (1, 1), (1, 1), 8, 8, 3, 2, True),       # K = 630 > 255: fillers
]


def _check(case, L, channels_last, relu, n=2):
    C, O, k, s, p, H, W, pk, ps, ceil = case
    x = torch.randn(n, C, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = co.codebook_conv2d_max_pool(x, *args(L), k, s, p, relu, pk, ps, ceil)
    ref = _ref(x, L, C, k, s, p, relu, pk, ps, ceil)
    assert y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))
    # the two-op path agrees to rounding (bands change the tile lengths, hence which micro-kernel
    # and accumulator split sums a pixel)
    two = F.max_pool2d(co.codebook_conv2d(x, *args(L), k, s, p, relu), pk, ps, 0, ceil_mode=ceil)
    torch.testing.assert_close(y, two, rtol=1e-6, atol=1e-6 * max(1.0, two.abs().max().item()))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"C{c[0]}O{c[1]}k{c[2][0]}s{c[3][0]}_{c[5]}x{c[6]}_p{c[7]}s{c[8]}{'c' if c[9] else ''}")
@pytest.mark.parametrize("density", [1.0, 0.33, 0.1, 0.0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference(case, density, channels_last, cpu_isa):
    C, O, k = case[:3]
    L = make_layer(O, C * k[0] * k[1], density, bits=6, seed=hash(case) % 1000, force_fillers=True,
                   quads=density == 0.33)
    for relu in (True, False):
        _check(case, L, channels_last, relu)


@pytest.mark.parametrize("band_bytes", ["1", "20000", "100000000"])
def test_band_sizes(band_bytes, monkeypatch):
    # one pooled row per band (every band recomputes its shared rows), a few, and one band per image
    monkeypatch.setenv("SQZ_CONV_POOL_BAND_BYTES", band_bytes)
    case = (3, 16, (3, 3), (2, 2), (0, 0), 47, 33, 3, 2, True)
    _check(case, make_layer(16, 27, 0.5, 5, seed=1), False, True, n=3)
    _check(case, make_layer(16, 27, 0.5, 5, seed=1), True, True, n=3)


def test_threads_and_float64():
    n = torch.get_num_threads()
    case = (3, 10, (3, 3), (2, 2), (0, 0), 29, 31, 3, 2, True)
    L = make_layer(10, 27, 0.4, 4, seed=5)
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            _check(case, L, False, True, n=1)
    finally:
        torch.set_num_threads(n)
    Ld = make_layer(10, 27, 0.4, 4, dtype=torch.float64, seed=5)
    x = torch.randn(1, 3, 29, 31, dtype=torch.float64)
    y = co.codebook_conv2d_max_pool(x, *args(Ld), 3, 2, 0, True, 3, 2, True)
    torch.testing.assert_close(y, _ref(x, Ld, 3, (3, 3), 2, 0, True, 3, 2, True), rtol=1e-12, atol=1e-12)


def test_nan_propagates_like_the_two_op_path():
    L = make_layer(8, 27, 1.0, 6, seed=2)
    x = torch.randn(1, 3, 40, 40)
    x[0, 1, 17, 23] = float("nan")
    y = co.codebook_conv2d_max_pool(x, *args(L), 3, 1, 1, False, 3, 2, True)
    ref = F.max_pool2d(co.codebook_conv2d(x, *args(L), 3, 1, 1, False), 3, 2, 0, ceil_mode=True)
    assert torch.isnan(ref).any()
    torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad, match", [
    (dict(pool_kernel=(0, 3)), "pool_kernel must be two positive ints"),
    (dict(pool_stride=(2, 0)), "pool_stride must be two positive ints"),
    (dict(pool_kernel=9), "pool_kernel .* is larger than the conv output"),
    (dict(row_counts_long=True), "row_counts must be a 1-D int32"),
    (dict(codes_oob=True), "codes"),
])
def test_bad_input_raises(bad, match):
    cb, codes, gaps, counts, bias = bad_stream_args(make_layer(4, 27, 0.5, 3, seed=0),
                                                    bad.get("row_counts_long", False),
                                                    bad.get("codes_oob", False))
    with pytest.raises((RuntimeError, ValueError), match=match):
        co.codebook_conv2d_max_pool(torch.randn(1, 3, 10, 10), cb, codes, gaps, counts, bias, 3, 1, 0,
                                    True, bad.get("pool_kernel", 3), bad.get("pool_stride", 2))


def test_opcheck_gradcheck_compile():
    L = make_layer(5, 4 * 9, 0.5, 4, dtype=torch.float64, seed=7)
    cb = L["codebook"].clone().requires_grad_()
    bias = L["bias"].clone().requires_grad_()
    x = torch.randn(2, 4, 11, 10, dtype=torch.float64, requires_grad=True)
    rest = ([3, 3], [1, 1], [1, 1], True, [3, 3], [2, 2], True)
    op = torch.ops.sqz_kernels.codebook_conv2d_max_pool
    torch.library.opcheck(op, (x, cb, L["codes"], L["gaps"], L["row_counts"], bias, *rest))
    torch.library.opcheck(op, (x.detach().contiguous(memory_format=torch.channels_last), cb.detach(),
                               L["codes"], L["gaps"], L["row_counts"], None, *rest))
    f = lambda x_, cb_, b_: op(x_, cb_, L["codes"], L["gaps"], L["row_counts"], b_, *rest)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, cb, bias))
    # gradients equal those of the two-op path
    g1 = torch.autograd.grad(f(x, cb, bias).sum(), (x, cb, bias))
    two = F.max_pool2d(co.codebook_conv2d(x, cb, L["codes"], L["gaps"], L["row_counts"], bias, 3, 1, 1, True),
                       3, 2, 0, ceil_mode=True)
    g2 = torch.autograd.grad(two.sum(), (x, cb, bias))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    xf = torch.randn(1, 4, 11, 10)
    Lf = make_layer(5, 36, 0.5, 4, seed=7)
    g = lambda t: co.codebook_conv2d_max_pool(t, *args(Lf), 3, 1, 1, True, 3, 2, True)  # noqa: E731
    torch.testing.assert_close(torch.compile(g, fullgraph=True, backend="eager")(xf), g(xf))


def test_fold_pool_surgery_and_save_load(tmp_path):
    model = compressed_squeezenet()
    x = torch.randn(2, 3, 64, 64)
    folded, loaded, ref = fold_save_load(model, x, tmp_path)
    conv1 = folded.features[0]
    assert conv1.relu and conv1.pool == ([3, 3], [2, 2], True)
    assert type(folded.features[1]) is nn.Identity and type(folded.features[2]) is nn.Identity
    assert "pool=" in repr(conv1)
    assert loaded.features[0].pool == conv1.pool  # loading a file keeps the folded pool
    with torch.no_grad():
        # after fold_relu_ and fast_pool_ too (the sqz MaxPool2d folds like nn.MaxPool2d)
        other = copy.deepcopy(model)
        sk.fast_pool_(other)
        sk.fold_relu_(other)
        assert sk.fold_pool_(other) == 4
        torch.testing.assert_close(other(x), ref, rtol=1e-5, atol=1e-5)
        # the reference path (e.g. other devices) pools too
        torch.testing.assert_close(conv1.forward_reference(x), conv1(x), rtol=1e-5, atol=1e-5)


def test_fold_pool_leaves_other_patterns():
    conv = sk.CodebookConv2d(3, 4, 3)
    seq = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(3, 2, padding=1))      # padded pool: not folded
    assert sk.fold_pool_(seq) == 0 and conv.pool is None and not conv.relu
    seq = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2, return_indices=True))
    assert sk.fold_pool_(seq) == 0
    seq = nn.Sequential(conv, nn.Sigmoid(), nn.MaxPool2d(2))                  # not a ReLU between
    assert sk.fold_pool_(seq) == 0
    seq = nn.Sequential(conv, nn.MaxPool2d(2))                               # no ReLU: pool only
    assert sk.fold_pool_(seq) == 1 and conv.pool == ([2, 2], [2, 2], False) and not conv.relu
