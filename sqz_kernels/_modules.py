"""Module-tree surgery shared by fuse_fire_, fast_pool_, compress and load."""
from torch import nn


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """model's submodule at dotted path `name` becomes `module` (its parent must exist)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
