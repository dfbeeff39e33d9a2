"""Module-tree surgery shared by fuse_fire_, fast_pool_, the folds, compress and load."""
from typing import Dict, List

from torch import nn


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """model's submodule at dotted path `name` becomes `module` (its parent must exist)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def module_paths(model: nn.Module) -> Dict[int, List[str]]:
    """id(module) -> every dotted path by which `model` reaches it (several for a module used in
    more than one place; named_modules() lists such a module once)."""
    paths: Dict[int, List[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    return paths


def replace_everywhere(model: nn.Module, mods: Dict[str, nn.Module]) -> None:
    """The submodule at each path of `mods` becomes its replacement at every path it is reachable
    by: a module used twice (shared weights) stays one module."""
    paths = module_paths(model)
    for name, mod in mods.items():
        for path in paths[id(model.get_submodule(name))]:
            replace_submodule(model, path, mod)


def has_hooks(m: nn.Module) -> bool:
    """Whether `m` has forward / backward hooks of its own: surgery that replaces or folds it would
    drop them, so it leaves such modules alone."""
    return any(getattr(m, h, None) for h in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
