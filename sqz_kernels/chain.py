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
strides, dtype or device, when a gradient can flow (grad mode on and a parameter requires grad)
or inside a ``__torch_function__`` mode; ``run.fallbacks`` counts those calls. The chain holds the
model's parameters by reference, so in-place updates (``load_state_dict``, an optimizer step) are
seen; replacing a parameter or submodule, or changing a layer's flags, needs a new KernelChain.
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


class KernelChain:
    """Runs ``model`` (a chain of sqz_kernels ops, traced on ``example``) from one Python call."""

    def __init__(self, model: nn.Module, example: Tensor):
        if not isinstance(example, Tensor) or type(example) is not Tensor:
            raise TypeError("KernelChain: example must be a plain torch.Tensor")
        self.model = model
        self.fallbacks = 0
        self._sig = self._signature(example)
        with torch.no_grad():
            steps, final_view, expected = self._trace(model, example)
            tensors = [a for _, args, _ in steps for a in args[1:] if isinstance(a, Tensor)]
            self._tensors = tensors
            self._chain = _C.chain_build(steps, final_view)
            self.num_ops = len(steps)
            got = _C.chain_run(self._chain, example)
        # The same kernels on the same tensors: the same bits (a mismatch would mean the trace
        # missed a step).
        if got.shape != expected.shape or not torch.equal(got, expected):
            raise ValueError("KernelChain: the chain's output differs from the model's on the example")

    @staticmethod
    def _signature(x: Tensor):
        return (type(x), x.dtype, x.device, tuple(x.shape), x.stride())

    @staticmethod
    def _trace(model: nn.Module, x: Tensor):
        if _ops._RECORDER is not None:
            raise RuntimeError("KernelChain: another trace is in progress")
        rec: list = []
        v_in = x._version
        _ops._RECORDER = rec
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
        if not isinstance(out, Tensor):
            raise ValueError("KernelChain: the model must return one Tensor")
        owned = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
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
        if (self._signature(x) != self._sig or torch._C._is_torch_function_mode_enabled()
                or (torch.is_grad_enabled() and any(t.requires_grad for t in self._tensors))):
            self.fallbacks += 1
            return self.model(x)
        return _C.chain_run(self._chain, x)
