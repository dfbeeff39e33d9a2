"""Model surgery (fuse_fire_, compress, fold_relu_ / fold_pool_, load) on unusual but legal models:
it must compute what the model computed, or leave the module alone, never change it silently.
Each case here was a silent wrong result or a crash found by a review (round 14)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sqz_kernels as sk

torchvision = pytest.importorskip("torchvision")
from torchvision.models.squeezenet import Fire  # noqa: E402


def _x(c=8, hw=8):
    return torch.randn(2, c, hw, hw)


def _diff(a, b):
    return (a - b).abs().max().item()


class FireBN(Fire):
    """A Fire subclass whose forward adds a BatchNorm: not a plain Fire."""

    def __init__(self):
        super().__init__(8, 4, 6, 6)
        self.bn = nn.BatchNorm2d(12)

    def forward(self, x):
        return self.bn(super().forward(x)) - 1


class SwappedFire(Fire):
    """Torchvision's children, the concat in the other order."""

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand3x3_activation(self.expand3x3(x)),
                          self.expand1x1_activation(self.expand1x1(x))], 1)


@pytest.mark.parametrize("make", [FireBN, lambda: SwappedFire(8, 4, 6, 6)])
def test_fire_like_modules_with_other_forwards_are_left_alone(make):
    torch.manual_seed(0)
    m = nn.Sequential(make()).eval()
    x = _x()
    with torch.no_grad():
        ref = m(x)
        fused = copy.deepcopy(m)
        assert sk.fuse_fire_(fused) == 0 and not sk.is_plain_fire(m[0]) and sk.is_fire_like(m[0])
        assert type(fused[0]) is type(m[0])
        comp = copy.deepcopy(m)
        sk.compress(comp, density=1.0, bits=8, progress=False)  # its three convs, one by one
        assert type(comp[0]) is type(m[0]) and _diff(comp(x), ref) < 0.05 * ref.abs().max().item()
        assert set(comp.state_dict()) >= {k for k in m.state_dict() if ".bn." in k}
        # explicitly, the caller vouches for the forward
        assert isinstance(sk.FusedFire.from_fire(m[0]), sk.FusedFire)


def test_plain_fires_of_every_known_class_are_fused_and_compressed():
    torch.manual_seed(1)
    for cls in (Fire, sk.EagerFire, sk.FusedFire):
        m = nn.Sequential(cls(8, 4, 6, 6)).eval()
        assert sk.is_plain_fire(m[0])
        if cls is not sk.FusedFire:
            f = copy.deepcopy(m)
            assert sk.fuse_fire_(f) == 1 and isinstance(f[0], sk.FusedFire)
        c = copy.deepcopy(m)
        sk.compress(c, density=0.5, bits=6, progress=False)
        assert isinstance(c[0], sk.CodebookFire)
    hooked = Fire(8, 4, 6, 6)
    hooked.expand1x1.register_forward_hook(lambda mod, i, o: o * 2)
    assert not sk.is_plain_fire(hooked)  # the hook would be lost with the module


def test_a_fire_used_twice_stays_one_module():
    fire = Fire(8, 4, 4, 4)
    m = nn.Sequential(fire, fire).eval()
    x = _x()
    with torch.no_grad():
        ref = m(x)
        assert sk.fuse_fire_(m) == 1 and m[0] is m[1] and isinstance(m[0], sk.FusedFire)
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_shared_layers_stay_shared_and_are_not_folded():
    torch.manual_seed(2)
    c = nn.Conv2d(8, 8, 3, padding=1)
    m = nn.Sequential(c, nn.ReLU(), c, nn.MaxPool2d(2)).eval()
    x = _x()
    with torch.no_grad():
        ref = m(x)
        sk.compress(m, density=1.0, bits=8, progress=False)
        assert isinstance(m[0], sk.CodebookConv2d) and m[0] is m[2]  # one module, one codebook
        got = m(x)
        assert _diff(got, ref) < 0.02 * ref.abs().max().item()
        # the ReLU and the pool follow only one of the two uses: folding would apply them to both
        assert sk.fold_relu_(m) == 0 and sk.fold_pool_(m) == 0
        torch.testing.assert_close(m(x), got)


def test_conv_and_linear_subclasses_and_attention_are_skipped():
    class StdConv2d(nn.Conv2d):
        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    torch.manual_seed(3)
    m = nn.Sequential(StdConv2d(8, 6, 3, padding=1), nn.Conv2d(6, 4, 1)).eval()
    x = _x()
    with torch.no_grad():
        ref = m(x)
        r = sk.compress(m, density=1.0, bits=8, progress=False)
        assert type(m[0]) is StdConv2d and isinstance(m[1], sk.CodebookConv2d) and r.skipped == ["0"]
        assert _diff(m(x), ref) < 0.02 * ref.abs().max().item()
    with pytest.raises(ValueError, match="skipped: 0: StdConv2d has its own forward"):
        sk.compress(nn.Sequential(StdConv2d(8, 6, 3)), progress=False)
    # attention and the transformer layers read their Linear children's .weight (once: an
    # AttributeError at the first forward after compress)
    t = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                      nn.Linear(16, 4)).eval()
    tx = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = t(tx)
        r = sk.compress(t, density=1.0, bits=8, progress=False)
        assert {"0.self_attn.out_proj", "0.linear1", "0.linear2"} <= set(r.skipped)
        assert isinstance(t[1], sk.CodebookLinear)
        assert _diff(t(tx), ref) < 0.05 * ref.abs().max().item()


def test_layers_with_hooks_are_skipped():
    c = nn.Conv2d(8, 4, 3)
    c.register_forward_hook(lambda mod, i, o: o.clamp(min=0))
    m = nn.Sequential(c, nn.Conv2d(4, 4, 1)).eval()
    x = _x()
    with torch.no_grad():
        ref = m(x)
        r = sk.compress(m, density=1.0, bits=8, progress=False)
        assert m[0] is c and r.skipped == ["0"]
        assert _diff(m(x), ref) < 0.02 * ref.abs().max().item()


def test_frozen_layers_stay_frozen():
    m = nn.Sequential(nn.Conv2d(8, 4, 3), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(144, 3))
    m[0].requires_grad_(False)
    m[3].bias.requires_grad_(False)
    sk.compress(m, density=0.5, bits=4, progress=False)
    grads = {n: p.requires_grad for n, p in m.named_parameters()}
    assert grads == {"0.codebook": False, "0.bias": False, "1.codebook": True, "1.bias": True,
                     "3.codebook": True, "3.bias": False}


@pytest.mark.parametrize("kw", [dict(groups=2), dict(padding_mode="reflect"), dict(dilation=1, groups=4)])
def test_load_refuses_a_conv_the_file_does_not_describe(tmp_path, kw):
    a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
    sk.compress(a, density=1.0, bits=8, progress=False)
    sk.save(a, tmp_path / "a.sqz")
    b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, **kw))
    with pytest.raises(ValueError, match="does not match"):
        sk.load(tmp_path / "a.sqz", b)
    assert type(b[0]) is nn.Conv2d


def test_inputs_the_kernels_do_not_cover_run_the_eager_computation():
    torch.manual_seed(4)
    eager = nn.Sequential(Fire(8, 4, 6, 6)).eval()
    fused = copy.deepcopy(eager)
    sk.fuse_fire_(fused)
    x = _x()
    with torch.no_grad():
        # half on CPU: the eager Fire this module replaced (the kernel takes float32 / float64)
        torch.testing.assert_close(fused.half()(x.half()), eager.half()(x.half()))
        conv = nn.Conv2d(8, 5, 3, padding=1)
        cb = sk.CodebookConv2d.from_conv(conv, bits=8)
        u = x[0]  # unbatched [C, H, W], as nn.Conv2d takes
        torch.testing.assert_close(cb(u), cb(u.unsqueeze(0)).squeeze(0))
        assert cb(u).shape == conv(u).shape


def _compressed_seq(seed=5):
    torch.manual_seed(seed)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True))
    sk.compress(seq, density=0.5, bits=4, progress=False)
    return seq


@pytest.mark.parametrize("where", [0, 1, 2])
@pytest.mark.parametrize("fold", ["relu", "pool", "fast_pool"])
def test_folds_leave_modules_with_hooks_alone(where, fold):
    # found by a review: the folds dropped hooks (a backward hook on the ReLU freezing the layers
    # below, a forward hook on the pool scaling its output), changing gradients and outputs
    seq = _compressed_seq()
    seq[where].register_forward_hook(lambda m, i, o: o * 2)
    x = torch.randn(2, 3, 15, 15)
    with torch.no_grad():
        ref = seq(x)
        n = {"relu": sk.fold_relu_, "pool": sk.fold_pool_, "fast_pool": sk.fast_pool_}[fold](seq)
        torch.testing.assert_close(seq(x), ref)
    if fold == "relu" and where == 2:
        assert n == 1  # the hooks are elsewhere: the fold is fine
    if fold == "fast_pool":
        assert n == (where != 2)


def test_fire_outputs_changed_in_place_still_backpropagate():
    # found by a review: the fused ops saved their output for the ReLU's mask, so a bypass
    # (out += x, SqueezeNet's "simple bypass") or an in-place Dropout broke backward
    class Bypass(nn.Module):
        def __init__(self, fire):
            super().__init__()
            self.fire = fire

        def forward(self, x):
            o = self.fire(x)
            o += x
            return o

    torch.manual_seed(6)
    eager = Bypass(sk.EagerFire(16, 4, 8, 8))
    for surgery in (sk.fuse_fire_, lambda m: sk.compress(m, density=0.5, bits=4, progress=False)):
        m = copy.deepcopy(eager)
        surgery(m)
        ref = copy.deepcopy(m)
        if isinstance(ref.fire, sk.FusedFire):
            ref.fire = ref.fire.to_fire()
        else:
            ref.fire.forward = ref.fire.forward_reference
        x = torch.randn(1, 16, 8, 8, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        m(x).square().sum().backward()
        ref(x2).square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    seq = _compressed_seq()
    sk.fold_relu_(seq)  # the conv's own ReLU: its output changed in place afterwards
    x = torch.randn(1, 3, 9, 9, requires_grad=True)
    y = seq[0](x)
    y += 1
    y.sum().backward()
    assert x.grad is not None


def test_forward_mode_ad_takes_the_reference_paths():
    import torch.autograd.forward_ad as fwAD
    from sqz_kernels import codebook_ops as co
    torch.manual_seed(7)
    conv = nn.Conv2d(8, 5, 3, padding=1)
    cb = sk.CodebookConv2d.from_conv(conv, bits=8)
    fire = sk.FusedFire(8, 4, 3, 3)
    pool = sk.MaxPool2d(3, 2, ceil_mode=True)
    x, t = torch.randn(1, 8, 7, 7), torch.randn(1, 8, 7, 7)
    for mod, ref in ((cb, cb.forward_reference), (fire, fire.to_fire()),
                     (pool, lambda u: F.max_pool2d(u, 3, 2, ceil_mode=True))):
        with fwAD.dual_level():
            got = fwAD.unpack_dual(mod(fwAD.make_dual(x, t))).tangent
            want = fwAD.unpack_dual(ref(fwAD.make_dual(x, t))).tangent
        assert got is not None and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    # the ops themselves have no jvp: they refuse instead of dropping the tangent
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        sk.ops.max_pool2d(fwAD.make_dual(x, t), 3, 2, 0, True)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda u: co.codebook_conv2d(u, cb.codebook.detach(), cb.codes, cb.gaps,
                                                    cb.row_counts, None, 3, 1, 1, False), (x,), (t,))


def test_backward_inside_autocast():
    # found by a review: the Python backwards recompute convs / matmuls, which autocast turned to
    # bf16 against float32 operands (oneDNN: no primitive; index_add_: dtype mismatch)
    torch.manual_seed(8)
    m = nn.Sequential(sk.EagerFire(8, 4, 6, 6), nn.Flatten(), nn.Linear(12 * 25, 3))
    sk.compress(m, density=0.5, bits=4, progress=False)
    x = torch.randn(2, 8, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        y.float().sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
