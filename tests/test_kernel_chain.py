"""sk.KernelChain: a traced chain of sqz ops run from one Python call equals the model bit for bit,
falls back to the model where the trace does not apply, and refuses models that are not a chain."""
import copy

import pytest
import torch
from torch import nn

import sqz_kernels as sk
from sqz_kernels import _C
from sqz_kernels import codebook_ops as co

from codebook_helpers import compressed_squeezenet


def _folded(arch="squeezenet1_1", block=1):
    torch.manual_seed(0)
    model = getattr(sk.models, arch)(fire_cls=sk.EagerFire).eval()
    sk.compress(model, density=0.33, bits=6, block=block, progress=False)
    sk.fast_pool_(model)
    sk.fold_relu_(model)
    sk.fold_pool_(model)
    return model


def _assert_runs_the_model(run, model, x):
    """run(x) falls back to model(x) (Dropout active: equal under the same seed)."""
    before = run.fallbacks
    with torch.no_grad():
        torch.manual_seed(3)
        y = run(x)
        torch.manual_seed(3)
        assert torch.equal(y, model(x))
    assert run.fallbacks == before + 1


@pytest.fixture(scope="module")
def folded():
    return _folded()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_chain_equals_model_bitwise(folded, fmt):
    x = torch.randn(1, 3, 80, 72).contiguous(memory_format=fmt)
    run = sk.KernelChain(folded, x)
    assert run.num_ops == 10  # conv1 + pool, 8 Fires (2 with pools), classifier + mean
    x2 = torch.randn_like(x)  # fresh values, same shape and strides: the chain runs
    with torch.no_grad():
        ref = folded(x2)
        y = run(x2)
    assert run.fallbacks == 0
    assert y.shape == ref.shape == (1, 1000)  # torchvision's flatten: the final view
    assert torch.equal(y, ref)


@pytest.mark.parametrize("arch,block", [("squeezenet1_0", 1), ("squeezenet1_1", 4)])
def test_chain_other_models(arch, block):
    model = _folded(arch, block)
    x = torch.randn(2, 3, 64, 64)
    run = sk.KernelChain(model, x)
    with torch.no_grad():
        assert torch.equal(run(x), model(x))
    assert run.fallbacks == 0


def test_fallbacks_give_the_model_output(folded):
    x = torch.randn(1, 3, 64, 64)
    run = sk.KernelChain(folded, x)
    with torch.no_grad():
        other_shape = torch.randn(1, 3, 72, 64)
        assert torch.equal(run(other_shape), folded(other_shape))
        other_strides = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(run(other_strides), folded(other_strides))
        assert torch.equal(run(x.double()), folded(x.double()))
    assert run.fallbacks == 3
    model = copy.deepcopy(folded)
    run = sk.KernelChain(model, x)
    model.train()  # Dropout active: the traced (eval) chain no longer applies
    _assert_runs_the_model(run, model, x)


def test_gradients_flow_through_the_fallback(folded):
    model = copy.deepcopy(folded)
    x = torch.randn(1, 3, 64, 64)
    run = sk.KernelChain(model, x)
    model.zero_grad()
    run(x).sum().backward()  # grad mode on and the codebooks require grad: the model runs
    assert run.fallbacks == 1
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("codebook")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        run(x)
    with torch.inference_mode():
        run(x)
    assert run.fallbacks == 1


def test_in_place_parameter_updates_are_seen(folded):
    model = copy.deepcopy(folded)
    x = torch.randn(1, 3, 64, 64)
    run = sk.KernelChain(model, x)
    with torch.no_grad():
        before = run(x)
        cb = model.features[3].expand3x3.codebook
        cb.mul_(-1.5)
        after = run(x)
        assert torch.equal(after, model(x))
        assert not torch.equal(after, before)


def test_refuses_models_that_are_not_a_chain():
    x = torch.randn(1, 3, 64, 64)
    # an in-place ReLU between two ops: the next op's input is the same tensor, changed
    model = _folded()
    model.features[1] = nn.ReLU(inplace=True)  # after conv1 (+ its folded pool)
    with pytest.raises(ValueError, match="changed in place"):
        sk.KernelChain(model, x)
    # an ATen max-pool between two ops: a new tensor the ops did not make
    model = compressed_squeezenet()
    sk.fold_relu_(model)
    with pytest.raises(ValueError, match="not the previous output"):
        sk.KernelChain(model, x)
    # no sqz op at all
    with pytest.raises(ValueError, match="no sqz_kernels op"):
        sk.KernelChain(nn.Identity(), x)
    # training mode: Dropout makes a new tensor before the classifier
    model = _folded().train()
    with pytest.raises(ValueError, match="not the previous output"):
        sk.KernelChain(model, x)


class _Unowned(nn.Module):
    """A codebook conv whose codebook is computed in forward: not a parameter the chain can hold."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        cb, codes, gaps, counts, bias = self.layer._kernel_state(x)
        return co.codebook_conv2d(x, cb * 1.0, codes, gaps, counts, bias, 1, 1, 0, True)


class _TwoOutputs(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        y = self.layer(x)
        return y, y


def _small_conv():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 5))
    sk.compress(net, density=0.5, bits=4, progress=False)
    return net.eval()


def test_step_views_and_bad_arguments():
    x = torch.randn(2, 3, 6, 5)
    net = _small_conv()
    sk.fold_relu_(net)
    sk.fold_pool_(net)  # conv + ReLU + mean as one op; then Flatten (a view) and the linear
    run = sk.KernelChain(net, x)
    assert run.num_ops == 2
    with torch.no_grad():
        assert torch.equal(run(x), net(x))
    with pytest.raises(ValueError, match="not a parameter or buffer"):
        sk.KernelChain(_Unowned(net[0]), x)
    with pytest.raises(ValueError, match="one Tensor"):
        sk.KernelChain(_TwoOutputs(net), x)
    with pytest.raises(TypeError, match="plain torch.Tensor"):
        sk.KernelChain(net, nn.Parameter(x))


def test_c_entry_points_reject_bad_input():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(TypeError, match="chain_build"):
        _C.chain_run(object(), x)
    with pytest.raises(ValueError, match="at least one step"):
        _C.chain_build([], None)
    with pytest.raises(TypeError, match="takes"):
        _C.chain_build([("max_pool2d", (None, [2, 2]), None)], None)
    with pytest.raises(TypeError, match=r"\(op_name, args tuple, view\)"):
        _C.chain_build([("max_pool2d", [None], None)], None)
    with pytest.raises(ValueError, match="no op"):
        _C.chain_build([("no_such_op", (None,), None)], None)
    chain = _C.chain_build([("max_pool2d", (None, [2, 2], [2, 2], [0, 0], False), None)], [1, 12])
    y = _C.chain_run(chain, x)
    assert torch.equal(y, torch.nn.functional.max_pool2d(x, 2).view(1, 12))
    with pytest.raises(TypeError, match="x must be a Tensor"):
        _C.chain_run(chain, 3)
    with pytest.raises(TypeError, match="guards must be"):
        _C.chain_build([("max_pool2d", (None, [2, 2], [2, 2], [0, 0], False), None)], None, (x,))
    with pytest.raises(TypeError, match="guard entry"):
        _C.chain_build([("max_pool2d", (None, [2, 2], [2, 2], [0, 0], False), None)], None,
                       (x, [("not a dict", "k", 1)], []))
    d = {"k": 1}
    guarded = _C.chain_build([("max_pool2d", (None, [2, 2], [2, 2], [0, 0], False), None)], None,
                             (x, [(d, "k", d["k"])], [(d, 1)]))
    assert torch.equal(_C.chain_run(guarded, x), torch.nn.functional.max_pool2d(x, 2))
    assert _C.chain_run(guarded, x[:, :2]) is NotImplemented  # another shape
    d["k"] = object()
    assert _C.chain_run(guarded, x) is NotImplemented  # an entry replaced
    d["k"] = 1
    d["j"] = 2
    assert _C.chain_run(guarded, x) is NotImplemented  # an entry added


def test_replaced_parameters_and_submodule_modes_fall_back(folded):
    x = torch.randn(1, 3, 64, 64)
    model = copy.deepcopy(folded)
    run = sk.KernelChain(model, x)
    other = copy.deepcopy(folded)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
        model.load_state_dict(other.state_dict())  # Codebook layers install new tensors
        assert torch.equal(run(x), other(x))
    assert run.fallbacks == 1
    run = sk.KernelChain(model, x)  # a new chain holds the new tensors
    model.classifier.train()  # only a submodule (its Dropout) leaves eval mode
    _assert_runs_the_model(run, model, x)


def test_surgery_and_flags_after_the_trace_fall_back(folded):
    x = torch.randn(1, 3, 64, 64)
    model = copy.deepcopy(folded)
    run = sk.KernelChain(model, x)
    with torch.no_grad():
        model.features[0].relu = False  # a layer flag
        assert torch.equal(run(x), model(x))
        model.features[0].relu = True
        run(x)
        assert run.fallbacks == 1  # the same flag value again: the chain applies
        model.features[4] = copy.deepcopy(model.features[4])  # a replaced child (equal weights)
        assert torch.equal(run(x), model(x))
        assert run.fallbacks == 2
        model.features[4].expand1x1.bias = None  # a parameter removed
        assert torch.equal(run(x), model(x))
        assert run.fallbacks == 3

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    run = sk.KernelChain(model, x)
    with torch.no_grad(), Mode():
        run(x)
    assert run.fallbacks == 1


def test_input_gradients_flow_through_the_fallback(folded):
    model = copy.deepcopy(folded).requires_grad_(False)
    x = torch.randn(1, 3, 64, 64)
    run = sk.KernelChain(model, x)
    with torch.no_grad():
        run(x)
    assert run.fallbacks == 0  # frozen parameters, x without grad: the chain runs
    xg = x.clone().requires_grad_()
    run(xg).sum().backward()
    assert run.fallbacks == 1 and xg.grad is not None and xg.grad.abs().sum() > 0


class _Stateful(nn.Module):
    """Changes its own codebook in forward: a chain would replay one state."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        with torch.no_grad():
            self.layer.codebook.mul_(0.5)
        return self.layer(x)


def test_trace_refusals_leave_no_recorder_behind():
    from sqz_kernels import ops

    x = torch.randn(2, 3, 6, 5)
    net = _small_conv()
    sk.fold_relu_(net)
    sk.fold_pool_(net)
    with pytest.raises(ValueError, match="changed its parameters"):
        sk.KernelChain(_Stateful(net[0]), x)
    with pytest.raises(RuntimeError):
        sk.KernelChain(net, torch.randn(2, 4, 6, 5))  # wrong channel count: the layer raises
    assert ops._RECORDER is None

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode(), pytest.raises(ValueError, match="direct path"):
        sk.KernelChain(net, x)
    assert ops._RECORDER is None
    with torch.inference_mode():
        xi = torch.randn(2, 3, 6, 5)
    with pytest.raises(ValueError, match="inference"):
        sk.KernelChain(net, xi)


def test_errors_inside_chain_run_are_raised():
    chain = _C.chain_build([("max_pool2d", (None, [2, 2], [2, 2], [0, 0], False), None)], [1, 12])
    with pytest.raises(RuntimeError):
        _C.chain_run(chain, torch.randn(1, 3, 6, 6))  # pooled 1x3x3x3 cannot be viewed as [1, 12]
    with pytest.raises(RuntimeError):
        _C.chain_run(chain, torch.zeros(1, 3, 4, 4, dtype=torch.int32))


def test_parameters_converted_in_place_fall_back(folded):
    # model.double() swaps each parameter's data in place: same Python objects (the dict guards
    # pass), but the chain's held tensors change dtype under it
    x = torch.randn(1, 3, 64, 64)
    model = copy.deepcopy(folded)
    run = sk.KernelChain(model, x)
    model.double()
    _assert_runs_the_model(run, model, x)
    model.float()
    with torch.no_grad():
        assert torch.equal(run(x), model(x))
    assert run.fallbacks == 1  # float32 again: the chain applies
    bias = model.features[3].squeeze.bias
    with torch.no_grad():
        bias.data = torch.zeros(bias.numel() - 1)  # another shape, same object: the model's error
        with pytest.raises(RuntimeError, match="bias"):
            run(x)
    assert run.fallbacks == 2
