"""Normalise conv, linear and BN calls, in every spelling, to one small record per op.

Blocks are found in three graph flavours: module graphs (`call_module` of a stock conv or BN,
or the functional calls a traced-through subclass made), the functional graphs a
torch.compile backend or inductor's pre-grad pass receives (`torch.conv2d` →
`F.batch_norm(..., training=False)`, parameters as placeholders or `get_attr` nodes), and
aten graphs from `torch.export` (`aten.conv2d` → `aten.batch_norm`, or after
`run_decompositions` `aten.convolution` → `aten._native_batch_norm_legit_no_training`, which
returns a tuple whose item 0 is the BN output, and decomposed linears `addmm(b, x, W.t())`).
Arguments are bound to parameter names with defaults filled in (as
`inspect.signature(F.batch_norm).bind(...).apply_defaults()` does), so spelling never decides
whether a block is found: `bn(input=x)` matches like `bn(x)`.
"""

from __future__ import annotations

import inspect
import numbers
import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ..vocabulary.blocks import ConvConfig, same_padding

__all__ = ["ConvCall", "NormCall", "match_conv", "match_norm", "match_flatten", "module_input",
           "module_path", "op_name", "static_shape", "conv_config"]

aten = torch.ops.aten


# Python signatures for the builtin conv functions (inspect cannot read builtins); the
# parameter names are those of the aten schemas, so both flavours normalise to one record.
def _conv_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    pass


def _conv_transpose_signature(input, weight, bias=None, stride=1, padding=0, output_padding=0,
                              groups=1, dilation=1):
    pass


def _linear_signature(input, weight, bias=None):
    pass


# target -> (signature: a Python function or an aten overload, spatial dims, transposed);
# dims None: read from the stride (aten.convolution); transposed None: an argument.
_CONVS: dict[Any, tuple[Any, int | None, bool | None]] = {
    torch.conv1d: (_conv_signature, 1, False),
    torch.conv2d: (_conv_signature, 2, False),
    torch.conv3d: (_conv_signature, 3, False),
    torch.conv_transpose1d: (_conv_transpose_signature, 1, True),
    torch.conv_transpose2d: (_conv_transpose_signature, 2, True),
    torch.conv_transpose3d: (_conv_transpose_signature, 3, True),
    aten.conv1d.default: (aten.conv1d.default, 1, False),
    aten.conv2d.default: (aten.conv2d.default, 2, False),
    aten.conv3d.default: (aten.conv3d.default, 3, False),
    aten.conv1d.padding: (aten.conv1d.padding, 1, False),
    aten.conv2d.padding: (aten.conv2d.padding, 2, False),
    aten.conv3d.padding: (aten.conv3d.padding, 3, False),
    aten.conv_transpose1d.default: (aten.conv_transpose1d.default, 1, True),
    aten.conv_transpose2d.input: (aten.conv_transpose2d.input, 2, True),
    aten.conv_transpose3d.input: (aten.conv_transpose3d.input, 3, True),
    aten.convolution.default: (aten.convolution.default, None, None),
}
_LINEARS = {F.linear: _linear_signature, aten.linear.default: aten.linear.default}

# target -> (signature, returns a tuple whose item 0 is the output, training when no argument)
_NORMS: dict[Any, tuple[Any, bool, bool | None]] = {
    F.batch_norm: (F.batch_norm, False, None),
    torch.batch_norm: (aten.batch_norm.default, False, None),
    aten.batch_norm.default: (aten.batch_norm.default, False, None),
    aten._native_batch_norm_legit_no_training.default:
        (aten._native_batch_norm_legit_no_training.default, True, False),
    aten.native_batch_norm.default: (aten.native_batch_norm.default, True, None),
    aten._native_batch_norm_legit.default: (aten._native_batch_norm_legit.default, True, None),
    aten._native_batch_norm_legit_functional.default:
        (aten._native_batch_norm_legit_functional.default, True, None),
}


@dataclass
class ConvCall:
    """A functional conv or linear call, its arguments by name."""

    node: torch.fx.Node
    input: Any
    weight: Any
    bias: Any
    linear: bool
    args: dict[str, Any]            # every argument by name (stride, padding, ...)


@dataclass
class NormCall:
    """A functional batch-norm call, its arguments by name."""

    node: torch.fx.Node             # holds the BN output (getitem 0 of tuple-returning ops)
    call: torch.fx.Node             # computes the BN (the same node, except for tuple forms)
    input: Any
    running_mean: Any
    running_var: Any
    weight: Any
    bias: Any
    training: Any                   # a bool when the graph fixes it, else a node
    eps: Any


def _bind(signature: Any, node: torch.fx.Node) -> dict[str, Any] | None:
    """The node's arguments by parameter name, defaults filled in; None if they do not bind."""
    if isinstance(signature, torch._ops.OpOverload):
        params = signature._schema.arguments
        if len(node.args) > len(params):
            return None
        bound = {p.name: a for p, a in zip(params, node.args)}
        for name, value in node.kwargs.items():
            if name in bound or all(p.name != name for p in params):
                return None
            bound[name] = value
        for p in params:
            if p.name not in bound:
                if not p.has_default_value():
                    return None
                bound[p.name] = p.default_value
        return bound
    try:
        bound = inspect.signature(signature).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _transposed_weight(node: Any) -> torch.fx.Node | None:
    """W when `node` is `aten.t(W)` or `aten.permute(W, [1, 0])`, as decomposed linears read it."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.t.default or (
            node.target is aten.permute.default and list(node.args[1]) == [1, 0]):
        return node.args[0] if isinstance(node.args[0], torch.fx.Node) else None
    return None


def _linear_args(node: torch.fx.Node) -> dict[str, Any] | None:
    """{input, weight, bias} of a linear, also decomposed: `addmm(b, x, W.t())`, `mm(x, W.t())`."""
    if node.target in _LINEARS:
        return _bind(_LINEARS[node.target], node)
    if node.target not in (aten.addmm.default, aten.mm.default):
        return None
    args = _bind(node.target, node)
    if args is None or args.get("beta", 1) != 1 or args.get("alpha", 1) != 1:
        return None
    weight = _transposed_weight(args["mat2"])
    if weight is None:
        return None
    if node.target is aten.mm.default:
        return {"input": args["self"], "weight": weight, "bias": None}
    return {"input": args["mat1"], "weight": weight, "bias": args["self"]}


def match_conv(node: torch.fx.Node) -> ConvCall | None:
    """The call when `node` is a functional (or aten) conv or linear, else None."""
    if node.op != "call_function":
        return None
    args, linear = _linear_args(node), True
    if args is None and node.target in _CONVS:
        args, linear = _bind(_CONVS[node.target][0], node), False
    if args is None:
        return None
    return ConvCall(node, args["input"], args["weight"], args["bias"], linear, args)


def match_norm(node: torch.fx.Node) -> NormCall | None:
    """The call when `node` holds the output of a functional (or aten) batch norm, else None."""
    if node.op != "call_function":
        return None
    call = node
    if node.target is operator.getitem:
        call, index = node.args
        if index != 0 or not isinstance(call, torch.fx.Node) or call.op != "call_function":
            return None
    spec = _NORMS.get(call.target)
    if spec is None or spec[1] != (call is not node):
        return None
    args = _bind(spec[0], call)
    if args is None:
        return None
    training = spec[2] if spec[2] is not None else args["training"]
    return NormCall(node, call, args["input"], args["running_mean"], args["running_var"],
                    args["weight"], args["bias"], training, args["eps"])


def _flatten_signature(input, start_dim=0, end_dim=-1):
    pass


def match_flatten(node: torch.fx.Node) -> tuple[torch.fx.Node, tuple[int, int]] | None:
    """(the flattened value, (start_dim, end_dim)) when `node` is `x.flatten(s, e)` or
    `torch.flatten(x, s, e)` with constant dims, else None."""
    if not ((node.op == "call_method" and node.target == "flatten")
            or (node.op == "call_function" and node.target is torch.flatten)):
        return None
    args = _bind(_flatten_signature, node)
    if args is None or not isinstance(args["input"], torch.fx.Node):
        return None
    dims = (args["start_dim"], args["end_dim"])
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return None
    return args["input"], dims


def module_input(module: nn.Module, node: torch.fx.Node):
    """(the value passed as a module call's first argument, how many more were given)."""
    if node.args:
        return node.args[0], len(node.args) - 1 + len(node.kwargs)
    try:
        bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
    except TypeError:
        return None, 0
    values = list(bound.arguments.values())
    return (values[0] if values else None), max(len(values) - 1, 0)


def _ints(value: Any, dims: int) -> tuple[int, ...] | None:
    """An int or a list of ints as a `dims`-tuple; None when any is not a constant int."""
    values = [value] * dims if isinstance(value, numbers.Integral) else value
    if not isinstance(values, (list, tuple)) or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        return None
    values = tuple(int(v) for v in values)
    return values * dims if len(values) == 1 and dims > 1 else values


def static_shape(value: Any, root: nn.Module | None = None) -> tuple | None:
    """The static shape of a graph value: a node's recorded value, a get_attr's tensor, or
    (a qualified name) the parameter or buffer of `root`; None when unknown."""
    if isinstance(value, str):
        value = _resolve(root, value)
    elif isinstance(value, torch.fx.Node):
        node = value
        value = node.meta.get("val", node.meta.get("example_value"))
        if value is None and node.op == "get_attr":
            value = _resolve(node.graph.owning_module, node.target)
    else:
        return None
    shape = getattr(value, "shape", None)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(shape)


def _resolve(root: nn.Module | None, target: str):
    value = root
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def conv_config(call: ConvCall) -> tuple[ConvConfig | None, str | None]:
    """A functional conv's ConvConfig, or a reason it cannot be read statically."""
    args = call.args
    _, dims, transposed = _CONVS[call.node.target]
    if transposed is None:
        transposed = args["transposed"]
        if not isinstance(transposed, bool):
            return None, "the conv's `transposed` flag is only known at run time"
    if dims is None:
        dims = len(args["stride"]) if isinstance(args["stride"], (list, tuple)) else None
        if dims is None:
            return None, "the conv's stride is only known at run time"
    stride, dilation = _ints(args["stride"], dims), _ints(args["dilation"], dims)
    output_padding = _ints(args.get("output_padding", 0), dims)
    groups = args["groups"]
    padding, pre_pad = args["padding"], None
    if padding == "valid":
        padding = (0,) * dims
    elif padding == "same":
        kernel = static_shape(call.weight)
        if kernel is None:
            return None, "padding='same' needs the conv weight's shape, which the graph lacks"
        padding, pre_pad = same_padding(kernel[2:], dilation or (1,) * dims)
    else:
        padding = _ints(padding, dims)
    if None in (stride, dilation, output_padding, padding) or not isinstance(groups, int) \
            or isinstance(groups, bool):
        return None, "the conv's stride, padding, dilation or groups are only known at run time"
    return ConvConfig(stride=stride, padding=padding, dilation=dilation, transposed=transposed,
                      output_padding=output_padding, groups=groups, pre_pad=pre_pad), None


def module_path(node: torch.fx.Node) -> tuple[str, str] | None:
    """(qualified name, class name) of the module that made `node`, from nn_module_stack."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    # Dynamo writes "L['self'].layer1[0]._modules['bn1']" or "L['fn'].__self__.0" (for
    # `module.compile()`); export writes "layer1.0.bn1".
    path = re.sub(r"^L\['[^']*'\](\.__self__)?", "", path)
    path = re.sub(r"\._modules\['([^']*)'\]|\[(\d+)\]|\['([^']*)'\]",
                  lambda m: "." + next(g for g in m.groups() if g is not None), path)
    name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
    return path.lstrip(".") or node.name, name


def op_name(target: Any) -> str:
    """A call target's short name (`conv2d`, `batch_norm`), for a block's kind."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))
