"""FusedFire: a drop-in Fire module whose forward is one fused kernel, and model surgery."""
import functools
from typing import Callable, Optional

import torch
from torch import nn

from . import ops
from ._modules import has_hooks, replace_everywhere

__all__ = ["FusedFire", "EagerFire", "is_fire_like", "is_plain_fire", "fuse_fire_"]


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


_FIRE_CHILDREN = ("squeeze", "squeeze_activation", "expand1x1", "expand1x1_activation", "expand3x3",
                  "expand3x3_activation")


@functools.lru_cache(maxsize=None)
def _known_fire_forwards():
    forwards = {EagerFire.forward, FusedFire.forward}
    try:
        from torchvision.models.squeezenet import Fire
        forwards.add(Fire.forward)
    except ImportError:  # torchvision is optional
        pass
    return forwards


def is_plain_fire(m: nn.Module) -> bool:
    """True for a Fire whose forward is known to be the Fire computation: fire-like (see
    is_fire_like), of a class whose forward is torchvision's Fire's, EagerFire's or FusedFire's,
    with exactly torchvision's six children (three plain nn.Conv2d, three nn.ReLU) and no hooks on
    it or them. fuse_fire_ and compress replace only these: a subclass that adds a BatchNorm or a
    residual, swaps the concat or drops a ReLU computes something else, and a hook would be lost.
    FusedFire.from_fire takes any Fire-like module (the caller vouches for its forward)."""
    if not is_fire_like(m) or type(m).forward not in _known_fire_forwards():
        return False
    kids = dict(m.named_children())
    if set(kids) != set(_FIRE_CHILDREN):
        return False
    convs = [kids[n] for n in ("squeeze", "expand1x1", "expand3x3")]
    acts = [kids[n] for n in ("squeeze_activation", "expand1x1_activation", "expand3x3_activation")]
    return (all(type(c).forward is nn.Conv2d.forward for c in convs)
            and all(type(a) is nn.ReLU for a in acts)
            and not any(has_hooks(x) for x in (m, *convs, *acts)))


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


_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FusedFire(EagerFire):
    """Fire module (squeeze 1x1 + ReLU -> expand 1x1 + ReLU || expand 3x3 + ReLU -> concat) as one
    kernel. Same constructor, children and state_dict keys as torchvision's Fire."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.dtype not in (_CUDA_DTYPES if x.is_cuda else _CPU_DTYPES) or (
                ops.fwad_open() and ops.has_tangent(x, *self.parameters())):
            # what the kernels do not cover (an unbatched or half CPU input, forward-mode AD):
            # the eager Fire this module replaces, on the same parameters
            return super().forward(x)
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


def fuse_fire_(model: nn.Module, filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
               fire_like: bool = False) -> int:
    """Replace, in place, every plain Fire submodule of `model` (see is_plain_fire; not already
    fused) by a FusedFire that shares its parameters, at every path it is reachable by (a Fire
    used twice stays one module). `filter_fn(name, module)` may veto a swap. Other Fire-like
    modules (a user's own Fire class, one with extra layers or another forward) are left alone
    unless fire_like=True: then the caller vouches that each computes the Fire (as with
    FusedFire.from_fire). Returns the count."""
    accept = is_fire_like if fire_like else is_plain_fire
    swaps = {}
    for name, mod in model.named_modules():
        if mod is model or isinstance(mod, FusedFire) or not accept(mod):
            continue
        if filter_fn is not None and not filter_fn(name, mod):
            continue
        swaps[name] = FusedFire.from_fire(mod)
    replace_everywhere(model, swaps)
    return len(swaps)
