import pytest
import torch

import sqz_kernels as sk


def make_fire_args(n, c, s, e1, e3, h, w, dtype=torch.float32, device="cpu", bias=True, gen=None):
    """Fresh random Fire inputs, scaled so that activations stay O(1) and ReLUs are half active."""
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    x = r(n, c, h, w)
    w_sq = r(s, c, 1, 1, scale=c ** -0.5)
    w_e1 = r(e1, s, 1, 1, scale=s ** -0.5)
    w_e3 = r(e3, s, 3, 3, scale=(9 * s) ** -0.5)
    b = (lambda k: r(k, scale=0.5)) if bias else (lambda k: None)
    return x, w_sq, b(s), w_e1, b(e1), w_e3, b(e3)


def reference_fire(args):
    """float64 eager Fire (ATen convs + cat): the oracle."""
    return sk.ops.fire_reference(*(None if a is None else a.detach().double().cpu() for a in args))


def rel_err(y, ref):
    y = y.detach().double().cpu()
    assert not torch.isnan(y).any(), "output contains NaN (an element was never written?)"
    scale = ref.abs().max().clamp_min(1e-30)
    return ((y - ref).abs().max() / scale).item()


@pytest.fixture(params=["best", "avx2", "scalar"])
def cpu_isa(request):
    """Runs a test on every CPU instruction-set path compiled into this build."""
    try:
        sk.ops.set_cpu_isa(request.param)
    except RuntimeError:
        pytest.skip(f"ISA {request.param} not compiled into this build")
    yield sk.ops.cpu_isa()
    sk.ops.set_cpu_isa("best")
