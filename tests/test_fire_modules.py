"""FusedFire as a module: opcheck, gradcheck, torch.compile, state_dict compatibility, surgery."""
import pytest
import torch
from torch import nn

import sqz_kernels as sk
from sqz_kernels.fire import EagerFire

from conftest import make_fire_args, reference_fire, rel_err

try:
    import torchvision.models as tvm
    from torchvision.models.squeezenet import Fire as TvFire
except Exception:  # torchvision is an optional test dependency
    tvm = None


def test_opcheck_cpu():
    for fmt in (torch.contiguous_format, torch.channels_last):
        for bias in (True, False):
            args = list(make_fire_args(2, 6, 3, 4, 5, 5, 6, bias=bias))
            args[0] = args[0].contiguous(memory_format=fmt)
            args = [a.requires_grad_() if a is not None else None for a in args]
            torch.library.opcheck(torch.ops.sqz_kernels.fused_fire.default, tuple(args))


def test_gradcheck_float64():
    args = make_fire_args(2, 3, 2, 2, 3, 4, 5, dtype=torch.float64)
    args = tuple(a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(sk.ops.fused_fire, args, eps=1e-6, atol=1e-5)


def test_gradcheck_no_bias():
    args = make_fire_args(1, 3, 2, 2, 2, 3, 3, dtype=torch.float64, bias=False)
    args = tuple(a.requires_grad_() if a is not None else None for a in args)
    assert torch.autograd.gradcheck(sk.ops.fused_fire, args, eps=1e-6, atol=1e-5)


def test_backward_equals_eager_fire():
    torch.manual_seed(1)
    fused = sk.FusedFire(8, 4, 6, 5)
    eager = fused.to_fire()
    x = torch.randn(2, 8, 6, 7, requires_grad=True)
    g = torch.randn(2, 11, 6, 7)
    (fused(x) * g).sum().backward()
    grads_f = [x.grad.clone()] + [p.grad.clone() for p in fused.parameters()]
    x.grad = None
    fused.zero_grad()
    (eager(x) * g).sum().backward()
    grads_e = [x.grad] + [p.grad for p in eager.parameters()]
    for a, b in zip(grads_f, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), sk.FusedFire(8, 4, 6, 6), nn.AdaptiveAvgPool2d(1))
    x = torch.randn(2, 3, 12, 12)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.slow
def test_torch_compile_inductor():
    torch.manual_seed(2)
    model = nn.Sequential(sk.FusedFire(8, 4, 6, 6), nn.ReLU())
    x = torch.randn(1, 8, 9, 9)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_fusedfire_matches_eager_module():
    fused = sk.FusedFire(16, 8, 12, 12).eval()
    eager = fused.to_fire().eval()
    x = torch.randn(3, 16, 9, 10)
    with torch.no_grad():
        assert rel_err(fused(x), eager(x).double()) <= 1e-5


def test_from_fire_shares_parameters_and_to_fire_round_trip():
    eager = EagerFire(8, 4, 6, 5)
    fused = sk.FusedFire.from_fire(eager)
    assert fused.squeeze.weight is eager.squeeze.weight
    back = fused.to_fire()
    assert type(back) is EagerFire and back.expand3x3 is eager.expand3x3
    assert list(fused.state_dict().keys()) == list(eager.state_dict().keys())


def test_from_fire_rejects_non_fire():
    with pytest.raises(ValueError, match="not Fire-like"):
        sk.FusedFire.from_fire(nn.Conv2d(3, 3, 1))
    bad = EagerFire(8, 4, 6, 5)
    bad.expand3x3 = nn.Conv2d(4, 5, 3, padding=2)
    with pytest.raises(ValueError, match="not Fire-like"):
        sk.FusedFire.from_fire(bad)


def test_user_defined_fire_like():
    class MyFire(nn.Module):
        def __init__(self):
            super().__init__()
            self.squeeze = nn.Conv2d(6, 3, 1)
            self.expand1x1 = nn.Conv2d(3, 4, 1)
            self.expand3x3 = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            s = torch.relu(self.squeeze(x))
            return torch.cat([torch.relu(self.expand1x1(s)), torch.relu(self.expand3x3(s))], 1)

    m = nn.Sequential(MyFire(), nn.Identity())
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        want = m(x)
        # not a known Fire forward: fused only when the caller vouches for it
        assert sk.fuse_fire_(m) == 0 and isinstance(m[0], MyFire)
        assert sk.fuse_fire_(m, fire_like=True) == 1
        assert isinstance(m[0], sk.FusedFire)
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-6)


def test_fuse_fire_filter_and_idempotence():
    m = sk.models.squeezenet1_1(fire_cls=EagerFire)
    assert sk.fuse_fire_(m, filter_fn=lambda name, mod: name != "features.3") == 7
    assert not isinstance(m.features[3], sk.FusedFire)
    assert sk.fuse_fire_(m) == 1
    assert sk.fuse_fire_(m) == 0


@pytest.mark.skipif(tvm is None, reason="torchvision not installed")
@pytest.mark.parametrize("arch", ["squeezenet1_0", "squeezenet1_1"])
def test_torchvision_state_dict_and_logits(arch):
    torch.manual_seed(3)
    tv = getattr(tvm, arch)(weights=None).eval()
    ours = getattr(sk.models, arch)().eval()
    assert list(ours.state_dict().keys()) == list(tv.state_dict().keys())
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = tv(x)
        got = ours(x)
        assert rel_err(got, want.double()) <= 1e-4
        # Surgery on torchvision's own model gives the same logits.
        assert sk.fuse_fire_(tv) == 8
        assert all(not isinstance(m, TvFire) for m in tv.modules())
        assert rel_err(tv(x), want.double()) <= 1e-4
        tv_cl = tv(x.contiguous(memory_format=torch.channels_last))
        assert rel_err(tv_cl, want.double()) <= 1e-4


@pytest.mark.skipif(tvm is None, reason="torchvision not installed")
def test_torchvision_fire_from_fire():
    fire = TvFire(16, 8, 12, 12).eval()
    fused = sk.FusedFire.from_fire(fire)
    x = torch.randn(2, 16, 7, 7)
    with torch.no_grad():
        assert rel_err(fused(x), fire(x).double()) <= 1e-5


def test_channels_last_model_keeps_fused_weights_contiguous():
    m = torch.nn.Sequential(sk.FusedFire(8, 4, 6, 6)).to(memory_format=torch.channels_last)
    assert all(p.is_contiguous() for p in m.parameters())
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = m(x)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(y, m[0].to_fire()(x).double()) <= 1e-5


def test_backward_input_only():
    args = [a.detach() for a in make_fire_args(2, 6, 3, 4, 5, 5, 6)]
    x = args[0].clone().requires_grad_()
    sk.ops.fused_fire(x, *args[1:]).square().sum().backward()
    xr = args[0].clone().requires_grad_()
    sk.ops.fire_reference(xr, *args[1:]).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    assert all(a.grad is None for a in args[1:] if a is not None)
