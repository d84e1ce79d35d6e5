"""Rewriting a model that does not trace whole: its largest traceable submodules, recursively.

Detection models mix traceable backbones with data-dependent Python (proposal sampling,
post-processing). Both `tune_mode` and `deploy_mode` rewrite such a model part by part with
the same walk: try a child whole, and only when torch.fx cannot trace it, descend into it.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch.nn as nn

from .kinds import block_types
from .tracing import has_blocks_inside

__all__ = ["Untraceable", "one_line", "rewrite_parts"]


class Untraceable(Exception):
    """torch.fx could not trace a module; carries the one-line cause."""


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing every parameter, buffer and child with `module`."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    return new


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
    if not replaced:
        return module
    target = module if inplace else _shallow_copy(module)
    target._modules.update(replaced)
    return target
