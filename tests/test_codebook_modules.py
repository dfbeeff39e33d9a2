"""Codebook* modules run the sparse-codebook kernels; their decode-then-ATen reference is the oracle."""
import copy

import pytest
import torch

import sqz_kernels as sk
from sqz_kernels.cli import main
from sqz_kernels.fire import EagerFire

from conftest import rel_err


@pytest.fixture(scope="module")
def compressed_net():
    torch.manual_seed(7)
    model = sk.models.squeezenet1_1(num_classes=37, fire_cls=EagerFire).eval()
    sk.compress(model, density=0.33, bits=6)
    return model


def _module_inputs(model, x):
    seen = []
    kinds = (sk.CodebookConv2d, sk.CodebookLinear, sk.CodebookFire)
    hooks = [m.register_forward_pre_hook(lambda mod, inp: seen.append((mod, inp[0])))
             for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [(m, inp) for m, inp in seen]


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_every_layer_matches_reference(compressed_net, fmt):
    x = torch.randn(2, 3, 96, 96).contiguous(memory_format=fmt)
    pairs = _module_inputs(compressed_net, x)
    kinds = {type(m).__name__ for m, _ in pairs}
    assert {"CodebookConv2d", "CodebookFire"} <= kinds
    with torch.no_grad():
        for m, inp in pairs:
            inp = torch.randn_like(inp).abs()  # fresh data, post-ReLU-like
            assert rel_err(m(inp), m.forward_reference(inp.double())) <= 1e-5, type(m).__name__


def test_whole_model_matches_reference(compressed_net):
    ref = copy.deepcopy(compressed_net)
    for m in ref.modules():
        if isinstance(m, (sk.CodebookConv2d, sk.CodebookLinear, sk.CodebookFire)):
            m.forward = m.forward_reference
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert rel_err(compressed_net(x), ref(x.double()).double()) <= 1e-4


def test_linear_module_matches_reference():
    torch.manual_seed(3)
    lin = torch.nn.Linear(300, 21)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.03] = 0
    m = sk.CodebookLinear.from_linear(lin, bits=5)
    x = torch.randn(4, 300)
    assert rel_err(m(x), m.forward_reference(x.double())) <= 1e-5


def test_codebook_gradient_through_kernels_equals_reference():
    torch.manual_seed(4)
    fire = EagerFire(12, 6, 8, 8)
    model = torch.nn.Sequential(fire)
    sk.compress(model, density=0.5, bits=4)
    cf = model[0]
    assert isinstance(cf, sk.CodebookFire)
    x = torch.randn(2, 12, 7, 7, requires_grad=True)
    g = torch.randn(2, 16, 7, 7)
    (cf(x) * g).sum().backward()
    got = [x.grad.clone()] + [c.codebook.grad.clone() for c in (cf.squeeze, cf.expand1x1, cf.expand3x3)]
    x.grad = None
    cf.zero_grad()
    (cf.forward_reference(x) * g).sum().backward()
    want = [x.grad] + [c.codebook.grad for c in (cf.squeeze, cf.expand1x1, cf.expand3x3)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_demo_compressed_runs(capsys):
    assert main(["demo", "--compress", "--rounds", "1", "--budget", "0.05", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "compressed, resident" in out and ".sqz file" in out and "sqz pools, all folds" in out
    assert "run as a KernelChain" in out


def test_report_resident_bytes_counts_each_tensor_once(compressed_net):
    from sqz_kernels.compression import report, resident_bytes

    assert report(compressed_net).resident_bytes == resident_bytes(compressed_net)


def test_empty_layer_reference_path_keeps_device():
    m = sk.CodebookConv2d(4, 3, 3, padding=1)  # no entries yet: an all-zero weight
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(m.forward_reference(x), m.bias.detach().view(1, 3, 1, 1).expand(1, 3, 5, 5))
    torch.testing.assert_close(m(x), m.forward_reference(x))


def test_call_op_skips_the_autograd_kernel_only_when_no_gradient_can_flow():
    """ops.call_op dispatches below Autograd (saving the Python autograd kernel, ~23 us a call)
    only in no_grad or when no input requires grad; otherwise gradients must still flow."""
    torch.manual_seed(0)
    m = sk.CodebookConv2d.from_conv(torch.nn.Conv2d(5, 7, 3, padding=1), bits=4)
    x = torch.randn(2, 5, 6, 6)
    y = m(x)  # codebook is a Parameter: the centroid gradient must flow
    assert y.grad_fn is not None
    y.sum().backward()
    assert m.codebook.grad is not None and m.codebook.grad.abs().sum() > 0
    with torch.no_grad():
        y0 = m(x)
    assert y0.grad_fn is None
    torch.testing.assert_close(y0, y.detach())
    m.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    yx = m(xg)
    assert yx.grad_fn is not None
    yx.sum().backward()
    assert xg.grad is not None
    assert m(x).grad_fn is None  # nothing requires grad


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_fold_relu_takes_the_relu_into_the_kernel(compressed_net, fmt):
    folded = copy.deepcopy(compressed_net)
    keys = list(folded.state_dict())
    assert sk.fold_relu_(folded) == 2  # conv1 and the classifier conv
    assert sk.fold_relu_(folded) == 0
    assert list(folded.state_dict()) == keys
    assert folded.features[0].relu and folded.classifier[1].relu
    assert isinstance(folded.features[1], torch.nn.Identity) and "relu=True" in repr(folded.features[0])
    x = torch.randn(1, 3, 96, 96).contiguous(memory_format=fmt)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), compressed_net(x), rtol=1e-6, atol=1e-6)
        # the reference path applies the folded ReLU too
        pre = torch.randn(1, 3, 40, 40, dtype=torch.float64)
        ref = torch.relu(compressed_net.features[0].forward_reference(pre))
        torch.testing.assert_close(folded.features[0].forward_reference(pre), ref)
        assert (folded.features[0](pre.float()) >= 0).all()


def test_fold_relu_linear_and_gradients():
    torch.manual_seed(5)
    lin = torch.nn.Linear(40, 9)
    seq = torch.nn.Sequential(sk.CodebookLinear.from_linear(lin, bits=4), torch.nn.ReLU())
    plain = copy.deepcopy(seq)
    assert sk.fold_relu_(seq) == 1 and seq[0].relu
    x = torch.randn(3, 40, requires_grad=True)
    y1, y2 = seq(x), plain(x)
    torch.testing.assert_close(y1, y2)
    g1 = torch.autograd.grad(y1.square().sum(), (x, seq[0].codebook))
    g2 = torch.autograd.grad(y2.square().sum(), (x, plain[0].codebook))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert rel_err(seq[0](x), seq[0].forward_reference(x.double())) <= 1e-5


def test_load_into_a_folded_model_keeps_the_folded_relus(compressed_net, tmp_path):
    folded = copy.deepcopy(compressed_net)
    sk.fold_relu_(folded)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = folded(x)
        sk.save(compressed_net, tmp_path / "net.sqz")
        sk.load(tmp_path / "net.sqz", folded)
        assert folded.features[0].relu and folded.classifier[1].relu
        torch.testing.assert_close(folded(x), ref, rtol=1e-6, atol=1e-6)


def test_layers_reject_inputs_with_the_wrong_channel_count(compressed_net):
    """The streams fit any input with enough channels; the layers check their own, as nn.Conv2d
    and nn.Linear do (a wider input would otherwise run with zero weights)."""
    conv = compressed_net.features[0]
    fire = compressed_net.features[3]
    lin = sk.CodebookLinear(6, 4, bits=4)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="expected input with 3 channels"):
            conv(torch.randn(1, 4, 16, 16))
        with pytest.raises(RuntimeError, match=f"expected input with {fire.squeeze.in_channels}"):
            fire(torch.randn(1, fire.squeeze.in_channels + 1, 9, 9))
        with pytest.raises(RuntimeError, match="expected input with 6 features"):
            lin(torch.randn(2, 7))
        assert lin(torch.randn(2, 6)).shape == (2, 4)
        # the reference path (other dtypes) raises too, through ATen
        with pytest.raises(RuntimeError):
            conv(torch.randn(1, 4, 16, 16, dtype=torch.bfloat16))


def test_repr_of_every_codebook_module():
    # print(model) of a compressed model: CodebookLinear has no pool (it once read one in repr)
    lin = sk.CodebookLinear.from_linear(torch.nn.Linear(6, 3), bits=3)
    lin.relu = True
    assert "in_features=6, out_features=3, bits=3" in repr(lin) and "relu=True" in repr(lin)
    model = sk.models.squeezenet1_1(fire_cls=sk.EagerFire)
    sk.compress(model, density=0.5, bits=4, progress=False)
    sk.fold_relu_(model)
    sk.fold_pool_(model)
    text = repr(model)
    assert "CodebookFire" in text and "pool=" in text and "global_pool=True" in text


@pytest.mark.parametrize("train", [False, True])
def test_folds_keep_the_training_mode_of_what_they_replace(train):
    # A fresh nn.Identity is in training mode; inside an eval model it would flip the modes
    # KernelChain's guard compares after any net.train(); net.eval().
    model = sk.models.squeezenet1_1(fire_cls=sk.EagerFire).train(train)
    sk.compress(model, density=0.5, bits=4, progress=False)
    sk.fast_pool_(model)
    assert sk.fold_relu_(model) > 0 and sk.fold_pool_(model) > 0
    idents = [m for m in model.modules() if type(m) is torch.nn.Identity]
    assert idents and all(m.training == train for m in idents)
