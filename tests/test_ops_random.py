"""Randomized differential tests of the CPU ops (the sparse-codebook ops of issue 5, the dense
FusedFire and max-pool) against their float64 references.

The fixed-case tests pin every path one at a time; these draw whole configurations at random, so
paths meet in combinations nobody listed: geometry (kernel, stride, padding, odd and one-pixel maps,
maps of one pixel tile and of several), memory format and strided views (channels_last, slices of a
larger tensor, every second channel, an expanded x), batch, threads, instruction set, density
(including empty layers), pruning structure (unstructured or row quads), bit width, bias, ReLU,
dtype, and the fused pooling epilogues. Each case's output memory is NaN-poisoned first.

Every run draws fresh cases; a failure names its seed. Reproduce with
    SQZ_FUZZ_SEED=<seed> python -m pytest tests/test_ops_random.py
and SQZ_FUZZ_CASES=<n> draws more (or fewer) cases per test (default 300, ~10 s; case i is the
same for any n > i). Mutations these tests caught in most runs of 300 cases (as did the fixed-case
tests): a channels_last gather reading the next channel in a band's last partial pixel group; a
3x3 layer marking the wrong input channel as used."""
import os
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sqz_kernels  # noqa: F401
from sqz_kernels import codebook_ops as co
from sqz_kernels import ops as sk_ops

sys.path.insert(0, os.path.dirname(__file__))
from codebook_helpers import args, make_layer  # noqa: E402
from test_codebook_kernels import _conv_ref, _fire_ref, _poison  # noqa: E402

_SEED = int(os.environ.get("SQZ_FUZZ_SEED", random.SystemRandom().randrange(2 ** 31)))
_CASES = int(os.environ.get("SQZ_FUZZ_CASES", "300"))
_ISAS = ["avx512", "avx2", "scalar"]
_ISAS = _ISAS[_ISAS.index(torch.ops.sqz_kernels.cpu_isa()):]


def _check(y, ref, absref, what, rel=2e-5):
    """|y - ref| <= rel * absref + 1e-6 elementwise, where absref is the same computation on |x|,
    |weights| and |bias|: a float32 sum's rounding error grows with the sum of its terms' magnitudes
    (and their number), not with the result, which cancellation can make small (a 7x7 layer of
    512 channels sums 25088 terms)."""
    assert not torch.isnan(y).any(), f"{what}: unwritten (NaN) output elements"
    err = (y.double() - ref).abs()
    bound = rel * absref + 1e-6
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {y.numel()} elements off, worst "
                           f"{(err / bound).max().item():.3g}x the bound, max error "
                           f"{err.max().item():.3g}")


def _layer(rng, O, K, dtype):
    density = float(rng.choice([0.0, 0.03, 0.1, 0.33, 0.6, 1.0]))
    L = make_layer(O, K, density, bits=int(rng.integers(1, 9)), dtype=dtype,
                   seed=int(rng.integers(1 << 30)), bias=bool(rng.random() < 0.8),
                   force_fillers=bool(rng.random() < 0.3), quads=bool(rng.random() < 0.5))
    L["desc"] = f"density {density}"
    return L


def _magnitude(L):
    """Layer L with |codebook|, |dense| and |bias|: the references on it and on |x| give _check's
    bound (their ReLUs then pass everything)."""
    return dict(L, codebook=L["codebook"].abs(), dense=L["dense"].abs(),
                bias=None if L["bias"] is None else L["bias"].abs())


def _input(rng, N, C, H, W, dtype):
    """x [N, C, H, W] in a random memory format / view."""
    kind = str(rng.choice(["nchw", "cl", "cl", "slice", "every2", "expand", "cl_slice"]))
    if kind == "nchw":
        x = torch.randn(N, C, H, W, dtype=dtype)
    elif kind == "cl":
        x = torch.randn(N, C, H, W, dtype=dtype).contiguous(memory_format=torch.channels_last)
    elif kind == "slice":  # channels and rows cut from a larger tensor
        x = torch.randn(N, C + 3, H + 2, W, dtype=dtype)[:, 1:1 + C, 2:2 + H]
    elif kind == "every2":
        x = torch.randn(N, 2 * C, H, W, dtype=dtype)[:, ::2]
    elif kind == "expand":  # channel stride 0
        x = torch.randn(N, 1, H, W, dtype=dtype).expand(N, C, H, W)
    else:  # channels_last view of a wider tensor (pixel stride > C)
        x = torch.randn(N, C + 5, H, W, dtype=dtype).contiguous(
            memory_format=torch.channels_last)[:, 2:2 + C]
    return x, kind


def _setup(rng):
    isa = str(rng.choice(_ISAS))
    torch.ops.sqz_kernels.set_cpu_isa(isa)
    threads = int(rng.integers(1, 4))
    torch.set_num_threads(threads)
    dtype = torch.float64 if rng.random() < 0.1 else torch.float32
    return f"isa {isa}, threads {threads}", dtype


@pytest.fixture
def restore():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
    torch.ops.sqz_kernels.set_cpu_isa("best")


def _geometry(rng):
    kernels = [(1, 1), (1, 1), (3, 3), (3, 3), (5, 5), (7, 7), (1, 3), (3, 1)]
    kh, kw = (int(v) for v in rng.choice(kernels))
    sh, sw = (int(v) for v in rng.choice([(1, 1), (1, 1), (2, 2), (1, 2), (2, 1)]))
    ph, pw = int(rng.integers(0, kh // 2 + 2)), int(rng.integers(0, kw // 2 + 2))
    # maps around the kernels' thresholds: one pixel, one tile (13x13, 16x16), >= 256 pixels
    H, W = (int(v) for v in rng.choice([(1, 1), (13, 13), (16, 16), (9, 40), (23, 19), (31, 31),
                                         (55, 55), (57, 61)]))
    if rng.random() < 0.4:
        H, W = int(rng.integers(1, 40)), int(rng.integers(1, 40))
    H, W = max(H, kh - 2 * ph), max(W, kw - 2 * pw)
    return (kh, kw), (sh, sw), (ph, pw), H, W


def _channels(rng):
    C = int(rng.choice([1, 2, 3, 4, 5, 16, 17, 40, 64, 96, 130, 200, 512]))
    O = int(rng.choice([1, 4, 7, 16, 20, 33, 48, 64, 80]))
    return C, O


def test_random_convs(restore):
    """codebook_conv2d, its max-pool and global-average-pool forms, on random configurations."""
    rng = np.random.default_rng(_SEED)
    for case in range(_CASES):
        setup, dtype = _setup(rng)
        C, O = _channels(rng)
        k, s, p, H, W = _geometry(rng)
        N = int(rng.choice([1, 1, 2, 3]))
        L = _layer(rng, O, C * k[0] * k[1], dtype)
        x, kind = _input(rng, N, C, H, W, dtype)
        relu = bool(rng.random() < 0.7)
        what = (f"seed {_SEED} case {case}: conv C {C} O {O} k {k} s {s} p {p} {N}x{H}x{W} {kind}, "
                f"{L['desc']}, relu {relu}, {setup}, {dtype}")
        ref = _conv_ref(x, L, C, k, s, p, relu)
        absref = _conv_ref(x.abs(), _magnitude(L), C, k, s, p, relu)
        op = str(rng.choice(["conv", "conv", "pool", "mean"]))
        if op == "pool" and ref.shape[2] >= 2 and ref.shape[3] >= 2:
            pk, ps = int(rng.choice([2, 3])), int(rng.choice([1, 2]))
            ceil = bool(rng.random() < 0.5)
            pk = min(pk, ref.shape[2], ref.shape[3])
            ref = F.max_pool2d(ref, pk, ps, ceil_mode=ceil)
            absref = F.max_pool2d(absref, pk, ps, ceil_mode=ceil)
            _poison(tuple(ref.shape), dtype)
            y = co.codebook_conv2d_max_pool(x, *args(L), k, s, p, relu, pk, ps, ceil)
            what += f", max_pool {pk}/{ps} ceil {ceil}"
        elif op == "mean":
            ref, absref = ref.mean((2, 3), keepdim=True), absref.mean((2, 3), keepdim=True)
            y = co.codebook_conv2d_global_avg_pool(x, *args(L), k, s, p, relu)
            what += ", global mean"
        else:
            _poison(tuple(ref.shape), dtype)
            y = co.codebook_conv2d(x, *args(L), k, s, p, relu)
        assert y.shape == ref.shape, what
        assert y.dtype == dtype, what
        _check(y, ref, absref, what)


def test_random_fires(restore):
    """codebook_fused_fire and its max-pool form on random configurations."""
    rng = np.random.default_rng(_SEED + 1)
    for case in range(_CASES):
        setup, dtype = _setup(rng)
        C = int(rng.choice([1, 3, 16, 40, 64, 96, 128, 200]))
        S = int(rng.choice([1, 3, 8, 16, 24, 48]))
        E1 = int(rng.choice([1, 5, 16, 64, 70]))
        E3 = int(rng.choice([1, 6, 16, 64, 70]))
        maps = [(1, 1), (13, 13), (16, 16), (27, 27), (9, 40), (55, 17)]
        H, W = (int(v) for v in rng.choice(maps))
        if rng.random() < 0.4:
            H, W = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        N = int(rng.choice([1, 1, 2, 3]))
        layers = [_layer(rng, S, C, dtype), _layer(rng, E1, S, dtype),
                  _layer(rng, E3, 9 * S, dtype)]
        x, kind = _input(rng, N, C, H, W, dtype)
        what = (f"seed {_SEED} case {case}: fire C {C} S {S} E1 {E1} E3 {E3} "
                f"{N}x{H}x{W} {kind}, "
                f"{', '.join(l['desc'] for l in layers)}, {setup}, {dtype}")
        ref = _fire_ref(x, layers)
        absref = _fire_ref(x.abs(), [_magnitude(l) for l in layers])
        flat = [t for l in layers for t in args(l)]
        if rng.random() < 0.3 and H >= 3 and W >= 3:
            ceil = bool(rng.random() < 0.5)
            ref = F.max_pool2d(ref, 3, 2, ceil_mode=ceil)
            absref = F.max_pool2d(absref, 3, 2, ceil_mode=ceil)
            _poison(tuple(ref.shape), dtype)
            y = co.codebook_fused_fire_max_pool(x, *flat, 3, 2, ceil)
            what += f", max_pool 3/2 ceil {ceil}"
        else:
            _poison(tuple(ref.shape), dtype)
            y = co.codebook_fused_fire(x, *flat)
        assert y.shape == ref.shape, what
        _check(y, ref, absref, what, rel=4e-5)  # two layers' rounding


def test_random_linears(restore):
    """codebook_linear on random shapes (leading dims, K around the 255-gap fillers)."""
    rng = np.random.default_rng(_SEED + 2)
    for case in range(_CASES):
        setup, dtype = _setup(rng)
        K = int(rng.choice([1, 7, 64, 255, 256, 700]))
        O = int(rng.choice([1, 5, 16, 33, 100]))
        lead = [tuple(), (1,), (3,), (2, 5), (40,)][int(rng.integers(0, 5))]
        L = _layer(rng, O, K, dtype)
        x = torch.randn(*lead, K, dtype=dtype)
        if rng.random() < 0.3 and len(lead) >= 1:  # rows of a wider tensor
            x = torch.randn(*lead, K + 3, dtype=dtype)[..., 2:2 + K]
        relu = bool(rng.random() < 0.5)
        what = (f"seed {_SEED} case {case}: linear {tuple(x.shape)} -> {O}, {L['desc']}, "
                f"relu {relu}, {setup}, {dtype}")
        b = L["bias"].double() if L["bias"] is not None else None
        ref = F.linear(x.double(), L["dense"], b)
        ref = F.relu(ref) if relu else ref
        absref = F.linear(x.double().abs(), L["dense"].abs(), None if b is None else b.abs())
        y = co.codebook_linear(x, *args(L), relu)
        assert y.shape == ref.shape, what
        _check(y, ref, absref, what)


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def test_random_grads(restore):
    """Gradients of every op (x, codebooks, biases) against autograd through the float64 reference
    (codebook_decode + ATen), on small random float64 configurations; ReLU ties (an output of
    exactly 0) do not occur with continuous random inputs."""
    rng = np.random.default_rng(_SEED + 3)
    for case in range(max(1, _CASES // 4)):
        setup, _ = _setup(rng)
        dtype = torch.float64  # tight comparison of the gradients
        op = str(rng.choice(["conv", "pool", "mean", "fire", "fire_pool", "linear"]))
        C, O = int(rng.choice([1, 3, 8, 20])), int(rng.choice([1, 4, 9]))
        N, H, W = int(rng.integers(1, 3)), int(rng.integers(3, 12)), int(rng.integers(3, 12))
        what = f"seed {_SEED} case {case}: grads of {op} C {C} O {O} {N}x{H}x{W}, {setup}"
        if op in ("fire", "fire_pool"):
            S, E1, E3 = int(rng.integers(1, 6)), int(rng.integers(1, 6)), int(rng.integers(1, 6))
            layers = [_layer(rng, S, C, dtype), _layer(rng, E1, S, dtype),
                      _layer(rng, E3, 9 * S, dtype)]
        elif op == "linear":
            layers = [_layer(rng, O, C, dtype)]
        else:
            k = (int(rng.choice([1, 3])), int(rng.choice([1, 3])))
            s, p = (int(rng.integers(1, 3)),) * 2, (int(rng.integers(0, 2)),) * 2
            layers = [_layer(rng, O, C * k[0] * k[1], dtype)]
            what += f", k {k} s {s} p {p}"
        x, kind = _input(rng, N, C, H, W, dtype)
        if op == "linear":
            x = torch.randn(N, H, C, dtype=dtype)
        what += f", {kind}, " + ", ".join(l["desc"] for l in layers)
        leaves = [(_leaf(l["codebook"]), _leaf(l["bias"])) for l in layers]
        refs = [(_leaf(l["codebook"]), _leaf(l["bias"])) for l in layers]
        xa, xr = _leaf(x), _leaf(x)

        def run(xx, cbs, ref):
            """The op (ref False) or its reference (ref True) with codebooks / biases cbs."""
            st = [(cb, l["codes"], l["gaps"], l["row_counts"], b)
                  for (cb, b), l in zip(cbs, layers)]
            flat = [t for s_ in st for t in s_]
            if op == "fire":
                if ref:
                    return co.codebook_fire_reference(xx, *st)
                return co.codebook_fused_fire(xx, *flat)
            if op == "fire_pool":
                if ref:
                    return F.max_pool2d(co.codebook_fire_reference(xx, *st), 3, 2, ceil_mode=True)
                return co.codebook_fused_fire_max_pool(xx, *flat, 3, 2, True)
            if op == "linear":
                if ref:
                    return F.relu(F.linear(xx, co.codebook_decode(*flat[:4], C), flat[4]))
                return co.codebook_linear(xx, *flat, True)
            if not ref:
                f = {"conv": co.codebook_conv2d, "pool": co.codebook_conv2d_max_pool,
                     "mean": co.codebook_conv2d_global_avg_pool}[op]
                return f(xx, *flat, k, s, p, True, *((2, 2) if op == "pool" else ()))
            w = co.codebook_decode(*flat[:4], C * k[0] * k[1]).reshape(O, C, *k)
            y = F.relu(F.conv2d(xx, w, flat[4], s, p))
            if op == "pool":
                return F.max_pool2d(y, 2, 2)
            return y.mean((2, 3), keepdim=True) if op == "mean" else y

        if op == "pool" and min((H + 2 * p[0] - k[0]) // s[0],
                                (W + 2 * p[1] - k[1]) // s[1]) < 1:
            continue  # no 2x2 pooling window
        y, yr = run(xa, leaves, False), run(xr, refs, True)
        assert y.shape == yr.shape, what
        g = torch.randn_like(yr)
        (y * g).sum().backward()
        (yr * g).sum().backward()
        pairs = [(xa.grad, xr.grad, "x")]
        for i, ((cb, b), (cbr, br)) in enumerate(zip(leaves, refs)):
            pairs.append((cb.grad, cbr.grad, f"codebook {i}"))
            if b is not None:
                pairs.append((b.grad, br.grad, f"bias {i}"))
        for got, want, name in pairs:
            assert (got is None) == (want is None), f"{what}: {name} grad presence"
            if got is not None:
                torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9,
                                           msg=lambda m: f"{what}: {name} grad: {m}")


def test_random_dense_fires(restore):
    """The dense fused_fire (FusedFire's CPU kernel) on random configurations; its weights may be
    channels_last too."""
    rng = np.random.default_rng(_SEED + 4)
    for case in range(_CASES // 2):
        setup, dtype = _setup(rng)
        C = int(rng.choice([1, 3, 16, 40, 64, 96, 128, 200]))
        S, E1, E3 = (int(rng.choice(v)) for v in ([1, 3, 8, 16, 48], [1, 5, 16, 64, 70],
                                                    [1, 6, 16, 64, 70]))
        H, W = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        N = int(rng.choice([1, 1, 2, 3]))
        x, kind = _input(rng, N, C, H, W, dtype)
        ws = [torch.randn(S, C, 1, 1, dtype=dtype) * C ** -0.5, torch.randn(S, dtype=dtype),
              torch.randn(E1, S, 1, 1, dtype=dtype) * S ** -0.5, torch.randn(E1, dtype=dtype),
              torch.randn(E3, S, 3, 3, dtype=dtype) * (9 * S) ** -0.5, torch.randn(E3, dtype=dtype)]
        if rng.random() < 0.3:
            ws = [w.contiguous(memory_format=torch.channels_last) if w.dim() == 4 else w for w in ws]
        if rng.random() < 0.3:
            ws[1] = ws[3] = ws[5] = None
        what = (f"seed {_SEED} case {case}: dense fire C {C} S {S} E1 {E1} E3 {E3} "
                f"{N}x{H}x{W} {kind}, bias {ws[1] is not None}, {setup}, {dtype}")
        d = [None if w is None else w.double() for w in ws]
        ref = sk_ops.fire_reference(x.double(), *d)
        absref = sk_ops.fire_reference(x.double().abs(), *[None if w is None else w.abs() for w in d])
        _poison(tuple(ref.shape), dtype)
        y = sk_ops.fused_fire(x, *ws)
        assert y.shape == ref.shape, what
        _check(y, ref, absref, what, rel=4e-5)


def test_random_max_pools(restore):
    """sqz's max_pool2d against F.max_pool2d (exact: a max rounds nothing) on random windows,
    strides, paddings, ceil modes and inputs (with -inf and NaN among the values)."""
    rng = np.random.default_rng(_SEED + 5)
    for case in range(_CASES):
        setup, dtype = _setup(rng)
        N, C = int(rng.choice([1, 2])), int(rng.choice([1, 3, 16, 17, 64]))
        H, W = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        kh, kw = int(rng.integers(1, min(H, 5) + 1)), int(rng.integers(1, min(W, 5) + 1))
        sh, sw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        ph, pw = int(rng.integers(0, kh // 2 + 1)), int(rng.integers(0, kw // 2 + 1))
        ceil = bool(rng.random() < 0.5)
        x, kind = _input(rng, N, C, H, W, dtype)
        for value, p in ((float("-inf"), 0.2), (float("nan"), 0.1)):
            if rng.random() < p:  # (a clone keeps a view's strides, an expanded x's become dense)
                x = x.clone()
                x[torch.rand(x.shape) < 0.15] = value
        what = (f"seed {_SEED} case {case}: max_pool {N}x{C}x{H}x{W} {kind} k ({kh}, {kw}) "
                f"s ({sh}, {sw}) p ({ph}, {pw}) ceil {ceil}, {setup}, {dtype}")
        ref = F.max_pool2d(x, (kh, kw), (sh, sw), (ph, pw), ceil_mode=ceil)
        y = sk_ops.max_pool2d(x, (kh, kw), (sh, sw), (ph, pw), ceil)
        assert y.shape == ref.shape, what
        torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{what}: {m}")
