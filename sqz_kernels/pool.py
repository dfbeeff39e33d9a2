"""MaxPool2d whose CPU forward runs sqz's max_pool2d kernel, and the surgery that swaps it in.

ATen's CPU max_pool2d is slow on SqueezeNet's 3x3 / stride-2 / ceil_mode pools (5.6 ms for the
first NCHW pool of SqueezeNet 1.1 at 2 threads here, more than all its Fires), see the README.
"""
from typing import Callable, Optional

import torch
from torch import nn

from . import ops
from ._modules import has_hooks, replace_submodule

__all__ = ["MaxPool2d", "fast_pool_"]


class MaxPool2d(nn.MaxPool2d):
    """Drop-in nn.MaxPool2d: 4-D float32/float64 CPU input with dilation 1 and no indices goes to
    torch.ops.sqz_kernels.max_pool2d; anything else (CUDA, 3-D, dilation, return_indices) to torch."""

    @classmethod
    def from_pool(cls, pool: nn.MaxPool2d) -> "MaxPool2d":
        if not isinstance(pool, nn.MaxPool2d):
            raise ValueError(f"from_pool: expected nn.MaxPool2d, got {type(pool).__name__}")
        new = cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices,
                  pool.ceil_mode)
        new.train(pool.training)
        return new

    def _covered(self, x: torch.Tensor) -> bool:
        d = self.dilation
        return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
                and not self.return_indices and (d == 1 if isinstance(d, int) else tuple(d) == (1, 1))
                and not (ops.fwad_open() and ops.has_tangent(x)))  # forward-mode AD: torch's jvp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._covered(x):
            return super().forward(x)
        return ops.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode)


def fast_pool_(model: nn.Module, filter_fn: Optional[Callable[[str, nn.Module], bool]] = None) -> int:
    """Replace, in place, every plain nn.MaxPool2d of `model` by a MaxPool2d with the same settings
    (no parameters, so state_dicts are unaffected). `filter_fn(name, module)` may veto a swap.
    Returns the count."""
    swaps = [name for name, mod in model.named_modules()
             if mod is not model and type(mod) is nn.MaxPool2d and not has_hooks(mod)
             and (filter_fn is None or filter_fn(name, mod))]
    for name in swaps:
        replace_submodule(model, name, MaxPool2d.from_pool(model.get_submodule(name)))
    return len(swaps)
