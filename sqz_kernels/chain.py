"""KernelChain: a model whose forward is a chain of sqz_kernels ops, run from one Python call.

At batch 1 the Python between two layers (nn.Module calls, argument lists) cost 50-150 us here,
not the ~20 us it takes with warm caches: each layer evicts it. A compressed SqueezeNet spent
~0.8-1.2 ms of ~7.5 ms there. KernelChain traces one forward, checks that it is a pure chain of
sqz ops (each op's input is the previous op's output, untouched), and then runs the ops from C++
(`_C.chain_run`) with no Python between them::

    model.eval()
    sk.fold_relu_(model); sk.fold_pool_(model)     # every step a sqz op (see the checks below)
    run = sk.KernelChain(model, x)                 # traces model(x) once
    y = run(x)                                     # == model(x), bit for bit

A call falls back to ``model(x)`` when the input differs from the traced one in type, shape,
strides, dtype or device, when a gradient can flow (grad mode on and x or a parameter requires
grad), inside a ``__torch_function__`` mode, when a module's ``training`` flag differs from its
value at the trace, or when a parameter, buffer, child module or Codebook flag (``relu``, ``pool``, ``global_pool``)
was replaced or added since the trace (``load_state_dict`` installs new tensors in Codebook
layers; surgery replaces children); ``run.fallbacks`` counts those calls. In-place updates of the
held tensors (an optimizer step, ``mul_``) are seen. Like ``torch.jit.trace`` it records one path:
hooks added later (they do not run inside the chain), other attributes a forward reads, or a
forward whose Python branches on tensor values need a new KernelChain. The trace refuses a
forward that changes the model's parameters or buffers.
"""
from typing import List, Optional

import torch
from torch import Tensor, nn

from . import _C
from . import ops as _ops

__all__ = ["KernelChain"]


def _view_shape(t: Tensor, base: Tensor, what: str) -> Optional[List[int]]:
    """None if t is base; the shape if t is a view of all of contiguous base; else ValueError."""
    if t is base:
        return None
    if (t.data_ptr() == base.data_ptr() and t.numel() == base.numel() and t.dtype == base.dtype
            and t.is_contiguous() and base.is_contiguous()):
        return list(t.shape)
    raise ValueError(f"KernelChain: {what} is not the previous output (nor a view of all of it): "
                     "the model computes something between two sqz ops that the chain would skip")


# Attributes whose change would change a traced forward: nn.Module's mode, and the Codebook
# layers' flags (fold_relu_ / fold_pool_ set them).
_GUARDED_ATTRS = ("training", "relu", "pool", "global_pool")


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Equal shapes and elements, NaN where the other has NaN."""
    if a.shape != b.shape:
        return False
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


class KernelChain:
    """Runs ``model`` (a chain of sqz_kernels ops, traced on ``example``) from one Python call."""

    def __init__(self, model: nn.Module, example: Tensor):
        if type(example) is not Tensor:
            raise TypeError("KernelChain: example must be a plain torch.Tensor")
        if example.is_inference():
            raise ValueError("KernelChain: example is an inference tensor (it has no version "
                             "counter for the trace's checks); make it outside torch.inference_mode")
        self.model = model
        self.fallbacks = 0
        with torch.no_grad():
            steps, final_view, expected = self._trace(model, example)
            # chain_run checks these on every call (csrc/python_calls.cpp) and returns
            # NotImplemented when one fails: each module's training flag and layer flags, and the
            # identity and number of its parameters, buffers and children
            entries, lengths = [], []
            for m in model.modules():
                attrs = m.__dict__
                for key in _GUARDED_ATTRS:
                    if key in attrs:
                        entries.append((attrs, key, attrs[key]))
                for d in (m._parameters, m._buffers, m._modules):
                    entries.extend((d, k, v) for k, v in d.items())
                    lengths.append((d, len(d)))
            self._chain = _C.chain_build(steps, final_view, (example, entries, lengths))
            self.num_ops = len(steps)
            got = _C.chain_run(self._chain, example)
        # The same kernels on the same tensors: the same bits (a mismatch would mean the trace
        # missed a step).
        if not _same_values(got, expected):
            raise ValueError("KernelChain: the chain's output differs from the model's on the example")

    @staticmethod
    def _trace(model: nn.Module, x: Tensor):
        if _ops._RECORDER is not None:
            raise RuntimeError("KernelChain: another trace is in progress (one at a time)")
        if not _ops._USE_C_CALL:
            raise RuntimeError("KernelChain: sqz_kernels.ops._USE_C_CALL is off")
        rec: list = []
        v_in = x._version
        state = [(t, t._version) for t in list(model.parameters()) + list(model.buffers())]
        _ops._RECORDER = (_ops._thread_id(), rec)
        try:
            out = model(x)
        finally:
            _ops._RECORDER = None
        if not rec:
            raise ValueError("KernelChain: the model called no sqz_kernels op")
        if any(r is None for r in rec):
            raise ValueError("KernelChain: an op call did not take the direct path (a gradient could "
                             "flow, a tensor subclass or a __torch_function__ mode); trace in eval "
                             "mode with plain tensors")
        if any(t._version != v for t, v in state):
            raise ValueError("KernelChain: the model's forward changed its parameters or buffers; "
                             "a chain would replay one state")
        if not isinstance(out, Tensor):
            raise ValueError("KernelChain: the model must return one Tensor")
        owned = {id(t) for t, _ in state}
        steps, prev, prev_version = [], x, v_in
        for i, (name, args, v0, y, vy) in enumerate(rec):
            what = "the model's input" if i == 0 else f"the input of step {i} ({name})"
            view = _view_shape(args[0], prev, what)
            if v0 != prev_version:
                raise ValueError(f"KernelChain: {what} was changed in place before step {i} ({name}) "
                                 "(an unfolded inplace ReLU? see sk.fold_relu_)")
            for j, a in enumerate(args[1:], 1):
                if isinstance(a, Tensor) and id(a) not in owned:
                    raise ValueError(f"KernelChain: argument {j} of step {i} ({name}) is not a "
                                     "parameter or buffer of the model: the chain would freeze it")
            steps.append((name, tuple(args), view))
            prev, prev_version = y, vy
        final_view = _view_shape(out, prev, "the model's output")
        if out._version != prev_version:
            raise ValueError("KernelChain: the last op's output was changed in place")
        return steps, final_view, out

    def __call__(self, x: Tensor) -> Tensor:
        out = _C.chain_run(self._chain, x) if type(x) is Tensor else NotImplemented
        if out is NotImplemented:
            self.fallbacks += 1
            return self.model(x)
        return out
