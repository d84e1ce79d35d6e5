"""Whole-model pickles of rewritten models: what is saved, and a clear error when it can't be.

torch.fx's own `GraphModule.__reduce__` saves the generated code and traces it again on load.
A rewritten model's code calls convbn_fx kernels that branch in Python (on a weight's rank,
on autograd), so tracing it again fails or recurses; and a rewritten part's class is made at
run time, so pickle cannot find it by name. So a rewritten model is saved as what the rewrite
was made from: its module tree, the mode rule, the traced (never lowered) graph as a flat
list of nodes, and the model it was traced from; on load the blocks are lowered again for the
state the model is in, exactly as after any state change. Nothing generated is saved, so a
loaded model follows state changes like the original.

A model that would not pickle for another reason (a lambda attribute, a hook closure, a
module sharded by `fully_shard`) is refused while `torch.save` starts, with one ConvBNError
sentence naming the attribute, instead of a PicklingError from deep inside the pickler.
The names below are referenced from saved files: renaming one breaks old checkpoints.
"""

from __future__ import annotations

import importlib
import pickle
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn

from ..vocabulary.errors import ConvBNError, exception_summary
from ..vocabulary.kinds import has_object_state

__all__ = ["NodeRef", "GlobalRef", "PortableGraph", "PickledTuning", "new_instance",
           "importable", "reduced", "check_picklable"]


def new_instance(cls: type) -> Any:
    """An empty instance of `cls` for pickle to fill (GraphModule makes its own subclass)."""
    return cls.__new__(cls)


def importable(obj: Any) -> bool:
    """Whether pickle can find `obj` (a class or function) again by its module and name."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not name or "<locals>" in name:
        return False
    try:
        found = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return False
    return found is obj


class NodeRef:
    """Stands for a node in a PortableGraph's arguments (by name: nodes are not pickled)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self):
        return (NodeRef, (self.name,))


_PLAIN = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.memory_format,
          torch.layout, slice, type(Ellipsis))


def _plain(value: Any) -> bool:
    """Constants that pickle wherever torch does (metadata worth keeping)."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return isinstance(value, type) and importable(value)


def _portable_type(t: Any) -> bool:
    """An annotation pickle can rebuild: an importable class, or a generic of such."""
    if t is None or (isinstance(t, type) and not hasattr(t, "__origin__")):
        return t is None or importable(t)
    origin, args = getattr(t, "__origin__", None), getattr(t, "__args__", None)
    if origin is None or args is None:
        return False
    return _portable_type(origin) and all(a is Ellipsis or _portable_type(a) for a in args)


def _portable_meta(meta: dict) -> dict:
    """node.meta without what cannot be pickled or is only valid in this process.

    Kept: plain values, `nn_module_stack` (which names blocks in traced-through code; a class
    made at run time is kept as its dotted name, as Dynamo writes it), and recorded tensor
    values as meta tensors of the same static shape (fake tensors belong to their mode).
    """
    out = {}
    for key, value in meta.items():
        if key == "nn_module_stack" and isinstance(value, dict):
            out[key] = {k: (path, cls if importable(cls) else
                            f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', cls)}")
                        for k, (path, cls) in value.items()}
        elif isinstance(value, torch.Tensor):
            if all(isinstance(d, int) for d in value.shape):
                out[key] = torch.empty(tuple(value.shape), dtype=value.dtype, device="meta")
        elif _plain(value):
            out[key] = value
    return out


class GlobalRef:
    """A call target pickle cannot find by its qualified name but torch.fx's code names by
    module and name (`F.max_pool2d` is made by `boolean_dispatch`)."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __reduce__(self):
        return (GlobalRef, (self.module, self.name))

    def resolve(self) -> Any:
        return getattr(importlib.import_module(self.module), self.name)


def _target(target: Any) -> Any:
    if isinstance(target, str) or not callable(target) or importable(target):
        return target
    module, name = getattr(target, "__module__", None), getattr(target, "__name__", None)
    try:
        if module and name and getattr(importlib.import_module(module), name) is target:
            return GlobalRef(module, name)
    except (ImportError, AttributeError):
        pass
    return target  # pickling it fails, and says which node (check_picklable)


def _ref(value: Any) -> Any:
    return torch.fx.node.map_arg(value, lambda n: NodeRef(n.name))


def _deref(value: Any, env: dict) -> Any:
    return torch.fx.node.map_aggregate(
        value, lambda a: env[a.name] if isinstance(a, NodeRef) else a)


@dataclass
class PortableGraph:
    """A torch.fx Graph as a flat list of nodes, to pickle (a Graph is a linked list whose
    pickle recurses once per node, and whose metadata may hold classes made at run time)."""

    nodes: list[tuple]          # (op, name, target, args, kwargs, type, meta), in order
    codegen: Any                # how the graph turns into Python (pytree in/out specs)
    tracer_cls: type | None
    tracer_extras: dict | None

    @classmethod
    def of(cls, graph: torch.fx.Graph) -> "PortableGraph":
        nodes = [(n.op, n.name, _target(n.target), _ref(n.args), _ref(n.kwargs),
                  n.type if _portable_type(n.type) else None,
                  _portable_meta(n.meta)) for n in graph.nodes]
        return cls(nodes, graph._codegen, graph._tracer_cls, graph._tracer_extras)

    def build(self) -> torch.fx.Graph:
        graph = torch.fx.Graph(tracer_cls=self.tracer_cls, tracer_extras=self.tracer_extras)
        graph._codegen = self.codegen
        env: dict[str, torch.fx.Node] = {}
        for op, name, target, args, kwargs, type_expr, meta in self.nodes:
            if isinstance(target, GlobalRef):
                target = target.resolve()
            node = graph.create_node(op, target, _deref(args, env), _deref(kwargs, env),
                                     name=name, type_expr=type_expr)
            node.meta = dict(meta)
            env[name] = node
        return graph


@dataclass
class PickledTuning:
    """What a TunedGraphModule's rewrite is made from (its `Tuning`, less what is derived)."""

    rule: Any                       # "auto", a Mode or a policy
    prefix: str
    source: nn.Module | None        # None also when `source_is_part` (the part restores it)
    source_is_part: bool            # the source is a view of the part running this module
    untraceable: frozenset
    retrace: Callable | None
    template: PortableGraph
    class_name: str = "GraphModule"   # what the module prints as (GraphModule's class_name)
    verify: bool = True             # check the trace per input signature (again after loading)
    split: Callable | None = None   # how to rewrite the children alone (model/walk.split)
    split_done: bool = False        # they were: the saved children are parts already


# -- refusing what will not pickle, at save time --------------------------------------------

_probing = threading.local()


class _Sink:
    def write(self, data) -> int:
        return len(data)


class _Probe(pickle.Pickler):
    """Pickles into nothing with tensors left out: whether a pickle would succeed, fast."""

    def persistent_id(self, obj):
        if isinstance(obj, (torch.Tensor, torch.UntypedStorage, torch.TypedStorage)):
            return id(obj)
        return None


def _probe_error(value: Any) -> Exception | None:
    outer = getattr(_probing, "active", False)
    _probing.active = True
    try:
        _Probe(_Sink(), protocol=2).dump(value)
    except RecursionError:
        raise
    except Exception as exc:  # pickle raises PicklingError, TypeError, AttributeError...
        return exc
    finally:
        _probing.active = outer
    return None


_TENSOR_DICTS = ("_parameters", "_buffers")


def _members(value: Any, label: str):
    """(label, value) for what `value` pickles, to find the first one that fails."""
    dot = f"{label}." if label else ""
    if isinstance(value, nn.Module):
        for key, item in value.__dict__.items():
            if key == "_modules":
                yield from ((f"{dot}{name}", child) for name, child in item.items())
            elif key == "_convbn":  # a TunedGraphModule's rewrite, as __getstate__ saves it
                of = f" of {label}" if label else ""
                yield f"mode policy{of}", item.rule
                if item.source is not None \
                        and item.source.__dict__.get("_convbn_part") is not value:
                    yield f"traced source{of}", item.source
                yield f"traced graph{of}", PortableGraph.of(item.template)
            elif key == "_convbn_part":
                yield label, item
            elif key not in _TENSOR_DICTS and key != "_graph":
                yield f"{dot}{key}", item
    elif isinstance(value, PortableGraph):
        yield from ((f"{label} (node {node[1]}, calling {node[2]!r})", node)
                    for node in value.nodes)
    elif isinstance(value, dict):
        yield from ((f"{label}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        yield from ((f"{label}[{i}]", v) for i, v in enumerate(value))
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        yield from ((f"{dot}{k}", v) for k, v in vars(value).items())


def _narrow(value: Any, label: str, exc: Exception) -> tuple[str, Any, Exception]:
    """The innermost member of `value` that does not pickle."""
    seen = set()
    while True:
        for sub_label, sub in _members(value, label):
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            sub_exc = _probe_error(sub)
            if sub_exc is not None:
                value, label, exc = sub, sub_label, sub_exc
                break
        else:
            return label, value, exc


def _object_state_error(where: str) -> ConvBNError:
    return ConvBNError(
        f"{where} was passed to fully_shard (or another composable API that keeps its state "
        "on the module object), which does not survive pickling; save its state_dict "
        "(torch.distributed.checkpoint for a sharded model) and apply the API again after "
        "loading.")


def check_picklable(module: nn.Module, state: Any) -> None:
    """Raise one ConvBNError sentence when `module`'s pickled `state` would not pickle."""
    if has_object_state(module):
        raise _object_state_error(type(module).__name__)
    exc = _probe_error(state)
    if exc is None:
        return
    where, value, exc = _narrow(module, "", exc)
    if isinstance(value, nn.Module) and has_object_state(value):
        raise _object_state_error(where or type(module).__name__)
    raise ConvBNError(
        f"this {type(module).__name__} cannot be pickled (torch.save of the whole model, "
        f"spawn arguments) because {f'its {where}' if where else 'it'} does not pickle "
        f"({exception_summary(exc)}); define it at module level rather than as a lambda or "
        "local function, or remove it before saving, or save model.state_dict() instead.")


def reduced(module: nn.Module, rebuild: Callable, args: tuple, state: Any) -> tuple:
    """`module.__reduce__()`'s answer, once `state` is known to pickle (see the docstring).

    While a probe runs, nested rewritten modules skip their own probe.
    """
    if not getattr(_probing, "active", False):
        check_picklable(module, state)
    return (rebuild, args, state)
