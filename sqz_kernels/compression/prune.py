"""Magnitude pruning (Deep Compression, section 2) with masks that stay in force while training.

Each layer keeps exactly round(density * numel) weights of largest magnitude (ties broken by
position, so the density is exact). An iterative schedule prunes in steps (e.g. 0.7, 0.5, 0.33),
calling the user's retraining between steps, which the paper found keeps more accuracy than
one-shot pruning at low densities.
"""
import math
from typing import Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["magnitude_mask", "MaskHold", "prune_", "density_schedule"]


def _check_density(d, what="density") -> float:
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < float(d) <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1], got {d!r}")
    return float(d)


def _check_block(block) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    return block


def magnitude_mask(weight: Tensor, density: float, current: Optional[Tensor] = None,
                   block: int = 1) -> Tensor:
    """Bool mask keeping the round(density * numel) largest-|w| weights (at least 1). With
    `current`, only weights it keeps are candidates (pruning never revives a weight).

    block > 1 prunes blocks of `block` consecutive output channels (rows of weight.reshape(O, -1))
    at the same input position together, ranked by the block's L2 norm: the rows of a block share
    one sparsity pattern, which the codebook kernels run as row quads (block=4: one input load
    feeds four multiply-adds). A last block of fewer than `block` rows is a block of its own."""
    density = _check_density(density)
    block = _check_block(block)
    if block > 1 and weight.dim() >= 2 and weight.shape[0] > 1:
        return _block_mask(weight, density, current, block)
    n = weight.numel()
    keep = max(1, int(round(density * n))) if n else 0
    mag = weight.detach().abs().reshape(-1).double()
    if current is not None:
        cur = current.reshape(-1)
        keep = min(keep, int(cur.sum()))
        mag = torch.where(cur, mag, torch.full_like(mag, -1.0))
    mask = torch.zeros(n, dtype=torch.bool, device=weight.device)
    if keep:
        # stable descending sort: equal magnitudes keep the lower index (deterministic)
        idx = torch.sort(mag, descending=True, stable=True).indices[:keep]
        mask[idx] = True
    return mask.reshape(weight.shape)


def _block_mask(weight: Tensor, density: float, current: Optional[Tensor], block: int) -> Tensor:
    O = weight.shape[0]
    w2 = weight.detach().reshape(O, -1).double() ** 2
    K = w2.shape[1]
    G = (O + block - 1) // block
    pad = G * block - O
    score = torch.cat([w2, w2.new_zeros(pad, K)]).reshape(G, block, K).sum(1).reshape(-1)
    keep = max(1, int(round(density * G * K)))
    if current is not None:
        cur = current.reshape(O, -1)
        cand = torch.cat([cur, cur.new_ones(pad, K)]).reshape(G, block, K).all(1).reshape(-1)
        keep = min(keep, int(cand.sum()))
        score = torch.where(cand, score, torch.full_like(score, -1.0))
    bm = torch.zeros(G * K, dtype=torch.bool, device=weight.device)
    if keep:
        bm[torch.sort(score, descending=True, stable=True).indices[:keep]] = True
    rows = bm.reshape(G, 1, K).expand(G, block, K).reshape(G * block, K)[:O]
    return rows.reshape(weight.shape).clone()


class MaskHold:
    """Keep pruned weights at zero while a model trains: the gradient of a pruned weight is
    masked, and the mask is re-applied before every forward (so optimizer momentum or weight
    decay can not revive it). Use as a context manager or call remove()."""

    def __init__(self, modules: Dict[str, nn.Module], masks: Dict[str, Tensor]):
        self._handles = []
        for name, mod in modules.items():
            mask = masks[name]
            w = mod.weight
            self._handles.append(w.register_hook(lambda g, m=mask: g * m.to(g.dtype)))

            def pre(module, args, m=mask):
                with torch.no_grad():
                    module.weight.mul_(m.to(module.weight.dtype))
            self._handles.append(mod.register_forward_pre_hook(pre))
            with torch.no_grad():
                w.mul_(mask.to(w.dtype))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def density_schedule(target: float, steps: int) -> List[float]:
    """`steps` densities decreasing geometrically from 1 to `target` (the last is `target`)."""
    target = _check_density(target, "target density")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return [target ** ((i + 1) / steps) for i in range(steps)]


def prune_(modules: Dict[str, nn.Module], density: Dict[str, float],
           schedule: Optional[Union[int, Iterable[float]]] = None,
           train_step: Optional[Callable[[nn.Module], None]] = None,
           model: Optional[nn.Module] = None, block: int = 1) -> Dict[str, Tensor]:
    """Prune the `.weight` of each module to its density, in place; return the masks.
    block: see magnitude_mask (1 = unstructured, Deep Compression's own pruning).

    schedule: None (one shot), an int number of steps, or fractions of the way in density
    space as a list (e.g. [0.7, 0.5, 0.33] for a 0.33 target means those global levels; each
    layer scales them by its own target). `train_step(model)` runs after each step with the
    masks held (retraining), and `model` is what it receives."""
    masks: Dict[str, Tensor] = {}
    block = _check_block(block)
    if schedule is None:
        levels = [1.0]                                  # fraction of the way: all at once
    elif isinstance(schedule, int) and not isinstance(schedule, bool):
        if schedule < 1:
            raise ValueError(f"schedule must be >= 1 steps, got {schedule}")
        levels = [(i + 1) / schedule for i in range(schedule)]
    else:
        levels = [float(s) for s in schedule]
        if not levels or any(not 0 < s <= 1 for s in levels) or levels != sorted(levels, reverse=True):
            raise ValueError("schedule must be a non-empty decreasing list of densities in (0, 1]")
        # a list names the global densities of the steps; a layer with its own target d follows
        # the same geometric path: d ** (log s / log target)
        tgt = min(levels)
        levels = [math.log(s) / math.log(tgt) if tgt < 1 else 1.0 for s in levels]
    for i, frac in enumerate(levels):
        for name, mod in modules.items():
            d = _check_density(density[name], f"density[{name!r}]")
            step_d = d ** frac                          # geometric path from 1 to d
            masks[name] = magnitude_mask(mod.weight, step_d, masks.get(name), block)
            with torch.no_grad():
                mod.weight.mul_(masks[name].to(mod.weight.dtype))
        if train_step is not None:
            with MaskHold(modules, masks):
                train_step(model)
    return masks
