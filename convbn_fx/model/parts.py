"""Rewritten parts: a submodule rewritten on its own that stays an instance of its class.

Some modules cannot be inlined into their parent's graph: a forward torch.fx cannot trace
(detection heads, data-dependent Python), a module with hooks (FSDP's all-gathers, user
hooks), a wrapper that checkpoints its child. The tracer keeps them as calls, and their blocks
are rewritten here, in the largest submodules that trace. The untraced Python around such a
part reads its attributes, properties and methods (`backbone.out_channels`, isinstance checks,
`set_resolution()`), so a part is not replaced by a GraphModule: it is a shallow copy of the
module (or, in place, the module itself) whose class is a subclass of its own that only
overrides `forward`, running a `TunedGraphModule` that shares every child, parameter and
buffer with it.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterator

import torch.fx
import torch.nn as nn

from ..vocabulary.kinds import block_types
from .pickling import PortableGraph, importable, reduced
from .tree import has_blocks_inside
from .tuned import TunedGraphModule

__all__ = ["TunedPart", "Untraceable", "is_rewritten", "rewritten_graphs", "graph_module_of",
           "make_part", "attach", "replace_submodules", "rewrite_parts", "shallow_copy",
           "new_part", "original_class"]


class Untraceable(Exception):
    """torch.fx could not trace a module; carries the one-line cause."""


class TunedPart:
    """Mixin of a rewritten part's class: `forward` runs the part's TunedGraphModule."""

    def forward(self, *args, **kwargs):
        gm = self.__dict__["_convbn_part"]
        gm.training = self.training  # the graph module is not a child: it follows the part
        # The state check here, not only in gm's __call__: torch.compile inlines a module's
        # forward, and would never see that check inside a nested call.
        gm.follow_state()
        return gm.forward(*args, **kwargs)

    # A part's class is made at run time, so pickle could not find it by name: a part is
    # pickled as its original class, its own state and its graph module's (pickling.py).

    def __reduce_ex__(self, protocol):
        own = dict(self.__getstate__())
        gm = own.pop("_convbn_part")
        if isinstance(own.get("_graph"), torch.fx.Graph):  # a part of a GraphModule
            own["_graph"] = PortableGraph.of(own["_graph"])
        return reduced(self, new_part, (original_class(type(self)),), (own, gm.__getstate__()))

    def __setstate__(self, state):
        own, (body, saved) = state
        if isinstance(own.get("_graph"), PortableGraph):
            own["_graph"] = own["_graph"].build()
            own["_graph"].owning_module = self
        super().__setstate__(own)
        if saved.source_is_part:  # traced again as the original class, over this part's dict
            saved.source = object.__new__(original_class(type(self)))
            saved.source.__dict__ = self.__dict__
        gm = TunedGraphModule.__new__(TunedGraphModule)
        gm.__setstate__((body, saved))  # shares this part's children (pickled once)
        self.__dict__["_convbn_part"] = gm

    def __deepcopy__(self, memo):
        # The default deepcopy, which would otherwise call __reduce_ex__ (made for pickling).
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __copy__(self):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new


_part_classes: dict[type, type] = {}


def _part_class(cls: type) -> type:
    if issubclass(cls, TunedPart):
        return cls
    if cls not in _part_classes:
        _part_classes[cls] = type(cls.__name__, (TunedPart, cls),
                                  {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _part_classes[cls]


def original_class(cls: type) -> type:
    """The class a part's class was made from (the nearest one pickle can find by name)."""
    return next(c for c in cls.__mro__ if not issubclass(c, TunedPart) and importable(c))


def new_part(cls: type) -> nn.Module:
    """An empty part of class `cls`, for pickle to fill (see `TunedPart.__setstate__`)."""
    module = cls.__new__(cls)  # a GraphModule makes its own subclass here
    module.__class__ = _part_class(type(module))
    return module


def is_rewritten(module: nn.Module) -> bool:
    """A TunedGraphModule or a part: rewritten before, so traced as one call and not again."""
    return isinstance(module, (TunedPart, TunedGraphModule))


def graph_module_of(module: nn.Module) -> TunedGraphModule:
    """The TunedGraphModule that runs a rewritten module (itself, or a part's)."""
    return module.__dict__["_convbn_part"] if isinstance(module, TunedPart) else module


def rewritten_graphs(module: nn.Module) -> Iterator[tuple[str, TunedGraphModule]]:
    """(qualified name, TunedGraphModule) for every rewritten graph in the module's tree."""
    for name, m in module.named_modules():
        if is_rewritten(m):
            yield name, graph_module_of(m)


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object of the same class sharing every parameter, buffer and child.

    Built without calling the class (FSDP's classes construct the unsharded class on `copy`).
    """
    new = object.__new__(type(module))
    new.__dict__.update(module.__dict__)
    for key in ("_modules", "_parameters", "_buffers"):
        new.__dict__[key] = dict(module.__dict__[key])
    return new


def make_part(module: nn.Module, build: Callable[[nn.Module], nn.Module], *,
              inplace: bool) -> nn.Module:
    """`module` (or a shallow copy) turned into a part running `build(view)`'s graph module.

    `view` is an object of the module's original class sharing the part's `__dict__`: what
    gets traced (again, when a `self.training` branch flips) is the original forward, over
    the part's current children. The graph module shares the part's children, parameters and
    buffers (the same dicts), so `.to()`, `load_state_dict` or a replaced child reach both.
    """
    part = module if inplace else shallow_copy(module)
    view = object.__new__(type(part))
    view.__dict__ = part.__dict__
    gm = build(view)
    part.__class__ = _part_class(type(part))
    attach(part, gm)
    return part


_TREE = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set")


def attach(part: nn.Module, gm: nn.Module) -> None:
    """Make `gm` the graph module of `part`, sharing its children, parameters and buffers."""
    for key in _TREE:
        gm.__dict__[key] = part.__dict__[key]
    part.__dict__["_convbn_part"] = gm


def replace_submodules(root: nn.Module, replacements: dict[str, nn.Module], *,
                       inplace: bool) -> nn.Module:
    """`root` with the submodules at the given paths replaced.

    Unless `inplace`, root and every module on the way to a replaced one are shallow copies,
    so the input tree is not changed. Returns root itself when there is nothing to replace.
    """
    if not replacements:
        return root
    new_root = root if inplace else shallow_copy(root)
    copied = {"": new_root}

    def at(path: str) -> nn.Module:
        if path not in copied:
            parent_path, _, name = path.rpartition(".")
            parent = at(parent_path)
            child = parent._modules[name]
            if not inplace:
                child = parent._modules[name] = shallow_copy(child)
            copied[path] = child
        return copied[path]

    for path, new in replacements.items():
        parent_path, _, name = path.rpartition(".")
        at(parent_path)._modules[name] = new
    return new_root


def rewrite_parts(module: nn.Module, rewrite: Callable[[nn.Module, str], nn.Module], *,
                  inplace: bool, errors: list[str], prefix: str = "") -> nn.Module:
    """Replace the largest children of `module` that `rewrite(child, path)` accepts.

    `rewrite` returns the child's replacement (or the child itself), or raises `Untraceable`
    to have this walk descend into the child. Children without a BN inside, and lone convs or
    BNs (no block on their own), are left alone. Returns `module` itself when nothing changed
    or `inplace`, else a shallow copy holding the replacements; `errors` collects one line per
    child that did not trace.
    """
    replaced = {}
    for name, child in module.named_children():
        if isinstance(child, block_types()) or not has_blocks_inside(child):
            continue
        path = f"{prefix}{name}"
        try:
            new = rewrite(child, path)
        except Untraceable as exc:
            errors.append(f"{path}: {exc}")
            new = rewrite_parts(child, rewrite, inplace=inplace, errors=errors,
                                prefix=f"{path}.")
        if new is not child:
            replaced[name] = new
    return replace_submodules(module, replaced, inplace=inplace)
