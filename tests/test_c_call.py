"""sqz_kernels._C.call (csrc/python_calls.cpp): the short Python binding ops.call_op uses below
autograd. It must give exactly what torch.ops gives, reject bad arguments with errors naming them,
leave tensor subclasses / __torch_function__ modes to torch.ops, and stay visible to the profiler."""
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import sqz_kernels as sk
from sqz_kernels import _C, ops

sys.path.insert(0, os.path.dirname(__file__))
from codebook_helpers import args, make_layer  # noqa: E402


def _conv_args():
    L = make_layer(12, 5 * 9, 0.4, 6, seed=3)
    return (torch.randn(2, 5, 9, 11), *args(L), [3, 3], [1, 1], [1, 1], True)


def _fire_args():
    layers = (make_layer(6, 10, 0.4, 6, seed=1), make_layer(4, 6, 0.4, 6, seed=2),
              make_layer(5, 54, 0.4, 6, seed=3, force_fillers=True))
    return (torch.randn(1, 10, 8, 7), *[t for L in layers for t in args(L)])


@pytest.mark.parametrize("name, make, extra", [
    ("codebook_conv2d", _conv_args, ()),
    ("codebook_conv2d_max_pool", _conv_args, ([3, 3], [2, 2], True)),
    ("codebook_conv2d_global_avg_pool", _conv_args, ()),
    ("codebook_fused_fire", _fire_args, ()),
    ("codebook_fused_fire_max_pool", _fire_args, ([3, 3], [2, 2], False)),
])
def test_same_as_torch_ops(name, make, extra):
    a = make() + extra
    want = getattr(torch.ops.sqz_kernels, name)(*a)
    got = _C.call(name, *a)
    assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
    assert torch.equal(got, want)
    # tuples for int lists, channels_last x
    b = (a[0].contiguous(memory_format=torch.channels_last),) + tuple(
        tuple(v) if isinstance(v, list) else v for v in a[1:])
    torch.testing.assert_close(_C.call(name, *b), want, rtol=1e-5, atol=1e-5)


def test_dense_ops_too():
    x = torch.randn(1, 8, 9, 9)
    w = [torch.randn(4, 8, 1, 1), torch.randn(4), torch.randn(3, 4, 1, 1), None, torch.randn(5, 4, 3, 3),
         torch.randn(5)]
    assert torch.equal(_C.call("fused_fire", x, *w), torch.ops.sqz_kernels.fused_fire(x, *w))
    assert torch.equal(_C.call("max_pool2d", x, [3, 3], [2, 2], [0, 0], True),
                       torch.ops.sqz_kernels.max_pool2d(x, [3, 3], [2, 2], [0, 0], True))


@pytest.mark.parametrize("i, bad, exc, match", [
    (2, "codes", TypeError, "argument 'codebook' must be a Tensor"),
    (6, 0.5, TypeError, "argument 'bias' must be a Tensor or None"),
    (7, [3, "3"], TypeError, "argument 'kernel_size' must be an int"),
    (7, 3, TypeError, "argument 'kernel_size' must be a list or tuple of ints"),
    (10, 1, TypeError, "argument 'relu' must be a bool"),
    (8, [True, 1], TypeError, "argument 'stride' must be an int"),
    (8, [2 ** 70, 1], OverflowError, None),
])
def test_bad_argument_types(i, bad, exc, match):
    a = ["codebook_conv2d", *_conv_args()]
    a[i] = bad
    with pytest.raises(exc, match=match):
        _C.call(*a)


def test_bad_calls():
    a = _conv_args()
    with pytest.raises(TypeError, match="takes 10 arguments, got 9"):
        _C.call("codebook_conv2d", *a[:-1])
    with pytest.raises(TypeError, match="op_name must be a str"):
        _C.call(3, *a)
    with pytest.raises(TypeError, match="op_name must be a str"):
        _C.call()
    with pytest.raises(ValueError, match="no op sqz_kernels::nope"):
        _C.call("nope", *a)
    # an op that returns no Tensor (was an internal assert after running it)
    with pytest.raises(TypeError, match="cpu_isa does not return one Tensor"):
        _C.call("cpu_isa")
    # the kernel's own checks come through as they do from torch.ops
    b = list(a)
    b[2] = b[2].clone().fill_(200)
    with pytest.raises(RuntimeError, match=r"codebook_conv2d: codes\[0\] = 200 is out of range"):
        _C.call("codebook_conv2d", *b)


class _Sub(torch.Tensor):
    pass


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_subclasses_and_modes_go_to_torch_ops():
    a = _conv_args()
    assert _C.call("codebook_conv2d", a[0].as_subclass(_Sub), *a[1:]) is NotImplemented
    # nn.Parameter's __torch_function__ is torch's disabled one: no reason to leave the fast path
    p = torch.nn.Parameter(a[1], requires_grad=False)
    assert torch.equal(_C.call("codebook_conv2d", a[0], p, *a[2:]), torch.ops.sqz_kernels.codebook_conv2d(*a))
    with _Recorder() as rec:
        assert _C.call("codebook_conv2d", *a) is NotImplemented
        with torch.no_grad():
            y = sk.codebook_ops.codebook_conv2d(*a[:6], 3, 1, 1, True)
    assert any("codebook_conv2d" in s for s in rec.seen), rec.seen
    torch.testing.assert_close(y, torch.ops.sqz_kernels.codebook_conv2d(*a))
    # a subclass input through the public wrapper still works (torch.ops path)
    with torch.no_grad():
        ys = sk.codebook_ops.codebook_conv2d(a[0].as_subclass(_Sub), *a[1:6], 3, 1, 1, True)
    torch.testing.assert_close(ys.as_subclass(torch.Tensor), y)


def test_call_op_switch_and_profiler():
    a = _conv_args()
    m_args = (a[0], *a[1:6], 3, 1, 1, True)
    with torch.no_grad():
        fast = sk.codebook_ops.codebook_conv2d(*m_args)
        try:
            ops._USE_C_CALL = False
            slow = sk.codebook_ops.codebook_conv2d(*m_args)
        finally:
            ops._USE_C_CALL = True
        assert torch.equal(fast, slow)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            sk.codebook_ops.codebook_conv2d(*m_args)
    assert any(e.name == "sqz_kernels::codebook_conv2d" for e in prof.events())


def test_gradients_still_flow():
    # requires_grad inputs take the autograd path (torch.ops), not _C.call
    a = list(_conv_args())
    a[0] = a[0].double().requires_grad_()
    a[1] = a[1].double().requires_grad_()
    a[5] = a[5].double()
    y = sk.codebook_ops.codebook_conv2d(*a[:6], 3, 1, 1, True)
    assert y.requires_grad
    y.sum().backward()
    assert a[0].grad is not None and a[1].grad is not None


def test_call_leaves_calls_a_gradient_can_flow_through_to_torch_ops():
    """_C.call itself checks grad mode and requires_grad (ops.call_op no longer does first)."""
    a = list(_conv_args())
    want = torch.ops.sqz_kernels.codebook_conv2d(*a)
    cb = torch.nn.Parameter(a[1].clone())  # requires grad
    b = [a[0], cb, *a[2:]]
    assert _C.call("codebook_conv2d", *b) is NotImplemented
    xg = a[0].clone().requires_grad_()
    assert _C.call("codebook_conv2d", xg, *a[1:]) is NotImplemented
    with torch.no_grad():
        assert torch.equal(_C.call("codebook_conv2d", *b), want)
    with torch.inference_mode():
        assert torch.equal(_C.call("codebook_conv2d", *b), want)
    # nothing requires grad: the fast path, even with grad mode on
    assert torch.equal(_C.call("codebook_conv2d", *a), want)


def test_a_class_that_gains_torch_function_later_goes_to_torch_ops():
    """_C.call keeps "this class does not override __torch_function__" per class with the class's
    version tag: setting the attribute afterwards must be seen."""
    class Late(torch.Tensor):
        __torch_function__ = torch._C._disabled_torch_function_impl

    a = _conv_args()
    x = a[0].as_subclass(Late)
    assert torch.equal(_C.call("codebook_conv2d", x, *a[1:]).as_subclass(torch.Tensor),
                       torch.ops.sqz_kernels.codebook_conv2d(*a))
    assert torch.equal(_C.call("codebook_conv2d", x, *a[1:]).as_subclass(torch.Tensor),
                       torch.ops.sqz_kernels.codebook_conv2d(*a))  # from the kept answer

    def seen(cls, func, types, args=(), kwargs=None):
        return super(Late, cls).__torch_function__(func, types, args, kwargs or {})

    Late.__torch_function__ = classmethod(seen)
    assert _C.call("codebook_conv2d", x, *a[1:]) is NotImplemented
