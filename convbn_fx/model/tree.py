"""Questions about a module tree that decide how it is traced and when it must be again.

Only trees with a BN inside are worth tracing (every block ends in one). A symbolic trace
evaluates `if self.training:` once, so a module whose own code reads that flag must be traced
again when it flips. The modules a trace went through (not called, not inside a call) are
read but never called, so hooks added to them later, or their replacement, need a new trace.
"""

from __future__ import annotations

import torch.fx
import torch.nn as nn

from ..kernels.checks import check_input
from ..vocabulary.kinds import all_bn_types, holds_statistics

__all__ = ["has_blocks_inside", "reads_training_flag", "traced_through", "submodule"]


def has_blocks_inside(module: nn.Module) -> bool:
    """True when any submodule is a norm (a BN, or any module holding running statistics, as
    a frozen norm written as arithmetic does): only such parts are worth tracing (a lone
    conv, e.g. a detection head's classifier, is left as it is)."""
    kinds = all_bn_types()
    return any(isinstance(m, kinds) or holds_statistics(m) for m in module.modules())


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


def traced_through(root: nn.Module, graph: torch.fx.Graph) -> list[tuple]:
    """(parent, name, module) for each submodule the tracer went through (not a call, nor
    inside one): the graph reads its tensors without calling it."""
    # Modules the graph calls, or passes as values (`checkpoint(self.layer1, x)`; not the BN
    # handed to its own input check, whose forward was traced through).
    called = {n.target for n in graph.nodes if n.op == "call_module" or (
        n.op == "get_attr" and any(u.target is not check_input for u in n.users))}
    found = []
    for parent_name, parent in root.named_modules():
        for name, m in parent.named_children():
            path = f"{parent_name}.{name}" if parent_name else name
            parts = path.split(".")
            if not any(".".join(parts[:i]) in called for i in range(1, len(parts) + 1)):
                found.append((parent, name, m))
    return found


def submodule(module: nn.Module, target: str) -> nn.Module | None:
    """The submodule at `target`, or None (a get_attr of a tensor, not of a module)."""
    try:
        return module.get_submodule(target)
    except AttributeError:
        return None
