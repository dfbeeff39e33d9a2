"""codebook_fused_fire_max_pool (the fused Fire + max-pool in one kernel) against the float64
reference (decoded weights + ATen convs + ATen max-pool), and fold_pool_ on Fires."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sqz_kernels as sk
from sqz_kernels import codebook_ops as co

sys.path.insert(0, os.path.dirname(__file__))
from codebook_helpers import args, compressed_squeezenet, fold_save_load, make_layer  # noqa: E402

def _layers(C, S, E1, E3, density, dtype=torch.float32, seed=0, quads=False):
    return (make_layer(S, C, density, 6, dtype, seed=seed + 1, quads=quads),
            make_layer(E1, S, density, 6, dtype, seed=seed + 2, quads=quads),
            make_layer(E3, 9 * S, density, 6, dtype, seed=seed + 3, force_fillers=True, quads=quads))


def _flat(layers):
    return [t for L in layers for t in args(L)]


def _ref(x, layers, pk, ps, ceil):
    y = co.codebook_fire_reference(
        x.double(), *[(L["codebook"].double(), L["codes"], L["gaps"], L["row_counts"],
                       L["bias"].double() if L["bias"] is not None else None) for L in layers])
    return F.max_pool2d(y, pk, ps, 0, ceil_mode=ceil)


CASES = [
    # C, S, E1, E3, H, W, pool k, pool stride, ceil
    (64, 16, 32, 32, 55, 55, 3, 2, True),     # SqueezeNet 1.1 fire3 + pool (fewer channels)
    (128, 32, 64, 64, 27, 27, 3, 2, True),    # fire5 + pool
    (96, 16, 24, 40, 54, 54, 3, 2, True),     # 1.0's 54x54 map: a cut-off last window
    (12, 5, 3, 4, 17, 31, 3, 2, False),
    (10, 4, 5, 6, 9, 140, 3, 2, True),        # wide rows
    (8, 3, 2, 5, 8, 9, 2, 2, False),          # general pool path
    (7, 3, 4, 4, 10, 12, (3, 2), (1, 2), True),
    (64, 32, 16, 48, 6, 40, 3, 2, True),      # K(e3) = 288 > 255: fillers
    (5, 2, 2, 3, 3, 3, 3, 3, False),          # one window
]


def _check(case, layers, channels_last, n=2):
    C, S, E1, E3, H, W, pk, ps, ceil = case
    x = torch.randn(n, C, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = co.codebook_fused_fire_max_pool(x, *_flat(layers), pk, ps, ceil)
    ref = _ref(x, layers, pk, ps, ceil)
    assert y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))
    two = F.max_pool2d(co.codebook_fused_fire(x, *_flat(layers)), pk, ps, 0, ceil_mode=ceil)
    torch.testing.assert_close(y, two, rtol=1e-6, atol=1e-6 * max(1.0, two.abs().max().item()))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "_".join(str(v) for v in c[:6]) + f"_p{c[6]}s{c[7]}{'c' if c[8] else ''}")
@pytest.mark.parametrize("density", [1.0, 0.33, 0.0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference(case, density, channels_last, cpu_isa):
    _check(case, _layers(*case[:4], density, seed=case[0], quads=density == 0.33), channels_last)


@pytest.mark.parametrize("band_bytes", ["1", "60000", "100000000"])
@pytest.mark.parametrize("threads", [1, 3])
def test_band_sizes_and_threads(band_bytes, threads, monkeypatch):
    # one pooled row per band (shared rows recomputed by every band), a few, one band per image;
    # 3 threads on 2 images split output channels too
    monkeypatch.setenv("SQZ_FIRE_BAND_BYTES", band_bytes)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        case = (20, 6, 8, 8, 23, 21, 3, 2, True)
        layers = _layers(20, 6, 8, 8, 0.4, seed=4)
        _check(case, layers, False, n=2)
        _check(case, layers, True, n=1)
    finally:
        torch.set_num_threads(n)


def test_float64_and_no_bias():
    layers = _layers(9, 4, 3, 5, 0.5, dtype=torch.float64, seed=9)
    for L in layers:
        L["bias"] = None
    x = torch.randn(1, 9, 15, 14, dtype=torch.float64)
    y = co.codebook_fused_fire_max_pool(x, *_flat(layers), 3, 2, True)
    torch.testing.assert_close(y, _ref(x, layers, 3, 2, True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad, match", [
    (dict(pool_kernel=(3, 0)), "pool_kernel must be two positive ints"),
    (dict(pool_stride=(0, 2)), "pool_stride must be two positive ints"),
    (dict(pool_kernel=20), "pool_kernel .* is larger than the Fire output"),
    (dict(e3_codes_oob=True), "e3_codes"),
])
def test_bad_input_raises(bad, match):
    layers = _layers(6, 3, 4, 4, 0.5, seed=1)
    flat = _flat(layers)
    if bad.get("e3_codes_oob"):
        flat[11] = flat[11].clone().fill_(250)
    with pytest.raises((RuntimeError, ValueError), match=match):
        co.codebook_fused_fire_max_pool(torch.randn(1, 6, 9, 9), *flat, bad.get("pool_kernel", 3),
                                        bad.get("pool_stride", 2), True)


def test_opcheck_gradcheck_compile():
    layers = _layers(5, 3, 2, 4, 0.6, dtype=torch.float64, seed=3)
    flat = _flat(layers)
    for i in (0, 5, 10):  # codebooks and biases of the three layers take gradients
        flat[i] = flat[i].clone().requires_grad_()
        flat[i + 4] = flat[i + 4].clone().requires_grad_()
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64, requires_grad=True)
    op = torch.ops.sqz_kernels.codebook_fused_fire_max_pool
    pool = ([3, 3], [2, 2], True)
    torch.library.opcheck(op, (x, *flat, *pool))
    torch.library.opcheck(op, (x.detach().contiguous(memory_format=torch.channels_last),
                               *[t.detach() for t in flat], *pool))
    diff = [x] + [flat[i] for i in (0, 4, 5, 9, 10, 14)]

    def f(x_, c0, b0, c1, b1, c2, b2):
        fl = list(flat)
        fl[0], fl[4], fl[5], fl[9], fl[10], fl[14] = c0, b0, c1, b1, c2, b2
        return op(x_, *fl, *pool)
    assert torch.autograd.gradcheck(f, tuple(diff))
    g1 = torch.autograd.grad(f(*diff).sum(), diff)
    two = F.max_pool2d(co.codebook_fused_fire(x, *flat), 3, 2, 0, ceil_mode=True)
    g2 = torch.autograd.grad(two.sum(), diff)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    lf = _layers(5, 3, 2, 4, 0.6, seed=3)
    xf = torch.randn(1, 5, 9, 8)
    g = lambda t: co.codebook_fused_fire_max_pool(t, *_flat(lf), 3, 2, True)  # noqa: E731
    torch.testing.assert_close(torch.compile(g, fullgraph=True, backend="eager")(xf), g(xf))


def test_fold_pool_folds_every_squeezenet_pool(tmp_path):
    for arch, fires in (("squeezenet1_1", (4, 7)), ("squeezenet1_0", (5, 10))):
        x = torch.randn(1, 3, 96, 96)
        folded, loaded, _ = fold_save_load(compressed_squeezenet(arch), x, tmp_path)
        assert all(folded.features[i].pool == ([3, 3], [2, 2], True) for i in fires)
        assert folded.classifier[1].global_pool
        assert type(folded.features[fires[0] + 1]) is nn.Identity
        fire = folded.features[fires[0]]
        assert "pool=" in repr(fire)
        assert loaded.features[fires[0]].pool == fire.pool
        with torch.no_grad():
            h = torch.randn(1, fire.inplanes, 20, 20)
            torch.testing.assert_close(fire.forward_reference(h), fire(h), rtol=1e-5, atol=1e-5)


def test_fire_with_relu_before_the_pool_is_left_alone():
    fire = sk.CodebookFire(8, 2, 4, 4)
    seq = nn.Sequential(fire, nn.ReLU(), nn.MaxPool2d(2))
    assert sk.fold_pool_(seq) == 0 and fire.pool is None


@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_strides_beyond_the_map(channels_last):
    # One pooled row / column whatever the stride (2^63 - 1 with ceil_mode once wrapped the
    # pooled-size arithmetic; 2^24 once sized an NCHW scratch row of 2^24 * 17 elements)
    layers = _layers(12, 5, 3, 4, 0.5, seed=9)
    x = torch.randn(2, 12, 9, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for ps, ceil in (((2 ** 24, 2 ** 62), False), ((2 ** 63 - 1, 3), True), ((5, 2 ** 40), True)):
        y = co.codebook_fused_fire_max_pool(x, *_flat(layers), 3, ps, ceil)
        ref = _ref(x, layers, 3, [min(s, 2 ** 30) for s in ps], ceil)  # torch takes < 2^31
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))
