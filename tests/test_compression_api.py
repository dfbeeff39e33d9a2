"""compress(): module surgery, exactness of the compressed model, fine-tuning, report."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sqz_kernels as sk
from sqz_kernels import compression as C
from sqz_kernels.codebook import CodebookConv2d, CodebookFire, CodebookLinear
from sqz_kernels.cli import _reference_copy
from sqz_kernels.compression import resident


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, stride=2, padding=1)
        self.fire = sk.fire.EagerFire(12, 4, 8, 8)
        self.dw = nn.Conv2d(16, 16, 3, groups=16)          # unsupported: stays dense
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.dw(self.fire(F.relu(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def test_surgery_types_and_no_dense_weight():
    torch.manual_seed(0)
    net = TinyNet()
    r = C.compress(net, density=0.5, bits=4, progress=False)
    assert isinstance(net.conv, CodebookConv2d) and isinstance(net.fc, CodebookLinear)
    assert isinstance(net.fire, CodebookFire) and isinstance(net.fire.expand3x3, CodebookConv2d)
    assert isinstance(net.dw, nn.Conv2d) and r.skipped == ["dw"]
    for k, t in net.state_dict().items():
        if k.startswith(("conv.", "fire.", "fc.")):
            assert not k.endswith("weight"), k             # no dense float weight kept
    assert [l.name for l in r.layers] == ["conv", "fire.squeeze", "fire.expand1x1", "fire.expand3x3", "fc"]
    for l in r.layers:
        assert l.nnz == round(0.5 * l.params) and l.n <= 16


def test_compressed_forward_equals_quantized_pruned_dense():
    torch.manual_seed(0)
    net = TinyNet().eval()
    ref = copy.deepcopy(net)
    C.compress(net, density=0.3, bits={"fc": 3, "fire.*": 5, "conv": 6}, progress=False)
    for name in ("conv", "fire.squeeze", "fire.expand1x1", "fire.expand3x3", "fc"):
        cm, dm = net.get_submodule(name), ref.get_submodule(name)
        w = cm.decoded_weight().detach()
        keep = C.magnitude_mask(dm.weight, 0.3)
        assert torch.equal(w != 0, keep) or torch.all((w != 0) <= keep)   # a centroid may be 0
        err = (w - dm.weight.detach() * keep)[keep].abs().max()
        spread = dm.weight.detach().abs().max()
        assert err <= spread / 2 ** (cm.bits - 1)          # within one quantization step
        with torch.no_grad():
            dm.weight.copy_(w)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-6)


def test_finetune_trains_only_centroids_with_grouped_gradient():
    torch.manual_seed(0)
    net = TinyNet()
    C.compress(net, density=0.5, bits=3, progress=False)
    before = {n: m.codes.clone() for n, m in net.named_modules() if isinstance(m, (CodebookConv2d, CodebookLinear))}
    cb0 = net.fc.codebook.detach().clone()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    losses = C.finetune(net, [(x, y)], F.cross_entropy, steps=5, lr=1e-2, progress=False)
    assert losses[-1] < losses[0]
    assert not torch.equal(net.fc.codebook.detach(), cb0)
    for n, m in net.named_modules():
        if n in before:
            assert torch.equal(m.codes, before[n])        # structure (and pruning) untouched
    # the gradient of a centroid is the sum of the gradients of its weights
    lay = net.fc
    xin, g = torch.randn(4, 16), torch.randn(4, 5)
    gc = torch.autograd.grad((F.linear(xin, lay.decoded_weight()) * g).sum(), lay.codebook)[0]
    wd = lay.decoded_weight().detach().requires_grad_(True)
    gw = torch.autograd.grad((F.linear(xin, wd) * g).sum(), wd)[0]
    rows, cols = resident.validate(lay.codebook.detach(), lay.codes, lay.gaps, lay.row_counts, lay.weight_shape)
    codes = lay.codes[lay.gaps != resident.FILLER].long()
    torch.testing.assert_close(gc, torch.zeros_like(gc).index_add_(0, codes, gw[rows, cols]))


def test_callable_finetune_and_prune_finetune_called():
    calls = []
    net = TinyNet()

    def retrain(model):
        calls.append("prune")
        assert isinstance(model.conv, nn.Conv2d)          # still dense, masks held
    C.compress(net, density=0.4, bits=4, finetune=lambda m: calls.append("ft"), prune_finetune=retrain,
               prune_schedule=[0.7, 0.4], progress=False)
    assert calls == ["prune", "prune", "ft"]


def test_squeezenet_preset_size_target():
    torch.manual_seed(0)
    m = sk.models.squeezenet1_0()
    r = C.compress(m, preset="squeezenet", progress=False)
    s = r.stages()
    assert s["dense"] > 4.9e6 and s["+Huffman"] <= 470_000
    assert all(l.bits == 6 and abs(l.density - 0.33) < 1e-3 for l in r.layers)
    assert C.resident_bytes(m) < s["dense"] / 4
    text = str(r)
    assert "+Huffman" in text and "classifier.1" in text


@pytest.mark.parametrize("kw, match", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"), (dict(bits=9), "bits"),
    (dict(bits=0), "bits"), (dict(bits={"nope": 4}), "bits: key 'nope'"),
    (dict(density={"conv": 2.0}), "density\\['conv'\\]"), (dict(preset="alexnet"), "preset"),
    (dict(init="kmeans++"), "init"), (dict(index_bits=9), "index_bits"),
    (dict(codebook_dtype="int8"), "codebook_dtype"), (dict(finetune=3), "finetune"),
])
def test_bad_arguments_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        C.compress(TinyNet(), progress=False, **kw)


def test_defaults_are_paper_bits():
    net = TinyNet()
    r = C.compress(net, progress=False)
    assert {l.name: l.bits for l in r.layers}["fc"] == 5 and r.layers[0].bits == 8
    assert all(l.density == 1.0 for l in r.layers)


def test_lone_fire_model_is_rejected_but_wrapped_works():
    with pytest.raises(ValueError, match="itself a Fire"):
        C.compress(sk.fire.EagerFire(8, 4, 8, 8), progress=False)
    net = nn.Sequential(sk.fire.EagerFire(8, 4, 8, 8))
    C.compress(net, density=0.5, bits=4, progress=False)
    assert isinstance(net[0], CodebookFire)
    assert net(torch.randn(1, 8, 5, 5)).shape == (1, 16, 5, 5)


def test_block_pruned_model_streams_share_row_quads_and_run_the_kernels():
    # compress(block=4): the rows of every block of 4 output channels hold byte-equal gap
    # streams (what the kernels run as row quads), and the model still equals its reference
    torch.manual_seed(0)
    net = sk.models.squeezenet1_1().eval()
    C.compress(net, density=0.33, bits=6, block=4, progress=False)
    for name, m in net.named_modules():
        if isinstance(m, (CodebookConv2d, CodebookLinear)):
            counts = m.row_counts.tolist()
            starts = [0]
            for c in counts:
                starts.append(starts[-1] + c)
            for g in range(0, len(counts) - 3, 4):
                rows = [m.gaps[starts[r]:starts[r + 1]] for r in range(g, g + 4)]
                assert all(torch.equal(rows[0], r) for r in rows[1:]), (name, g)
    ref = _reference_copy(net)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = net(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-4 * max(1.0, y.abs().max().item()))


def test_bad_block_names_the_argument():
    with pytest.raises(ValueError, match="block"):
        C.compress(TinyNet(), block=0, progress=False)
