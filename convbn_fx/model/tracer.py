"""Tracing models with the modules a block is made of kept as calls.

The rewrite reads module state (BN's `training` flag, which parameters require grad) on every
call, so stock conv and BN modules stay `call_module` nodes rather than be inlined. What the
tracer cannot see through stays a call, so that a block beside it is still found:

- a submodule whose forward torch.fx cannot trace (data-dependent Python) is kept as one call
  and the trace is retried, so only that submodule is lost, not its parent;
- a module with hooks, or a wrapper that checkpoints its child, is kept as one call, because a
  traced graph would silently skip its hooks or its checkpointing;
- `torch.utils.checkpoint.checkpoint(submodule, x)` becomes one graph call, with the
  submodule rewritten on its own; tracing through it would silently drop the checkpointing
  (a checkpointed closure cannot be a graph value: the calling module is kept as a call);
- whatever the caller asks to keep (modules rewritten before).

BN's own input checks (`_check_input_dim`) branch on the input's rank, unknown while tracing;
they are recorded as calls that run the module's check at run time (kernels/checks.py), so a
BN subclass whose forward calls `super().forward(x)` traces through and the check still
guards the input. Declared leaf functions (and those a model zoo declares untraceable) stay
single calls. The caller rewrites the kept modules on their own (see parts.py and walk.py).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch.fx
import torch.nn as nn
import torch.utils.checkpoint

from ..kernels.checks import INPUT_CHECKS, check_input
from ..vocabulary.kinds import BN_TYPES, keeps_whole, leaf_functions
from .leaves import failing_helper, flag_defaults

__all__ = ["ConvBNTracer", "Trace", "trace_graph", "trace"]

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


def _deferred_check(name: str, original):
    def check(self, x):
        if not isinstance(x, torch.fx.Proxy):
            return original(self, x)
        module = x.tracer.create_proxy("get_attr", x.tracer.path_of_module(self), (), {})
        x.tracer.create_proxy("call_function", check_input, (module, name, x), {})

    return check


_jit_isinstance = torch.jit.isinstance


def _traced_jit_isinstance(obj, target_type) -> bool:
    """`torch.jit.isinstance` while tracing: a traced value passes for the tensor it stands
    for (a Proxy is not a Tensor, so the test would take the other branch and drop a skip
    connection without a word). A non-tensor value that passes is caught when the trace is
    checked against the forward (verify.py)."""
    if isinstance(obj, torch.fx.Proxy) and target_type is torch.Tensor:
        return True
    return _jit_isinstance(obj, target_type)


@contextlib.contextmanager
def _patched_for_tracing():
    """For one trace: checkpoint calls and BN input checks recorded as graph calls, traced
    values tested by `torch.jit.isinstance` as tensors."""
    saved = [(torch.utils.checkpoint, "checkpoint", _checkpoint),
             (torch.jit, "isinstance", _jit_isinstance)]
    # `torch.utils.checkpoint.checkpoint(...)` / `cp.checkpoint(...)` look the attribute up;
    # a name imported with `from ... import checkpoint` is autowrapped (see the tracer).
    torch.utils.checkpoint.checkpoint = _traced_checkpoint
    torch.jit.isinstance = _traced_jit_isinstance
    for cls in (nn.modules.batchnorm._NormBase,) + BN_TYPES:
        for name in INPUT_CHECKS:
            if name in vars(cls):
                saved.append((cls, name, vars(cls)[name]))
                setattr(cls, name, _deferred_check(name, vars(cls)[name]))
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def _never(module: nn.Module) -> bool:
    return False


class ConvBNTracer(torch.fx.Tracer):
    """A Tracer that keeps block modules, hooked modules and the given paths as calls.

    Args:
        untraceable: qualified names of submodules kept as calls because they did not trace.
        keep: what else to keep as one call (e.g. modules rewritten before).
        leaves: functions kept as one call besides the declared ones (leaves.py).
    After a failed `trace`, `failed_in` names the innermost submodule whose forward raised
    ("" when the root's own code did).
    """

    def __init__(self, untraceable: frozenset[str] = frozenset(),
                 keep: Callable[[nn.Module], bool] = _never, leaves: tuple = ()):
        super().__init__(autowrap_functions=tuple(leaf_functions()) + leaves + (_checkpoint,))
        # Buffers read in a forward are graph values, not numbers baked in at trace time: a
        # frozen norm's `w * (rv + eps).rsqrt()` must follow `load_state_dict` and `.to()`.
        self.proxy_buffer_attributes = True
        self.untraceable, self.keep = untraceable, keep
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.untraceable or keeps_whole(m) or self.keep(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_arg(self, a):
        # torch.fx turns a dict subclass into a plain dict and rejects other dataclasses: a
        # dataclass result (HF's ModelOutput) or an OrderedDict (torchvision's backbones) is
        # rebuilt as itself, so the rewritten model returns the type its forward returns.
        if dataclasses.is_dataclass(a) and not isinstance(a, type):
            fields = {f.name: self.create_arg(getattr(a, f.name))
                      for f in dataclasses.fields(a) if f.init}
            return self.create_node("call_function", type(a), (), fields)
        if type(a) is collections.OrderedDict:
            items = [(self.create_arg(k), self.create_arg(v)) for k, v in a.items()]
            return self.create_node("call_function", collections.OrderedDict, (items,), {})
        return super().create_arg(a)

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
    untraceable: frozenset[str] = field(default_factory=frozenset)


def trace_graph(model: nn.Module, untraceable: frozenset[str] = frozenset(),
                keep: Callable[[nn.Module], bool] = _never) -> Trace:
    """Symbolically trace `model`, retrying what a failure points at (leaves.py): the helper
    function it stopped in becomes a leaf, the forward's flag arguments become guarded
    constants, and else the submodule whose forward failed is kept as a call.

    Raises whatever torch.fx raised when the root's own forward cannot be traced.
    """
    untraceable, leaves, concrete = frozenset(untraceable), (), None
    while True:
        tracer = ConvBNTracer(untraceable, keep, leaves)
        try:
            return Trace(tracer.trace(model, concrete), untraceable)
        except Exception as exc:
            helper = failing_helper(exc)
            if helper is not None and helper not in leaves:
                leaves += (helper,)
            elif concrete is None and flag_defaults(model):
                concrete = flag_defaults(model)
            elif tracer.failed_in and tracer.failed_in not in untraceable:
                untraceable = untraceable | {tracer.failed_in}
            else:
                raise


def trace(model: nn.Module, keep: Callable[[nn.Module], bool] = _never) -> torch.fx.GraphModule:
    """`trace_graph` as a GraphModule over `model`, holding its whole module tree.

    (A plain GraphModule copies only what the graph names, putting empty modules on the path
    to a traced-through BN's tensors, which would hide the BN's own state.)
    """
    gm = torch.fx.GraphModule(model, trace_graph(model, keep=keep).graph, type(model).__name__)
    for name, child in model.named_children():
        setattr(gm, name, child)
    return gm
