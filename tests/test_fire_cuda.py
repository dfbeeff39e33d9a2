"""CUDA FusedFire: correctness against the float64 reference, layouts, opcheck, autograd,
torch.compile, CUDA graphs, streams, one launch per call. Every test is marked `cuda` and skips
without a GPU."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import sqz_kernels as sk
from sqz_kernels.models import FIRE_CONFIGS
from sqz_kernels.ops import fire_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

@pytest.fixture(autouse=True)
def _no_tf32():
    """Eager fp32 convolutions on CUDA default to TF32 in cuDNN; compare against exact fp32."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _params(c, s, e1, e3, dtype, device="cuda", bias=True, gen=None):
    """Random weights scaled so that activations stay O(1) (kaiming-like), biases around 0 so
    that ReLU cuts a fair share of values (never all zeros)."""
    def w(o, i, k):
        return (torch.randn(o, i, k, k, generator=gen, dtype=torch.float64) * (2.0 / (i * k * k)) ** 0.5)

    def b(o):
        return torch.randn(o, generator=gen, dtype=torch.float64) * 0.1 if bias else None

    ps = [w(s, c, 1), b(s), w(e1, s, 1), b(e1), w(e3, s, 3), b(e3)]
    return [None if p is None else p.to(device=device, dtype=dtype) for p in ps]


def _input(n, c, h, w, dtype, device="cuda", gen=None):
    return torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _reference(x, params):
    """float64 CPU reference computed from the (already rounded) inputs."""
    p64 = [None if p is None else p.detach().double().cpu() for p in params]
    return fire_reference(x.detach().double().cpu(), *p64)


def _poisoned_call(fn):
    """Call fn() (which allocates and returns one fresh output tensor) so that every element of
    the returned output was NaN before the kernel ran: a first call tells which caching-allocator
    block the output gets; that block is NaN-filled and freed, and the second call, with the
    allocator in the same state, gets it back (checked by pointer, so the poisoning is real)."""
    for _ in range(3):
        y = fn()
        ptr = y.data_ptr()
        y.fill_(float("nan"))  # same stream as the kernel: ordered before it
        del y
        out = fn()
        if out.data_ptr() == ptr:
            return out
        del out
    raise AssertionError("could not place the output on a NaN-poisoned block")


def _check(out, ref, dtype, what=""):
    assert out.shape == ref.shape, what
    o = out.detach().double().cpu()
    assert not torch.isnan(o).any(), f"NaN in output (unwritten elements?) {what}"
    scale = ref.abs().max().item()
    assert scale > 0, "degenerate test: reference is all zeros"
    err = (o - ref).abs().max().item() / scale
    assert err <= TOL[dtype], f"rel err {err:.3g} > {TOL[dtype]} {what}"


def _run(x, params):
    return _poisoned_call(lambda: sk.ops.fused_fire(x, *params))


ALL_FIRES = sorted({(c, s, e1, e3, hw) for v in FIRE_CONFIGS.values() for (c, s, e1, e3, hw) in v})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", ALL_FIRES, ids=lambda c: "x".join(map(str, c)))
def test_squeezenet_fires(cfg, dtype):
    c, s, e1, e3, hw = cfg
    gen = torch.Generator().manual_seed(hash(cfg) & 0xFFFF)
    params = _params(c, s, e1, e3, dtype, gen=gen)
    x = _input(2, c, hw, hw, dtype, gen=gen)
    out = _run(x, params)
    assert out.is_contiguous()
    _check(out, _reference(x, params), dtype, str(cfg))


ODD = [
    # (n, c, h, w, s, e1, e3)
    (1, 3, 1, 1, 5, 17, 3),
    (3, 5, 1, 7, 3, 5, 17),
    (1, 17, 2, 3, 17, 3, 5),
    (3, 17, 7, 1, 5, 17, 17),
    (2, 33, 9, 17, 16, 33, 31),    # more than one row / column tile, channel remainders
    (1, 7, 17, 33, 70, 40, 9),     # S > 64: the squeeze is computed in chunks
    (1, 40, 13, 13, 130, 20, 36),  # three squeeze chunks
    (1, 64, 13, 13, 16, 300, 300),  # many expand chunks per group
    (2, 3, 31, 5, 1, 1, 1),        # single channels everywhere
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_odd_shapes(shape, dtype, bias):
    n, c, h, w, s, e1, e3 = shape
    gen = torch.Generator().manual_seed(1234 + sum(shape))
    params = _params(c, s, e1, e3, dtype, bias=bias, gen=gen)
    x = _input(n, c, h, w, dtype, gen=gen)
    _check(_run(x, params), _reference(x, params), dtype, str(shape))


def test_batch_zero():
    params = _params(5, 3, 4, 6, torch.float32)
    x = torch.empty(0, 5, 7, 7, device="cuda")
    out = sk.ops.fused_fire(x, *params)
    assert out.shape == (0, 10, 7, 7) and out.is_cuda
    xcl = torch.empty(0, 5, 7, 7, device="cuda").contiguous(memory_format=torch.channels_last)
    assert sk.ops.fused_fire(xcl, *params).shape == (0, 10, 7, 7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_three_and_large(dtype):
    gen = torch.Generator().manual_seed(7)
    params = _params(96, 16, 64, 64, dtype, gen=gen)
    for n in (3, 33):
        x = _input(n, 96, 27, 27, dtype, gen=gen)
        _check(_run(x, params), _reference(x, params), dtype, f"n={n}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "permuted", "expanded_weight"])
def test_layouts(dtype, layout):
    gen = torch.Generator().manual_seed(11)
    c, s, e1, e3 = 24, 16, 20, 36
    params = _params(c, s, e1, e3, dtype, gen=gen)
    x = _input(2, c, 11, 19, dtype, gen=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = _input(2, 2 * c, 14, 23, dtype, gen=gen)[:, ::2, 1:12, 2:21]
        assert not x.is_contiguous()
    elif layout == "permuted":
        x = _input(2, 11, c, 19, dtype, gen=gen).transpose(1, 2)  # odd strides, non-contiguous
    elif layout == "expanded_weight":
        # weights as non-contiguous views
        params[0] = _params(2 * c, s, e1, e3, dtype, gen=gen)[0][:, ::2]
        params[4] = params[4].transpose(2, 3).contiguous().transpose(2, 3)
    out = _run(x, params)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    else:
        assert out.is_contiguous()
    _check(out, _reference(x, params), dtype, layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_squeezenet_fire(dtype):
    gen = torch.Generator().manual_seed(5)
    params = _params(256, 32, 128, 128, dtype, gen=gen)
    x = _input(4, 256, 27, 27, dtype, gen=gen).contiguous(memory_format=torch.channels_last)
    out = _run(x, params)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _check(out, _reference(x, params), dtype)


def test_no_nan_in_poisoned_output_all_dtypes():
    """Explicit NaN-poisoning check: the output must be written everywhere (and the poisoning
    itself must work: a NaN-filled block is really what the output gets)."""
    for dtype in DTYPES:
        params = _params(17, 5, 9, 11, dtype)
        x = _input(3, 17, 6, 21, dtype)
        out = _run(x, params)
        assert not torch.isnan(out).any()
        y = sk.ops.fused_fire(x, *params)
        y.fill_(float("nan"))
        ptr = y.data_ptr()
        del y
        z = torch.empty_like(out)  # same size: gets the poisoned block back
        assert z.data_ptr() == ptr and torch.isnan(z).all(), "poisoning does not reach the output"


def test_cpu_and_cuda_agree():
    gen = torch.Generator().manual_seed(3)
    params = _params(64, 16, 64, 64, torch.float32, device="cpu", gen=gen)
    x = _input(2, 64, 13, 13, torch.float32, device="cpu", gen=gen)
    y_cpu = sk.ops.fused_fire(x, *params)
    y_gpu = sk.ops.fused_fire(x.cuda(), *[p.cuda() for p in params]).cpu()
    torch.testing.assert_close(y_gpu, y_cpu, rtol=1e-4, atol=1e-4)


def test_opcheck():
    from torch.library import opcheck
    for dtype in (torch.float32, torch.float16):
        params = _params(12, 8, 10, 6, dtype)
        for x in (_input(2, 12, 5, 7, dtype),
                  _input(2, 12, 5, 7, dtype).contiguous(memory_format=torch.channels_last)):
            opcheck(torch.ops.sqz_kernels.fused_fire.default, (x, *params))
        opcheck(torch.ops.sqz_kernels.fused_fire.default,
                (_input(1, 12, 3, 3, dtype), params[0], None, params[2], None, params[4], None))


def test_opcheck_with_grad():
    from torch.library import opcheck
    params = [p.requires_grad_() for p in _params(6, 4, 5, 3, torch.float32)]
    x = _input(2, 6, 4, 5, torch.float32).requires_grad_()
    opcheck(torch.ops.sqz_kernels.fused_fire.default, (x, *params))


def test_autograd_matches_eager():
    gen = torch.Generator().manual_seed(9)
    params = _params(16, 8, 12, 12, torch.float32, gen=gen)
    x = _input(2, 16, 9, 9, torch.float32, gen=gen)
    a = [t.clone().requires_grad_() for t in [x] + params]
    b = [t.clone().requires_grad_() for t in [x] + params]
    ya = sk.ops.fused_fire(*a)
    yb = fire_reference(*b)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    for ta, tb in zip(a, b):
        torch.testing.assert_close(ta.grad, tb.grad, rtol=1e-4, atol=1e-4)


def test_module_matches_eager_module():
    m = sk.EagerFire(64, 16, 64, 64).cuda()
    f = sk.FusedFire.from_fire(m)
    x = torch.randn(2, 64, 13, 13, device="cuda")
    torch.testing.assert_close(f(x), m(x), rtol=1e-4, atol=1e-4)


def test_torch_compile_fullgraph():
    params = _params(32, 16, 32, 32, torch.float32)

    def fn(x):
        return sk.ops.fused_fire(x, *params) * 2.0

    cfn = torch.compile(fn, fullgraph=True)
    x = _input(2, 32, 8, 8, torch.float32)
    torch.testing.assert_close(cfn(x), fn(x), rtol=1e-5, atol=1e-5)
    xcl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cfn(xcl), fn(xcl), rtol=1e-5, atol=1e-5)


def test_cuda_graph_capture_and_replay():
    for dtype in (torch.float32, torch.float16):
        params = _params(64, 16, 64, 64, dtype)
        static_x = _input(1, 64, 13, 13, dtype)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up outside capture (sets the smem attribute, caches)
                sk.ops.fused_fire(static_x, *params)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = sk.ops.fused_fire(static_x, *params)
        for _ in range(3):
            new_x = _input(1, 64, 13, 13, dtype)
            static_x.copy_(new_x)
            static_y.fill_(float("nan"))  # every replay must write the whole output
            g.replay()
            torch.cuda.synchronize()
            _check(static_y, _reference(new_x, params), dtype, "graph replay")


_COLD_CAPTURE = """
import sys, torch
sys.path.insert(0, {tests!r})
import sqz_kernels as sk
from test_fire_cuda import _params, _input, _reference, _check
for dtype in (torch.float32, torch.bfloat16):
    params = _params(40, 24, 40, 24, dtype)
    x = _input(1, 40, 6, 6, dtype)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # the op's first call in this process: smem attribute, occupancy
        y = sk.ops.fused_fire(x, *params)
    y.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    _check(y, _reference(x, params), dtype, str(dtype))
print("cold capture ok")
"""


def test_cuda_graph_capture_cold():
    """The first call of an instantiation may happen during capture (the shared-memory attribute
    and the occupancy query run then). In a fresh process: in this one, earlier tests have made
    those calls already, so the capture would not be cold."""
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", _COLD_CAPTURE.format(tests=tests)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "cold capture ok" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_in_input_propagates(dtype):
    """A NaN input pixel makes every output channel of that pixel NaN (and the expand3x3 half of
    its 3x3 neighbourhood), as eager conv + relu do; the rest matches the reference. The ReLU
    once was `v > 0 ? v : 0`, which turns NaN into 0."""
    params = _params(8, 6, 5, 7, dtype)
    x = _input(1, 8, 9, 11, dtype)
    x[0, :, 4, 5] = float("nan")
    ref = _reference(x, params)
    y = _run(x, params).double().cpu()
    nan_ref = torch.isnan(ref)
    assert nan_ref[0, :, 4, 5].all() and nan_ref.sum() == 5 + 7 * 9  # the reference's pattern
    assert torch.equal(torch.isnan(y), nan_ref)
    err = (y - ref)[~nan_ref].abs().max().item() / ref[~nan_ref].abs().max().item()
    assert err <= TOL[dtype]


def test_non_default_stream():
    params = _params(128, 32, 128, 128, torch.float16)
    x = _input(4, 128, 27, 27, torch.float16)
    ref = _reference(x, params)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(10_000_000)  # make a wrong-stream launch observable
        y = sk.ops.fused_fire(x, *params)
    torch.cuda.current_stream().wait_stream(s)
    _check(y, ref, torch.float16, "side stream")


def _device_events(fn):
    """Names of the device-side activities (kernels, memcpy, memset) recorded while fn runs."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
            # CUDA_SYNC records ("Context Sync", "Stream Wait Event", ...) are not launches
            and not any(w in e.name.lower() for w in ("sync", "wait event"))]


def test_one_kernel_launch_per_call():
    params = _params(64, 16, 64, 64, torch.float16)
    x = _input(1, 64, 55, 55, torch.float16)  # setup (and its kernels) outside the profiled region
    sk.ops.fused_fire(x, *params)  # warm-up: first-call host work is not what we count
    y = torch.empty(1, device="cuda")
    if not _device_events(lambda: y.add_(1.0)):  # control: does the profiler see kernels here?
        pytest.skip("torch.profiler records no CUDA kernels on this machine (CUPTI unavailable?)")
    names = _device_events(lambda: sk.ops.fused_fire(x, *params))
    # memset/memcpy count too: there must be none of them either
    assert len(names) == 1, names
    assert "fused_fire" in names[0], names


@pytest.mark.parametrize("bad", ["cpu_weight", "cpu_x", "dtype", "shape", "double"])
def test_bad_inputs_raise(bad):
    params = _params(8, 4, 6, 6, torch.float32)
    x = _input(1, 8, 5, 5, torch.float32)
    if bad == "cpu_weight":
        params[2] = params[2].cpu()
    elif bad == "cpu_x":
        x = x.cpu()
    elif bad == "dtype":
        params[4] = params[4].half()
    elif bad == "shape":
        params[4] = params[4][:, :3]
    elif bad == "double":
        x = x.double()
        params = [p.double() for p in params]
    with pytest.raises(RuntimeError):
        sk.ops.fused_fire(x, *params)
        torch.cuda.synchronize()


def test_multiple_calls_reuse_is_deterministic():
    params = _params(48, 24, 40, 40, torch.float16)
    x = _input(2, 48, 13, 13, torch.float16)
    a = sk.ops.fused_fire(x, *params)
    b = sk.ops.fused_fire(x, *params)
    assert torch.equal(a, b)
