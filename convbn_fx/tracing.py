"""Tracing models with conv and BN kept as module calls.

The rewrite reads module state (BN's `training` flag, which parameters require grad) on every
call, so conv and BN must stay `call_module` nodes rather than be inlined. Two things a plain
`symbolic_trace` would get silently wrong are handled here: FrozenBatchNorm2d (torchvision) is
kept a leaf, so later changes to its buffers are honoured; and modules whose Python `forward`
branches on `self.training` are noted, so the owner can retrace when that flag changes.
"""

from __future__ import annotations

import torch.fx
import torch.nn as nn

from .kinds import all_bn_types, leaf_types

__all__ = ["ConvBNTracer", "trace", "trace_graph", "reads_training_flag", "has_blocks_inside"]


class ConvBNTracer(torch.fx.Tracer):
    """A Tracer that keeps every conv and BN kind (subclasses too) as a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from .tuned import TunedGraphModule  # already rewritten parts stay whole

        if isinstance(m, leaf_types() + (TunedGraphModule,)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace_graph(model: nn.Module) -> torch.fx.Graph:
    """Symbolically trace `model`; raises whatever torch.fx raises when it cannot."""
    return ConvBNTracer().trace(model)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """`trace_graph` as a GraphModule over `model`."""
    return torch.fx.GraphModule(model, trace_graph(model), model.__class__.__name__)


def reads_training_flag(module: nn.Module) -> bool:
    """True when a method of the module's own class (not nn.Module's) reads `self.training`.

    Symbolic tracing evaluates such branches once, so the traced graph is only valid while the
    flag keeps the value it had when traced.
    """
    for cls in type(module).__mro__:
        if cls is nn.Module or cls is object:
            break
        for attr in vars(cls).values():
            code = getattr(attr, "__code__", None)
            if code is not None and "training" in code.co_names:
                return True
    return False


def has_blocks_inside(module: nn.Module) -> bool:
    """True when any submodule is a BN: every block ends in one, so only such parts are worth
    tracing (a lone conv, e.g. a detection head's classifier, is left as it is)."""
    kinds = all_bn_types()
    return any(isinstance(m, kinds) for m in module.modules())
