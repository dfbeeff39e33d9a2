"""FusedFire: a drop-in Fire module whose forward is one fused kernel, and model surgery."""
from typing import Callable, Optional

import torch
from torch import nn

from . import ops
from ._modules import replace_submodule

__all__ = ["FusedFire", "EagerFire", "is_fire_like", "fuse_fire_"]


def is_fire_like(m: nn.Module) -> bool:
    """True for any module with .squeeze (1x1), .expand1x1 (1x1) and .expand3x3 (3x3, pad 1) Conv2d
    children of stride 1, dilation 1, groups 1: torchvision's Fire, ours, or a user's own."""
    sq, e1, e3 = (getattr(m, n, None) for n in ("squeeze", "expand1x1", "expand3x3"))
    if not all(isinstance(c, nn.Conv2d) for c in (sq, e1, e3)):
        return False

    def plain(c, k, pad):
        return (c.kernel_size == (k, k) and c.stride == (1, 1) and c.padding == (pad, pad)
                and c.dilation == (1, 1) and c.groups == 1 and c.padding_mode == "zeros")

    return (plain(sq, 1, 0) and plain(e1, 1, 0) and plain(e3, 3, 1)
            and e1.in_channels == sq.out_channels and e3.in_channels == sq.out_channels)


class EagerFire(nn.Module):
    """The plain eager Fire (torchvision's definition), what `FusedFire.to_fire()` returns."""

    def __init__(self, inplanes: int, squeeze_planes: int, expand1x1_planes: int, expand3x3_planes: int):
        super().__init__()
        self.inplanes = inplanes
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class FusedFire(EagerFire):
    """Fire module (squeeze 1x1 + ReLU -> expand 1x1 + ReLU || expand 3x3 + ReLU -> concat) as one
    kernel. Same constructor, children and state_dict keys as torchvision's Fire."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.fused_fire(x, self.squeeze.weight, self.squeeze.bias, self.expand1x1.weight,
                              self.expand1x1.bias, self.expand3x3.weight, self.expand3x3.bias)

    def _apply(self, fn, recurse=True):
        # The kernels read OIHW weights. model.to(memory_format=torch.channels_last) would make the
        # 3x3 weight non-contiguous and cost a weight copy on every call; keep the layout instead
        # (values, dtype and device still follow `fn`).
        super()._apply(fn, recurse)
        for conv in (self.squeeze, self.expand1x1, self.expand3x3):
            if not conv.weight.is_contiguous():
                conv.weight.data = conv.weight.data.contiguous()
        return self

    @classmethod
    def from_fire(cls, m: nn.Module) -> "FusedFire":
        """A FusedFire sharing the parameters (same tensors, no copy) of any Fire-like module."""
        if not is_fire_like(m):
            raise ValueError(
                f"from_fire: {type(m).__name__} is not Fire-like (needs Conv2d children squeeze 1x1, "
                "expand1x1 1x1, expand3x3 3x3 pad 1, stride 1, groups 1)")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.inplanes = m.squeeze.in_channels
        new.squeeze, new.expand1x1, new.expand3x3 = m.squeeze, m.expand1x1, m.expand3x3
        new.squeeze_activation = nn.ReLU(inplace=True)
        new.expand1x1_activation = nn.ReLU(inplace=True)
        new.expand3x3_activation = nn.ReLU(inplace=True)
        new.train(m.training)
        return new

    def to_fire(self) -> EagerFire:
        """A plain eager Fire sharing this module's parameters."""
        eager = EagerFire.__new__(EagerFire)
        nn.Module.__init__(eager)
        for name, child in self.named_children():
            setattr(eager, name, child)
        eager.inplanes = self.inplanes
        eager.train(self.training)
        return eager

    def extra_repr(self) -> str:
        return "fused"


def fuse_fire_(model: nn.Module, filter_fn: Optional[Callable[[str, nn.Module], bool]] = None) -> int:
    """Replace, in place, every Fire-like submodule of `model` (not already fused) by a FusedFire
    that shares its parameters. `filter_fn(name, module)` may veto a swap. Returns the count."""
    swaps = []
    for name, mod in model.named_modules():
        if mod is model or isinstance(mod, FusedFire) or not is_fire_like(mod):
            continue
        if filter_fn is not None and not filter_fn(name, mod):
            continue
        swaps.append(name)
    for name in swaps:
        replace_submodule(model, name, FusedFire.from_fire(model.get_submodule(name)))
    return len(swaps)
