"""Module-tree surgery shared by fuse_fire_, fast_pool_, the folds, compress and load."""
from torch import nn


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """model's submodule at dotted path `name` becomes `module` (its parent must exist)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def has_hooks(m: nn.Module) -> bool:
    """Whether `m` has forward / backward hooks of its own: surgery that replaces or folds it would
    drop them, so it leaves such modules alone."""
    return any(getattr(m, h, None) for h in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
