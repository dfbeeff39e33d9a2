"""CPU fused_fire against the float64 eager reference."""
import pytest
import torch

import sqz_kernels as sk
from sqz_kernels.models import FIRE_CONFIGS

from conftest import make_fire_args, reference_fire, rel_err

ALL_FIRES = sorted({c for cfgs in FIRE_CONFIGS.values() for c in cfgs})
ODD = [  # (n, c, s, e1, e3, h, w)
    (1, 3, 5, 17, 5, 1, 1),
    (2, 5, 3, 5, 17, 1, 7),
    (3, 17, 5, 3, 7, 2, 3),
    (1, 7, 1, 1, 1, 7, 1),
    (3, 5, 17, 7, 3, 9, 11),
    (2, 33, 19, 21, 23, 18, 17),
    (1, 16, 8, 8, 8, 100, 3),
    (0, 16, 8, 8, 8, 13, 13),
    (17, 24, 8, 16, 16, 6, 6),
]


@pytest.fixture(autouse=True)
def nan_poison():
    """Every torch.empty (also the op's output allocation) is filled with NaN, so an element the
    kernel forgets to write fails the NaN check in rel_err."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev_det)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def test_poison_is_active():
    assert torch.isnan(torch.empty(64)).all()


def _check(shape, fmt, isa_tol=1e-5, dtype=torch.float32, bias=True, noncontig=False):
    n, c, s, e1, e3, h, w = shape
    args = list(make_fire_args(n, c, s, e1, e3, h, w, dtype=dtype, bias=bias))
    if fmt == "channels_last":
        args[0] = args[0].contiguous(memory_format=torch.channels_last)
    if noncontig:  # a strided view: every other column of a wider tensor
        wide = torch.randn(n, c, h, 2 * w, dtype=dtype)
        wide[..., ::2] = args[0]
        args[0] = wide[..., ::2]
        assert not args[0].is_contiguous()
    x = args[0]
    want_cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    y = sk.ops.fused_fire(*args)
    ref = reference_fire(args)
    assert y.shape == ref.shape and y.dtype == dtype
    if n > 0:
        assert rel_err(y, ref) <= isa_tol
    # The output keeps x's memory format (channels_last when x is only channels_last-contiguous).
    assert y.is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format)
    if fmt == "channels_last" and min(h, w) > 1 and c > 1 and n > 0:
        assert want_cl
    return y


@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
@pytest.mark.parametrize("cfg", ALL_FIRES, ids=str)
def test_squeezenet_fires(cfg, fmt, cpu_isa):
    c, s, e1, e3, side = cfg
    _check((1, c, s, e1, e3, side, side), fmt)


@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", ODD, ids=str)
def test_odd_shapes(shape, fmt, cpu_isa):
    _check(shape, fmt)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts(threads):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(1, 64, 16, 64, 64, 13, 13), (3, 8, 4, 4, 4, 5, 9), (1, 8, 4, 40, 40, 2, 2)]:
            _check(shape, "nchw")
            _check(shape, "channels_last")
    finally:
        torch.set_num_threads(prev)


def test_batch8_and_large_batch():
    _check((8, 128, 32, 128, 128, 27, 27), "nchw")
    _check((33, 16, 8, 8, 16, 5, 5), "channels_last")


def test_non_contiguous_input():
    _check((2, 9, 4, 5, 6, 7, 8), "nchw", noncontig=True)


def test_no_bias():
    _check((2, 9, 4, 5, 6, 7, 8), "nchw", bias=False)
    _check((2, 9, 4, 5, 6, 7, 8), "channels_last", bias=False)


def test_float64_exact():
    _check((2, 9, 4, 5, 6, 7, 8), "nchw", isa_tol=1e-12, dtype=torch.float64)
    _check((2, 9, 4, 5, 6, 7, 8), "channels_last", isa_tol=1e-12, dtype=torch.float64)


def test_non_contiguous_weights():
    args = list(make_fire_args(1, 8, 4, 6, 6, 5, 5))
    args[5] = args[5].transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not args[5].is_contiguous()
    assert rel_err(sk.ops.fused_fire(*args), reference_fire(args)) <= 1e-5


def test_nan_in_input_propagates():
    args = list(make_fire_args(1, 4, 4, 4, 4, 5, 5))
    args[0][0, :, 2, 2] = float("nan")
    y = sk.ops.fused_fire(*args)
    ref = torch.nn.functional.relu  # eager propagates NaN through conv + relu; so must we
    del ref
    assert torch.isnan(y[0, :, 2, 2]).all()


def test_fresh_random_each_run_differs():
    # Guards against a test helper that silently returns constant data.
    a = make_fire_args(1, 4, 4, 4, 4, 3, 3)[0]
    b = make_fire_args(1, 4, 4, 4, 4, 3, 3)[0]
    assert not torch.equal(a, b)
