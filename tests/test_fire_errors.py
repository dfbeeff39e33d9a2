"""Every bad argument to fused_fire raises a RuntimeError that names it; nothing crashes."""
import pytest
import torch

import sqz_kernels as sk

from conftest import make_fire_args


def _args():
    return list(make_fire_args(2, 8, 4, 6, 5, 7, 7))


def _expect(args, match):
    with pytest.raises(RuntimeError, match=match):
        sk.ops.fused_fire(*args)


def test_x_rank():
    a = _args()
    a[0] = a[0][0]
    _expect(a, "x must be 4-D")


@pytest.mark.parametrize("i,name", [(1, "w_sq"), (3, "w_e1"), (5, "w_e3")])
def test_weight_rank(i, name):
    a = _args()
    a[i] = a[i].flatten(1)
    _expect(a, f"{name} must be 4-D")


@pytest.mark.parametrize("i,name", [(1, "w_sq"), (2, "b_sq"), (3, "w_e1"), (4, "b_e1"), (5, "w_e3"), (6, "b_e3")])
def test_dtype_mismatch(i, name):
    a = _args()
    a[i] = a[i].double()
    _expect(a, f"{name} has dtype")


def test_unsupported_dtype():
    a = [t.half() for t in _args()]
    _expect(a, "float32 or float64")


def test_integer_dtype():
    a = [(t * 10).to(torch.int32) for t in _args()]
    _expect(a, "float32 or float64")


def test_squeeze_in_channels():
    a = _args()
    a[1] = torch.randn(4, 9, 1, 1)
    _expect(a, "w_sq must have shape")


def test_squeeze_kernel_not_1x1():
    a = _args()
    a[1] = torch.randn(4, 8, 3, 3)
    _expect(a, "w_sq must have shape")


def test_e1_in_channels():
    a = _args()
    a[3] = torch.randn(6, 5, 1, 1)
    _expect(a, "w_e1 must have shape")


def test_e3_not_3x3():
    a = _args()
    a[5] = torch.randn(5, 4, 5, 5)
    _expect(a, "w_e3 must be a 3x3 kernel")


def test_e3_in_channels():
    a = _args()
    a[5] = torch.randn(5, 3, 3, 3)
    _expect(a, "w_e3 must have shape")


@pytest.mark.parametrize("i,name,n", [(2, "b_sq", 4), (4, "b_e1", 6), (6, "b_e3", 5)])
def test_bias_shape(i, name, n):
    a = _args()
    a[i] = torch.randn(n + 1)
    _expect(a, f"{name} must have shape")


def test_empty_spatial():
    a = _args()
    a[0] = torch.randn(2, 8, 0, 7)
    _expect(a, "H, W >= 1")


def test_zero_output_channels():
    a = _args()
    a[3] = torch.randn(0, 4, 1, 1)
    a[4] = torch.randn(0)
    _expect(a, "at least one output channel")


def test_meta_device_uses_fake_kernel():
    a = [t.to("meta") for t in _args()]
    y = sk.ops.fused_fire(*a)
    assert y.shape == (2, 11, 7, 7) and y.device.type == "meta"


def test_bad_isa_name():
    with pytest.raises(RuntimeError, match="set_cpu_isa: isa must be one of"):
        sk.ops.set_cpu_isa("sse9")
