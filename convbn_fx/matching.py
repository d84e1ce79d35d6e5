"""Find conv→BN blocks in a module graph (`call_module` nodes from a torch.fx trace).

All blocks are found first and rewritten afterwards. Each block is matched per call site, so
a conv or BN module used twice yields one block per use. A block that is not provably safe to
fold is still returned, with a one-line `reason`, so `describe()` can say why it was skipped.
A Linear followed by BatchNorm1d (or SyncBatchNorm) is a block too, with `op="linear"`; whether
its input has the rank that makes folding right is only known per call (see folding.py).
"""

from __future__ import annotations

import inspect

import torch.fx
import torch.nn as nn

from .blocks import Block, ConvConfig, same_padding
from .kinds import bn_base, bn_spatial_dims, conv_base, is_frozen_bn, is_linear, overrides_forward

__all__ = ["find_blocks", "node_input"]


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


def _conv_config(conv: nn.Module) -> ConvConfig:
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


def _bn_channels(bn: nn.Module) -> int:
    return bn.num_features if hasattr(bn, "num_features") else bn.weight.shape[0]


def _shape_reason(conv: nn.Module, bn: nn.Module) -> str | None:
    """Whether the BN kind normalises the channels (features) that the conv (linear) makes."""
    if is_linear(conv):
        if bn_base(bn) not in (nn.BatchNorm1d, nn.SyncBatchNorm):
            return f"{type(bn).__name__} does not normalise a Linear's output features"
        if conv.out_features != _bn_channels(bn):
            return f"Linear has {conv.out_features} output features but BN has {_bn_channels(bn)}"
        return None
    if conv.out_channels != _bn_channels(bn):
        return f"conv has {conv.out_channels} output channels but BN has {_bn_channels(bn)}"
    if len(conv.kernel_size) not in bn_spatial_dims(bn):
        return f"{type(bn).__name__} does not accept the output of a {len(conv.kernel_size)}-d conv"
    return None


def _skip_reason(conv_node: torch.fx.Node, conv: nn.Module, bn_node: torch.fx.Node, bn: nn.Module, bn_extra: int) -> str | None:
    """One guard per precondition of folding; the first that fails names the reason."""
    conv_cls, bn_cls = conv_base(conv), bn_base(bn)
    if overrides_forward(conv, conv_cls):
        return (f"{type(conv).__name__} overrides forward, so folding into its weight may be "
                "wrong; convbn_fx.declare_safe(cls) if it computes what the stock one does")
    if overrides_forward(bn, bn_cls):
        return (f"{type(bn).__name__} overrides forward, so it may not be a plain batch norm; "
                "convbn_fx.declare_safe(cls) if it is")
    if len(conv_node.users) > 1:
        others = ", ".join(u.name for u in conv_node.users if u is not bn_node)
        return f"the conv output is also used by {others}"
    _, conv_extra = node_input(conv, conv_node)
    if conv_extra or bn_extra:
        return "the conv or BN is called with extra arguments (e.g. output_size)"
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in conv.parameters()):
        return "the conv has uninitialized (lazy) parameters"
    if not is_frozen_bn(bn) and (bn.running_mean is None or bn.running_var is None):
        return "BN has no running statistics (track_running_stats=False), so it always " \
               "normalises with batch statistics"
    shape_reason = _shape_reason(conv, bn)
    if shape_reason is not None:
        return shape_reason
    if conv._forward_hooks or conv._forward_pre_hooks or bn._forward_hooks \
            or bn._forward_pre_hooks:
        return "the conv or BN has forward hooks, which folding would skip"
    if any(m._backward_hooks or m._backward_pre_hooks for m in (conv, bn)):
        return "the conv or BN has backward hooks, which folding would skip"
    return None


def find_blocks(graph: torch.fx.Graph, root: nn.Module) -> list[Block]:
    """Every conv→BN block in a module graph, in graph order.

    Args:
        graph: a graph whose convs and BNs are `call_module` nodes (see `ConvBNTracer`).
        root: the module that owns the graph's call_module targets.
    Returns:
        One `Block` per BN call fed directly by a conv call; unfoldable ones carry a reason.
    """
    blocks = []
    modules = dict(root.named_modules())
    for bn_node in list(graph.nodes):
        if bn_node.op != "call_module":
            continue
        bn = modules.get(bn_node.target)
        if bn is None or bn_base(bn) is None:
            continue
        conv_node, bn_extra = node_input(bn, bn_node)
        if not isinstance(conv_node, torch.fx.Node) or conv_node.op != "call_module":
            continue
        conv = modules.get(conv_node.target)
        if conv is None or conv_base(conv) is None:
            continue
        block = Block(conv=conv_node.target, bn=bn_node.target,
                      kind=f"{type(conv).__name__}+{type(bn).__name__}",
                      conv_node=conv_node, bn_node=bn_node)
        block.reason = _skip_reason(conv_node, conv, bn_node, bn, bn_extra)
        if block.reason is None:
            block.input = node_input(conv, conv_node)[0]
            if is_linear(conv):
                block.op = "linear"
                block.bn_ranks = (2, 3) if bn_base(bn) is nn.BatchNorm1d else None
            else:
                block.config = _conv_config(conv)
            block.eps = float(bn.eps)
            c, b = conv_node.target, bn_node.target
            block.tensors = {
                "weight": f"{c}.weight",
                "bias": f"{c}.bias" if conv.bias is not None else None,
                "running_mean": f"{b}.running_mean",
                "running_var": f"{b}.running_var",
                "bn_weight": f"{b}.weight" if bn.weight is not None else None,
                "bn_bias": f"{b}.bias" if bn.bias is not None else None,
                "num_batches_tracked": (f"{b}.num_batches_tracked" if getattr(
                    bn, "num_batches_tracked", None) is not None else None),
            }
        blocks.append(block)
    return blocks
