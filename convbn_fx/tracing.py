"""Tracing models with the modules a block is made of kept as calls, in parts where needed.

The rewrite reads module state (BN's `training` flag, which parameters require grad) on every
call, so stock conv and BN modules stay `call_module` nodes rather than be inlined. What the
tracer cannot see through stays a call, so that a block beside it is still found:

- a submodule whose forward torch.fx cannot trace (data-dependent Python) is kept as one call
  and the trace is retried, so only that submodule is lost, not its parent;
- a module with hooks, or a wrapper that checkpoints its child, is kept as one call, because a
  traced graph would silently skip its hooks or its checkpointing;
- `torch.utils.checkpoint.checkpoint(submodule, x)` becomes one graph call, with the
  submodule rewritten on its own; tracing through it would silently drop the checkpointing
  (a checkpointed closure cannot be a graph value: the calling module is kept as a call).

BN's own input checks (`_check_input_dim`) branch on the input's rank, unknown while tracing;
they are recorded as calls that run the module's check at run time, so a BN subclass whose
forward calls `super().forward(x)` traces through and the check still guards the input.

The caller rewrites those kept modules on their own (see parts.py). Functions that a model
zoo declares untraceable (timm's `register_notrace_function`, its dynamic 'same' padding)
stay single calls. Modules whose Python `forward` branches on `self.training` are noted, so
the owner can retrace when that flag changes.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import torch.fx
import torch.nn as nn
import torch.utils.checkpoint

from .errors import ConvBNError
from .kinds import BN_TYPES, all_bn_types, keeps_whole

__all__ = ["ConvBNTracer", "Trace", "trace", "trace_graph", "reads_training_flag",
           "has_blocks_inside", "declare_leaf_function"]

_leaf_functions: set = set()


def declare_leaf_function(fn):
    """Keep calls of `fn` as single nodes when tracing (for shape-dependent helpers).

    `fn` must be a module-level function called by name (torch.fx's autowrap). Usable as a
    decorator.
    """
    if not callable(fn) or isinstance(fn, type):
        raise ConvBNError(f"declare_leaf_function expects a function, got {fn!r}; for a "
                          "module class use convbn_fx.declare_leaf.")
    _leaf_functions.add(fn)
    return fn


def _zoo_leaf_functions() -> list:
    fns = list(_leaf_functions)
    fx = sys.modules.get("timm.layers._fx")
    if fx is not None:
        fns += fx.get_notrace_functions()
    padding = sys.modules.get("timm.layers.padding")
    if padding is not None:  # reads x.size() to pad like TensorFlow: a call, then a plain conv
        fns.append(padding.pad_same)
    return fns


_checkpoint = torch.utils.checkpoint.checkpoint


def _traced_checkpoint(function, *args, **kwargs):
    """`checkpoint(fn, ...)` while tracing: one graph call, so the checkpointing is kept.

    Traced through, checkpoint would run `fn` on proxies and leave its ops in the graph
    without the checkpointing. As a call, `fn` must be a submodule (a `get_attr` of it; the
    caller rewrites it on its own); a closure cannot be a graph value, so tracing fails and
    the calling module is kept as a call instead.
    """
    proxies = _proxies((args, kwargs))
    if not proxies:
        return _checkpoint(function, *args, **kwargs)
    if not isinstance(function, nn.Module):
        raise TypeError("torch.utils.checkpoint of a function that is not a submodule cannot "
                        "be a graph call")
    return proxies[0].tracer.create_proxy("call_function", _checkpoint, (function,) + args,
                                          kwargs)


def _proxies(value) -> list:
    found = []
    torch.fx.node.map_aggregate(value, lambda a: found.append(a)
                                if isinstance(a, torch.fx.Proxy) else None)
    return found


# BN's input checks branch on the input's rank, which a symbolic trace does not know; they
# stop a subclass whose forward calls `super().forward(x)` from being traced through.
_INPUT_CHECKS = ("_check_input_dim", "_check_non_zero_input_channels")


def check_input(module: nn.Module, check: str, x: torch.Tensor) -> None:
    """Run a BN module's own input check at run time (the traced stand-in for the call)."""
    getattr(module, check)(x)


def _deferred_check(name: str, original):
    def check(self, x):
        if not isinstance(x, torch.fx.Proxy):
            return original(self, x)
        module = x.tracer.create_proxy("get_attr", x.tracer.path_of_module(self), (), {})
        x.tracer.create_proxy("call_function", check_input, (module, name, x), {})

    return check


@contextlib.contextmanager
def _patched_for_tracing():
    """For one trace: checkpoint calls and BN input checks recorded as graph calls."""
    saved = [(torch.utils.checkpoint, "checkpoint", _checkpoint)]
    # `torch.utils.checkpoint.checkpoint(...)` / `cp.checkpoint(...)` look the attribute up;
    # a name imported with `from ... import checkpoint` is autowrapped (see the tracer).
    torch.utils.checkpoint.checkpoint = _traced_checkpoint
    for cls in (nn.modules.batchnorm._NormBase,) + BN_TYPES:
        for name in _INPUT_CHECKS:
            if name in vars(cls):
                saved.append((cls, name, vars(cls)[name]))
                setattr(cls, name, _deferred_check(name, vars(cls)[name]))
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


class ConvBNTracer(torch.fx.Tracer):
    """A Tracer that keeps block modules, hooked modules and `opaque` paths as calls.

    After a failed `trace`, `failed_in` names the innermost submodule whose forward raised
    ("" when the root's own code did).
    """

    def __init__(self, opaque: frozenset[str] = frozenset()):
        super().__init__(autowrap_functions=tuple(_zoo_leaf_functions()) + (_checkpoint,))
        self.opaque = opaque
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from .parts import is_rewritten  # already rewritten parts stay whole

        if module_qualified_name in self.opaque or keeps_whole(m) or is_rewritten(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                try:
                    self.failed_in = self.path_of_module(m)
                except NameError:  # a module outside the traced tree: blame the caller
                    pass
            raise

    def trace(self, root, concrete_args=None):
        self.failed_in = None
        with _patched_for_tracing():
            graph = super().trace(root, concrete_args)
        for node in graph.nodes:
            # fx would write `wrap("torch.utils.checkpoint.checkpoint")` into the generated
            # code, which breaks every later trace (a dotted name is no global of that code).
            if node.target is _checkpoint:
                node.meta.pop("is_wrapped", None)
        return graph


@dataclass
class Trace:
    """A traced graph and the submodules kept as calls because they did not trace."""

    graph: torch.fx.Graph
    opaque: frozenset[str] = field(default_factory=frozenset)


def trace_graph(model: nn.Module, opaque: frozenset[str] = frozenset()) -> Trace:
    """Symbolically trace `model`, keeping each submodule that fails to trace as a call.

    Raises whatever torch.fx raised when the root's own forward cannot be traced.
    """
    opaque = frozenset(opaque)
    while True:
        tracer = ConvBNTracer(opaque)
        try:
            return Trace(tracer.trace(model), opaque)
        except Exception:
            if not tracer.failed_in or tracer.failed_in in opaque:
                raise
            opaque = opaque | {tracer.failed_in}


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """`trace_graph` as a GraphModule over `model`, holding its whole module tree.

    (A plain GraphModule copies only what the graph names, putting empty modules on the path
    to a traced-through BN's tensors, which would hide the BN's own state.)
    """
    gm = torch.fx.GraphModule(model, trace_graph(model).graph, model.__class__.__name__)
    for name, child in model.named_children():
        setattr(gm, name, child)
    return gm


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
