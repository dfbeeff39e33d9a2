"""codebook_conv2d_global_avg_pool (conv + ReLU + global average pool in one kernel: the epilogue
sums each tile instead of storing it) against the float64 reference (decoded weight + ATen conv +
mean), and its fold by fold_pool_ (SqueezeNet's classifier)."""
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


def _ref(x, L, C, k, s, p, relu):
    O = L["row_counts"].shape[0]
    b = L["bias"].double() if L["bias"] is not None else None
    y = F.conv2d(x.double(), L["dense"].reshape(O, C, *k), b, s, p)
    y = F.relu(y) if relu else y
    return y.mean((2, 3), keepdim=True)


CASES = [
    # C, O, k, stride, pad, H, W
    (64, 100, (1, 1), (1, 1), (0, 0), 13, 13),   # SqueezeNet's classifier, fewer channels
    (16, 24, (3, 3), (1, 1), (1, 1), 10, 11),
    (3, 20, (7, 7), (2, 2), (0, 0), 37, 31),
    (6, 9, (3, 3), (1, 1), (1, 1), 9, 300),       # several tiles per row, several bands
    (70, 6, (3, 3), (1, 1), (1, 1), 8, 8),        # K = 630 > 255: fillers
    (8, 5, (1, 1), (1, 1), (0, 0), 1, 1),         # one pixel
]


def _check(case, L, channels_last, relu, n=2, dtype=torch.float32):
    C, O, k, s, p, H, W = case
    x = torch.randn(n, C, H, W, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = co.codebook_conv2d_global_avg_pool(x, *args(L), k, s, p, relu)
    ref = _ref(x, L, C, k, s, p, relu)
    assert y.shape == (n, O, 1, 1) and y.dtype == dtype
    assert not torch.isnan(y).any()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"C{c[0]}O{c[1]}k{c[2][0]}s{c[3][0]}_{c[5]}x{c[6]}")
@pytest.mark.parametrize("density", [1.0, 0.33, 0.1, 0.0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference(case, density, channels_last, cpu_isa):
    C, O, k = case[:3]
    L = make_layer(O, C * k[0] * k[1], density, bits=6, seed=O + C, force_fillers=True,
                   quads=density == 0.33)
    for relu in (True, False):
        _check(case, L, channels_last, relu)


def test_threads_kblocking_float64(monkeypatch):
    case = (40, 12, (3, 3), (1, 1), (1, 1), 15, 14)
    L = make_layer(12, 360, 0.4, 4, seed=5, quads=True)
    n = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            _check(case, L, False, True, n=3)
    finally:
        torch.set_num_threads(n)
    monkeypatch.setenv("SQZ_KBLOCK_BYTES", "1")  # one input channel per block: partial tiles
    monkeypatch.setenv("SQZ_KBLOCK_MIN_ENTRIES", "0")
    _check(case, L, False, True)
    _check(case, L, True, False)
    monkeypatch.delenv("SQZ_KBLOCK_BYTES")
    Ld = make_layer(12, 360, 0.4, 4, dtype=torch.float64, seed=5)
    _check(case, Ld, False, True, dtype=torch.float64)


def test_nan_propagates():
    L = make_layer(8, 27, 1.0, 6, seed=2)
    x = torch.randn(1, 3, 20, 20)
    x[0, 1, 7, 3] = float("nan")
    y = co.codebook_conv2d_global_avg_pool(x, *args(L), 3, 1, 1, False)
    ref = co.codebook_conv2d(x, *args(L), 3, 1, 1, False).mean((2, 3), keepdim=True)
    assert torch.isnan(ref).sum() >= 4  # every output channel that reads input channel 1
    torch.testing.assert_close(y, ref, equal_nan=True)


@pytest.mark.parametrize("bad, match", [
    (dict(codes_oob=True), "codebook_conv2d_global_avg_pool: codes"),
    (dict(row_counts_long=True), "row_counts must be a 1-D int32"),
    (dict(x3d=True), "x must be 4-D"),
    (dict(kernel=12), "larger than the padded input"),
])
def test_bad_input_raises(bad, match):
    cb, codes, gaps, counts, bias = bad_stream_args(make_layer(4, 27, 0.5, 3, seed=0),
                                                    bad.get("row_counts_long", False),
                                                    bad.get("codes_oob", False))
    x = torch.randn(3, 10, 10) if bad.get("x3d") else torch.randn(1, 3, 10, 10)
    with pytest.raises((RuntimeError, ValueError), match=match):
        co.codebook_conv2d_global_avg_pool(x, cb, codes, gaps, counts, bias, bad.get("kernel", 3), 1, 0,
                                           True)


def test_opcheck_gradcheck_compile():
    L = make_layer(5, 4 * 9, 0.5, 4, dtype=torch.float64, seed=7)
    cb = L["codebook"].clone().requires_grad_()
    bias = L["bias"].clone().requires_grad_()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    rest = ([3, 3], [1, 1], [1, 1], True)
    op = torch.ops.sqz_kernels.codebook_conv2d_global_avg_pool
    torch.library.opcheck(op, (x, cb, L["codes"], L["gaps"], L["row_counts"], bias, *rest))
    torch.library.opcheck(op, (x.detach().contiguous(memory_format=torch.channels_last), cb.detach(),
                               L["codes"], L["gaps"], L["row_counts"], None, *rest))
    f = lambda x_, cb_, b_: op(x_, cb_, L["codes"], L["gaps"], L["row_counts"], b_, *rest)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, cb, bias))
    g1 = torch.autograd.grad(f(x, cb, bias).sum(), (x, cb, bias))
    two = co.codebook_conv2d(x, cb, L["codes"], L["gaps"], L["row_counts"], bias, 3, 1, 1, True)
    g2 = torch.autograd.grad(F.adaptive_avg_pool2d(two, 1).sum(), (x, cb, bias))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    xf = torch.randn(1, 4, 11, 10)
    Lf = make_layer(5, 36, 0.5, 4, seed=7)
    g = lambda t: co.codebook_conv2d_global_avg_pool(t, *args(Lf), 3, 1, 1, True)  # noqa: E731
    torch.testing.assert_close(torch.compile(g, fullgraph=True, backend="eager")(xf), g(xf))


def test_fold_classifier_surgery_and_save_load(tmp_path):
    x = torch.randn(2, 3, 64, 64)
    folded, loaded, _ = fold_save_load(compressed_squeezenet(), x, tmp_path)
    conv = folded.classifier[1]
    assert conv.global_pool and conv.relu and conv.pool is None
    assert [type(m) for m in folded.classifier] == [nn.Dropout, type(conv), nn.Identity, nn.Identity]
    assert "global_pool=True" in repr(conv)
    assert loaded.classifier[1].global_pool
    with torch.no_grad():
        h = folded.features(x)
        torch.testing.assert_close(conv.forward_reference(h), conv(h), rtol=1e-5, atol=1e-5)


def test_fold_leaves_other_averages():
    conv = sk.CodebookConv2d(3, 4, 3)
    seq = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(2))   # not a global pool
    assert sk.fold_pool_(seq) == 0 and not conv.global_pool and not conv.relu
    seq = nn.Sequential(conv, nn.AdaptiveAvgPool2d((1, 1)))          # no ReLU: the mean only
    assert sk.fold_pool_(seq) == 1 and conv.global_pool and not conv.relu
    assert sk.fold_pool_(seq) == 0                                    # already folded
