"""sqz max_pool2d (CPU) against ATen's F.max_pool2d: a max is exact, so results must be bit-equal."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sqz_kernels as sk

ISAS = ["avx512", "avx2", "scalar"]


def _cases():
    # (N, C, H, W, kernel, stride, padding, ceil_mode): SqueezeNet's pools, odd shapes, widths
    # below / across one vector, windows that overhang with ceil_mode, stride 1 and 3, padding.
    return [
        (1, 64, 111, 111, 3, 2, 0, True),
        (1, 96, 109, 109, 3, 2, 0, True),
        (2, 5, 13, 17, 3, 2, 0, True),
        (1, 3, 12, 12, 3, 2, 0, True),   # ceil_mode adds a clipped last window
        (1, 3, 12, 12, 3, 2, 0, False),
        (1, 7, 3, 3, 3, 2, 0, True),
        (3, 2, 33, 47, 2, 2, 0, False),
        (1, 4, 20, 37, (3, 2), (1, 2), (1, 0), True),
        (1, 17, 9, 40, 3, 1, 1, False),
        (1, 5, 16, 65, (2, 4), 3, (1, 2), True),
        (2, 19, 1, 35, (1, 3), (1, 2), 0, False),
        # the 3x3 / stride-2 / unpadded fast path: column strips of 4, 3, 2 and 1 vectors and
        # their remainders, a cut-off last row and column (ceil_mode), even heights without it
        (1, 3, 40, 260, 3, 2, 0, True),
        (1, 2, 10, 98, 3, 2, 0, True),
        (1, 2, 7, 66, 3, 2, 0, True),
        (2, 3, 16, 34, 3, 2, 0, False),
        (1, 2, 54, 54, 3, 2, 0, True),
    ]


def _fmt(x, cl):
    return x.contiguous(memory_format=torch.channels_last) if cl else x


@pytest.fixture(params=ISAS)
def isa(request):
    try:
        sk.ops.set_cpu_isa(request.param)
    except RuntimeError:
        pytest.skip(f"ISA {request.param} not compiled into this build")
    yield request.param
    sk.ops.set_cpu_isa("best")


@pytest.mark.parametrize("case", _cases(), ids=lambda c: "x".join(map(str, c[:4])) + f"-k{c[4]}s{c[5]}p{c[6]}{'c' if c[7] else ''}")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_aten(case, channels_last, dtype, isa):
    n, c, h, w, k, s, p, ceil_mode = case
    x = _fmt(torch.randn(n, c, h, w, dtype=dtype), channels_last)
    y = sk.ops.max_pool2d(x, k, s, p, ceil_mode)
    ref = F.max_pool2d(x, k, s, p, ceil_mode=ceil_mode)
    assert y.shape == ref.shape
    assert torch.equal(y, ref)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True])
def test_nan_and_inf_propagate_like_aten(channels_last, isa):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 21, 27, 27, generator=g)
    flat = x.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)
    flat[idx[:40]] = float("nan")       # NaN first, last and middle of windows
    flat[idx[40:80]] = float("-inf")
    flat[idx[80:120]] = float("inf")
    x = _fmt(x, channels_last)
    y = sk.ops.max_pool2d(x, 3, 2, 0, True)
    ref = F.max_pool2d(x, 3, 2, ceil_mode=True)
    assert torch.isnan(ref).any()
    torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("where", ["first", "last", "late_strip", "unread"])
def test_nan_fast_path_falls_back_per_plane(where):
    # the 3x3 / stride-2 fast path cannot propagate NaN itself: a NaN anywhere in a window must
    # still come out, in the right plane only; a NaN in a column no window reads changes nothing
    x = torch.randn(1, 4, 21, 150)
    r, c = {"first": (0, 0), "last": (20, 148), "late_strip": (9, 137), "unread": (3, 149)}[where]
    x[0, 2, r, c] = float("nan")
    y = sk.ops.max_pool2d(x, 3, 2, 0, False)
    ref = F.max_pool2d(x, 3, 2)
    assert torch.isnan(ref).any() == (where != "unread")
    torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)


def test_fast_path_switch_gives_the_same_result(monkeypatch):
    x = torch.randn(1, 6, 55, 55)
    fast = sk.ops.max_pool2d(x, 3, 2, 0, True)
    monkeypatch.setenv("SQZ_POOL_FAST", "0")
    assert torch.equal(sk.ops.max_pool2d(x, 3, 2, 0, True), fast)
    assert torch.equal(fast, F.max_pool2d(x, 3, 2, ceil_mode=True))


def test_every_output_written():
    # an all-negative input: an output element never written would hold whatever at::empty gave
    for cl, shape in itertools.product((False, True), ((1, 33, 29, 31), (2, 3, 5, 70))):
        x = _fmt(-1 - torch.rand(*shape), cl)
        for _ in range(3):
            torch.testing.assert_close(sk.ops.max_pool2d(x, 3, 2, 0, True),
                                       F.max_pool2d(x, 3, 2, ceil_mode=True), rtol=0, atol=0)


def test_noncontiguous_and_empty():
    x = torch.randn(2, 8, 30, 40)[:, ::2, 1:, ::3]  # neither NCHW- nor channels_last-contiguous
    assert torch.equal(sk.ops.max_pool2d(x, 3, 2, 0, True), F.max_pool2d(x, 3, 2, ceil_mode=True))
    x = torch.randn(0, 4, 9, 9)
    assert sk.ops.max_pool2d(x, 3, 2, 0, True).shape == (0, 4, 4, 4)


def test_threads():
    n = torch.get_num_threads()
    x = torch.randn(1, 10, 55, 55)
    ref = F.max_pool2d(x, 3, 2, ceil_mode=True)
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert torch.equal(sk.ops.max_pool2d(x, 3, 2, 0, True), ref)
            assert torch.equal(sk.ops.max_pool2d(_fmt(x, True), 3, 2, 0, True), ref)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("bad, match", [
    (lambda: sk.ops.max_pool2d(torch.randn(3, 9, 9), 3), "x must be 4-D"),
    (lambda: sk.ops.max_pool2d(torch.ones(1, 1, 9, 9, dtype=torch.int32), 3), "float32 or float64"),
    (lambda: sk.ops.max_pool2d(torch.randn(1, 1, 9, 9), 3, 2, 2), "padding must be"),
    (lambda: sk.ops.max_pool2d(torch.randn(1, 1, 9, 9), 3, 0), "stride must be"),
    (lambda: sk.ops.max_pool2d(torch.randn(1, 1, 9, 9), 0), "kernel_size must be"),
    (lambda: sk.ops.max_pool2d(torch.randn(1, 1, 2, 9), 3), "larger than the padded input"),
    (lambda: sk.ops.max_pool2d(torch.randn(1, 1, 9, 9), (3, 3, 3)), "kernel_size must be an int or a pair"),
    # 2 * padding wrapped to -2 (a heap overrun / a wrong output shape, found by a review)
    (lambda: sk.ops.max_pool2d(torch.randn(1, 2, 5, 5), 1, 1, (0, 2 ** 63 - 1)), "padding must be"),
    (lambda: sk.ops.max_pool2d(torch.randn(1, 2, 5, 5), 1, 1, (2 ** 63 - 1, 0)), "padding must be"),
    # an empty image with padding: its padded rows were read from an empty x (a crash / -inf)
    (lambda: sk.ops.max_pool2d(torch.randn(1, 2, 0, 5, dtype=torch.float64), 2, 1, 1), "one row"),
    (lambda: sk.ops.max_pool2d(torch.randn(1, 2, 5, 0), 2, 1, 1), "one column"),
    (lambda: sk.ops.max_pool2d(torch.randn(1, 2, 0, 5).contiguous(memory_format=torch.channels_last),
                               2, 1, 1), "one row"),
])
def test_bad_input_raises(bad, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        bad()


def test_opcheck_gradcheck_compile():
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64, requires_grad=True)
    for args in ([3, 3], [2, 2], [0, 0], True), ([2, 3], [1, 2], [1, 1], False):
        torch.library.opcheck(torch.ops.sqz_kernels.max_pool2d, (x, *args))
        torch.library.opcheck(torch.ops.sqz_kernels.max_pool2d, (_fmt(x.detach(), True), *args))
        assert torch.autograd.gradcheck(lambda t: torch.ops.sqz_kernels.max_pool2d(t, *args), (x,))
    # gradients equal torch's (ties resolved the same way: ATen's own indices)
    xt = torch.randint(0, 3, (1, 2, 9, 9)).double().requires_grad_()
    g1, = torch.autograd.grad(sk.ops.max_pool2d(xt, 3, 2, 0, True).sum(), xt)
    g2, = torch.autograd.grad(F.max_pool2d(xt, 3, 2, ceil_mode=True).sum(), xt)
    assert torch.equal(g1, g2)
    m = sk.MaxPool2d(3, 2, ceil_mode=True)
    xc = torch.randn(1, 4, 27, 27)
    assert torch.equal(torch.compile(m, fullgraph=True, backend="eager")(xc), F.max_pool2d(xc, 3, 2, ceil_mode=True))


def test_module_fallbacks_and_surgery():
    x = torch.randn(2, 16, 29, 29)
    for kw in (dict(dilation=2), dict(return_indices=True)):
        m, ref = sk.MaxPool2d(3, 2, **kw), nn.MaxPool2d(3, 2, **kw)
        a, b = m(x), ref(x)
        assert all(torch.equal(u, v) for u, v in zip(a, b)) if isinstance(a, tuple) else torch.equal(a, b)
    assert torch.equal(sk.MaxPool2d(3, 2)(x[0]), F.max_pool2d(x[0], 3, 2))  # 3-D input: torch
    with pytest.raises(ValueError, match="expected nn.MaxPool2d"):
        sk.MaxPool2d.from_pool(nn.AvgPool2d(2))

    torch.manual_seed(0)
    model = sk.models.squeezenet1_1(fire_cls=sk.EagerFire).eval()
    keys = list(model.state_dict())
    xi = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref = model(xi)
        assert sk.fast_pool_(model) == 3
        assert sk.fast_pool_(model) == 0  # already swapped
        assert sum(isinstance(m, sk.MaxPool2d) for m in model.modules()) == 3
        assert list(model.state_dict()) == keys
        assert torch.equal(model(xi), ref)
    assert sk.fast_pool_(nn.Sequential(nn.MaxPool2d(2), nn.MaxPool2d(2)), lambda name, m: name == "1") == 1
    assert sk.fast_pool_(nn.MaxPool2d(2)) == 0  # the model itself cannot be replaced in place


@pytest.mark.parametrize("fmt", [False, True])
@pytest.mark.parametrize("stride", [(1, 2 ** 24), (2 ** 24, 1), (2 ** 30, 2 ** 30), (3, 7),
                                    (2 ** 63 - 1, 2 ** 62)])
def test_strides_beyond_the_input(fmt, stride):
    # One output column whatever the stride: the NCHW scratch row was (Wo + 16) * stride elements
    # (2 GB for 2^24)
    x = _fmt(torch.randn(2, 3, 5, 6), fmt)
    for k, p, ceil in ((1, 0, False), (2, 1, True), (3, 1, False)):
        # torch takes strides < 2^31; beyond the input every stride gives the same one window
        ref = F.max_pool2d(x, k, [min(s, 2 ** 30) for s in stride], p, ceil_mode=ceil)
        assert torch.equal(sk.ops.max_pool2d(x, k, stride, p, ceil), ref)
