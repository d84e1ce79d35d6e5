"""Find conv→BN blocks in a module graph (from `ConvBNTracer`), whatever the modules look like.

A block's two ends are found in one of two forms. A stock conv or BN module (or one declared
safe, or a frozen norm) is a `call_module` node, read from its attributes. A subclass that
overrides forward (timm's BatchNormAct2d, Conv2dSame, StdConv2d) was traced through, so its
end is the functional call its forward made (`F.batch_norm(x, bn.running_mean, ...)`,
`F.conv2d(pad_same(x), standardised_weight, ...)`), read with the functional matcher's
argument normalisation; the module is the owner of the tensors it reads. Both forms fill the
same `Block`, so the lowerings never see the difference.

All blocks are found first and rewritten afterwards, one per BN call site fed directly by a
conv call. A block that is not provably safe to fold is still returned, with a one-line
`reason`, so `describe()` can say why it was skipped. A Linear followed by BatchNorm1d is a
block too (`op="linear"`); whether its input has the rank that makes folding right is only
known per call (see folding.py).
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch.fx
import torch.nn as nn

from .blocks import Block, ConvConfig, Source, same_padding
from .kinds import (bn_base, bn_spatial_dims, conv_base, frozen_norm, has_hooks, is_frozen_bn,
                    is_linear, is_plain)
from .match_functional import bn_call, conv_call, functional_conv_config, module_path
from .tracing import check_input

__all__ = ["find_blocks", "node_input", "is_metadata_use"]

# Reading these from a conv output needs its shape or type, not its values.
_METADATA_ATTRS = {"ndim", "shape", "dtype", "device", "is_cuda", "layout"}
_METADATA_METHODS = {"size", "dim", "ndimension", "get_device"}


def is_metadata_use(user: torch.fx.Node, value: torch.fx.Node) -> bool:
    """`user` reads only the shape or type of `value` (an input check like `x.ndim == 4`)."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is value and user.args[1] in _METADATA_ATTRS
    if user.op == "call_function" and user.target is check_input:
        return user.args[2] is value
    if user.op == "call_method" and user.target in _METADATA_METHODS:
        return user.args[0] is value and value not in user.args[1:]
    return False


def node_input(module: nn.Module, node: torch.fx.Node):
    """The value passed as the first argument of a module call, however it was spelled.

    Returns (value, extra) where extra counts any further arguments given.
    """
    if node.args:
        return node.args[0], len(node.args) - 1 + len(node.kwargs)
    try:
        bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
    except TypeError:
        return None, 0
    values = list(bound.arguments.values())
    return (values[0] if values else None), max(len(values) - 1, 0)


def _module_conv_config(conv: nn.Module) -> ConvConfig:
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    dims = len(conv.kernel_size)
    padding, pre_pad, pad_mode = conv.padding, None, "constant"
    if padding == "valid":
        padding = (0,) * dims
    elif padding == "same":  # may pad one more on one side
        padding, pre_pad = same_padding(conv.kernel_size, conv.dilation)
    if conv.padding_mode != "zeros":
        pre_pad, pad_mode = tuple(conv._reversed_padding_repeated_twice), conv.padding_mode
        padding = (0,) * dims
    return ConvConfig(
        stride=tuple(conv.stride), padding=tuple(padding), dilation=tuple(conv.dilation),
        transposed=transposed,
        output_padding=tuple(conv.output_padding) if transposed else (0,) * dims,
        groups=conv.groups, pre_pad=pre_pad, pad_mode=pad_mode)


@dataclass
class _End:
    """One end of a block (the conv, or the norm) as found in the graph."""

    name: str                       # qualified name of the module, or the node's name
    module: nn.Module | None        # None when no module owns the call
    node: torch.fx.Node             # the call (its output is the conv output / BN output)
    input: Any = None               # what the call normalises or convolves
    tensors: dict[str, Source] = field(default_factory=dict)
    reason: str | None = None
    # conv end only
    config: ConvConfig | None = None
    linear: bool = False
    # norm end only
    eps: float = 1e-5
    epilogue: tuple[str, ...] = ()


def _attr(value: Any) -> Source:
    """A functional call's tensor argument as a Source: the qualified name it was read from."""
    if isinstance(value, torch.fx.Node) and value.op == "get_attr":
        return value.target
    return value


def _owner(source: Source) -> str | None:
    return source.rsplit(".", 1)[0] if isinstance(source, str) and "." in source else None


def _called_module(node: torch.fx.Node, modules: dict[str, nn.Module], kind) -> nn.Module | None:
    if node.op != "call_module":
        return None
    module = modules.get(node.target)
    return module if module is not None and kind(module) else None


def _hook_reason(modules) -> str | None:
    if any(m._forward_hooks or m._forward_pre_hooks for m in modules):
        return "the conv or BN has forward hooks, which folding would skip"
    if any(m._backward_hooks or m._backward_pre_hooks for m in modules):
        return "the conv or BN has backward hooks, which folding would skip"
    return None


def _kept_whole_reason(module: nn.Module) -> str | None:
    """Why a conv or BN subclass that overrides forward was not traced through."""
    if is_plain(module):
        return None
    if has_hooks(module):
        return _hook_reason([module])
    return (f"{type(module).__name__} overrides forward with code that does not trace, so "
            "what it computes cannot be checked; convbn_fx.declare_safe(cls) if it computes "
            "what the stock one does")


def _call_reason(module: nn.Module, extra: int, what: str) -> str | None:
    """Why a kept-whole module call cannot be folded from the module's attributes."""
    if extra:
        return f"the {what} is called with extra arguments (e.g. output_size)"
    return _kept_whole_reason(module)


def _conv_end(node: torch.fx.Node, modules: dict[str, nn.Module]) -> _End | None:
    conv = _called_module(node, modules, conv_base)
    if conv is not None:
        value, extra = node_input(conv, node)
        t = node.target
        end = _End(t, conv, node, value, {
            "weight": f"{t}.weight", "bias": f"{t}.bias" if conv.bias is not None else None})
        end.linear = is_linear(conv)
        end.reason = _call_reason(conv, extra, "conv")
        if end.reason is None and not end.linear:
            end.config = _module_conv_config(conv)
        return end
    found = conv_call(node) if node.op == "call_function" else None
    if found is None:
        return None
    args, linear = found
    weight = _attr(args["weight"])
    # The conv's module: the owner of its weight, or (a computed weight, as weight
    # standardisation makes) the module whose forward made the call.
    name = _owner(weight) or (module_path(node) or (None,))[0]
    end = _End(name or node.name, modules.get(name), node, args["input"],
               {"weight": weight, "bias": _attr(args["bias"])}, linear=linear)
    if not linear:
        end.config, end.reason = functional_conv_config(node.target, args)
    return end


def _norm_end(node: torch.fx.Node, modules: dict[str, nn.Module]) -> _End | None:
    bn = _called_module(node, modules, bn_base)
    if bn is not None:
        value, extra = node_input(bn, node)
        t = node.target
        end = _End(t, bn, node, value, {
            "running_mean": f"{t}.running_mean", "running_var": f"{t}.running_var",
            "bn_weight": f"{t}.weight" if bn.weight is not None else None,
            "bn_bias": f"{t}.bias" if bn.bias is not None else None,
            "num_batches_tracked": (f"{t}.num_batches_tracked" if getattr(
                bn, "num_batches_tracked", None) is not None else None)}, eps=float(bn.eps))
        norm = frozen_norm(bn)
        end.epilogue = tuple(f"{t}.{e}" for e in norm.epilogue) if norm else ()
        end.reason = _call_reason(bn, extra, "BN")
        if end.reason is None and not is_frozen_bn(bn) and (
                bn.running_mean is None or bn.running_var is None):
            end.reason = ("BN has no running statistics (track_running_stats=False), so it "
                          "always normalises with batch statistics")
        return end
    found = bn_call(node)
    if found is None or found[0] is not node:  # module graphs hold no tuple-returning BN ops
        return None
    args = found[1]
    mean, var = _attr(args["running_mean"]), _attr(args["running_var"])
    name = _owner(mean)
    if name is None or name != _owner(var) or name not in modules:
        return None  # statistics not read from a module: nothing whose state we could follow
    end = _End(name, modules[name], node, args["input"], {
        "running_mean": mean, "running_var": var,
        "bn_weight": _attr(args["weight"]), "bn_bias": _attr(args["bias"])})
    if getattr(modules[name], "num_batches_tracked", None) is not None:
        end.tensors["num_batches_tracked"] = f"{name}.num_batches_tracked"
    eps, training = args["eps"], args["training"]
    if not isinstance(training, bool):
        end.reason = "BN's `training` flag is only known at run time"
    elif not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        end.reason = "BN's eps is only known at run time"
    else:
        end.eps = float(eps)
    return end


def _resolve(root: nn.Module, source: Source):
    if isinstance(source, str):
        try:
            return root.get_parameter(source)
        except AttributeError:
            try:
                return root.get_buffer(source)
            except AttributeError:
                return None
    return None


def _out_channels(conv: _End, root: nn.Module) -> int | None:
    module = conv.module
    if module is not None and conv_base(module) is not None:
        return module.out_features if is_linear(module) else module.out_channels
    weight = _resolve(root, conv.tensors["weight"])
    if weight is None:
        return None
    if conv.linear or not conv.config.transposed:
        return weight.shape[0]
    return weight.shape[1] * conv.config.groups


def _shape_reason(conv: _End, norm: _End, root: nn.Module) -> str | None:
    """Whether the norm normalises the channels (features) that the conv (linear) makes."""
    bn = norm.module
    if conv.linear and norm.node.op == "call_module" \
            and bn_base(bn) not in (nn.BatchNorm1d, nn.SyncBatchNorm):
        return f"{type(bn).__name__} does not normalise a Linear's output features"
    out, mean = _out_channels(conv, root), _resolve(root, norm.tensors["running_mean"])
    if out is not None and mean is not None and out != mean.numel():
        what = "Linear has {} output features" if conv.linear else "conv has {} output channels"
        return f"{what.format(out)} but BN has {mean.numel()}"
    if not conv.linear and norm.node.op == "call_module" \
            and len(conv.config.stride) not in bn_spatial_dims(bn):
        return f"{type(bn).__name__} does not accept the output of a " \
               f"{len(conv.config.stride)}-d conv"
    return None


def _skip_reason(conv: _End, norm: _End, root: nn.Module) -> str | None:
    """One guard per precondition of folding; the first that fails names the reason."""
    if conv.reason or norm.reason:
        return conv.reason or norm.reason
    if conv.module is None:
        return "no module owns the conv's weight, so its state cannot be followed"
    called = [m.module for m in (conv, norm) if m.node.op == "call_module"]
    hook_reason = _hook_reason(called)
    if hook_reason:
        return hook_reason
    others = [u.name for u in conv.node.users
              if u is not norm.node and not is_metadata_use(u, conv.node)]
    if others:
        return f"the conv output is also used by {', '.join(others)}"
    if any(isinstance(p, nn.parameter.UninitializedParameter)
           for p in conv.module.parameters()):
        return "the conv has uninitialized (lazy) parameters"
    return _shape_reason(conv, norm, root)


def find_blocks(graph: torch.fx.Graph, root: nn.Module) -> list[Block]:
    """Every conv→BN block in a module graph, in graph order.

    Args:
        graph: a graph from `ConvBNTracer`: stock convs and BNs are `call_module` nodes,
            subclasses that were traced through left functional calls.
        root: the module that owns the graph's call_module and get_attr targets.
    Returns:
        One `Block` per BN call fed directly by a conv call; unfoldable ones carry a reason.
    """
    blocks = []
    modules = dict(root.named_modules())
    for node in list(graph.nodes):
        norm = _norm_end(node, modules)
        if norm is None or not isinstance(norm.input, torch.fx.Node):
            continue
        conv = _conv_end(norm.input, modules)
        if conv is None:
            continue
        kind = f"{type(conv.module).__name__ if conv.module is not None else conv.name}" \
               f"+{type(norm.module).__name__}"
        block = Block(conv=conv.name, bn=norm.name, kind=kind, conv_node=conv.node,
                      bn_node=norm.node)
        block.reason = _skip_reason(conv, norm, root)
        if block.reason is None:
            block.input, block.config, block.eps = conv.input, conv.config, norm.eps
            block.epilogue = norm.epilogue
            if conv.linear:
                block.op = "linear"
                # A BatchNorm1d module checks the rank; F.batch_norm takes any.
                block.bn_ranks = (2, 3) if norm.node.op == "call_module" \
                    and bn_base(norm.module) is nn.BatchNorm1d else None
            block.tensors = {**conv.tensors, **norm.tensors}
        blocks.append(block)
    return blocks
