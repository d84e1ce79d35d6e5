"""Frozen norms recognised by what they compute: a per-channel affine epilogue of a conv.

Libraries write their frozen batch norms as plain arithmetic on buffers (torchvision's and
timm's FrozenBatchNorm2d, a dozen `*FrozenBatchNorm2d` classes in Hugging Face transformers):
`scale = w·rsqrt(rv + eps)`, `shift = b − rm·scale`, `x·scale + shift`, with `scale` and `shift`
reshaped to (1, C, 1, 1). Traced through, that is `conv(x) * S + B` where S and B are computed
only from parameters and buffers, never from the input. Such an epilogue folds into the conv
like BN does (`W' = W·s`, `b' = s·b + B`), whatever class wrote it: the graph decides, not a
list of classes. S and B must broadcast one value per output channel, which is checked on
their actual values (they depend on no input, so evaluating them is exact and cheap).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn as nn

__all__ = ["Affine", "match_affine", "constant_value"]

_MULS = (operator.mul, torch.mul)
_ADDS = (operator.add, torch.add)
_SUBS = (operator.sub, torch.sub)
# Ops that are pure functions of their inputs: what a scale or shift may be computed with.
_PURE_METHODS = {"reshape", "view", "rsqrt", "sqrt", "add", "sub", "mul", "div", "pow",
                 "reciprocal", "neg", "unsqueeze", "squeeze", "flatten", "expand", "to",
                 "float", "double", "half", "type_as", "contiguous", "detach", "clone"}
_PURE_FUNCTIONS = (operator.mul, operator.add, operator.sub, operator.truediv, operator.neg,
                   operator.pow, torch.mul, torch.add, torch.sub, torch.div, torch.rsqrt,
                   torch.sqrt, torch.reciprocal, torch.reshape, torch.unsqueeze, torch.squeeze,
                   torch.flatten, torch.neg)


@dataclass
class Affine:
    """`out = conv_out * scale + shift` (or `− shift`): the epilogue as the graph spells it."""

    conv_out: torch.fx.Node     # the conv (or linear) output
    mul: torch.fx.Node          # conv_out * scale
    out: torch.fx.Node          # the add (or sub): the epilogue's result
    scale: torch.fx.Node        # computed from parameters and buffers only
    shift: torch.fx.Node
    subtract: bool              # out = mul − shift


def _pure(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _PURE_METHODS
    return node.op == "call_function" and node.target in _PURE_FUNCTIONS


def _constant(node: Any, seen: dict) -> bool:
    """Whether `node` depends on parameters, buffers and literals only (no input, no module
    call, no impure op)."""
    if not isinstance(node, torch.fx.Node):
        return True
    if node in seen:
        return seen[node]
    if node.op == "get_attr":
        seen[node] = True
    elif _pure(node):
        seen[node] = all(_constant(a, seen) for a in node.all_input_nodes)
    else:
        seen[node] = False
    return seen[node]


def constant_value(node: Any, root: nn.Module | None, dtype: torch.dtype | None = None):
    """Evaluate a node that depends on parameters and buffers only (their current values;
    in `dtype` when given, for a fold computed in float64)."""
    def value(n):
        if not isinstance(n, torch.fx.Node):
            return n
        if n.op == "get_attr":
            t = root if root is not None else n.graph.owning_module
            for part in n.target.split("."):
                t = getattr(t, part)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t
        args = torch.fx.node.map_arg(n.args, value)
        kwargs = torch.fx.node.map_arg(n.kwargs, value)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return n.target(*args, **kwargs)

    with torch.no_grad():
        return value(node)


def _per_channel(shape: torch.Size, channels: int, rank: int) -> bool:
    """A shape that broadcasts one value per channel of a (N, C, ...) output of `rank`."""
    dims = list(shape)
    if len(dims) == rank:
        dims = dims[1:] if dims[0] == 1 else [0]
    if len(dims) != rank - 1 or dims[0] != channels:
        return False
    return all(d == 1 for d in dims[1:])


def _operands(node: torch.fx.Node) -> tuple[Any, Any] | None:
    if node.op == "call_function" and len(node.args) == 2 and not node.kwargs:
        return node.args
    if node.op == "call_method" and len(node.args) == 2 and not node.kwargs:
        return node.args
    return None


def match_affine(out: torch.fx.Node, root: nn.Module | None) -> Affine | None:
    """The affine epilogue whose result `out` is, or None.

    `out` is `add(mul(conv_out, S), B)` (either operand order, or `sub(mul, B)`) with S and B
    computed from parameters and buffers only; the channel check is the caller's, once the
    conv is known (`per_channel`).
    """
    is_add = (out.op == "call_function" and out.target in _ADDS) or (
        out.op == "call_method" and out.target == "add")
    is_sub = (out.op == "call_function" and out.target in _SUBS) or (
        out.op == "call_method" and out.target == "sub")
    operands = _operands(out) if is_add or is_sub else None
    if operands is None:
        return None
    seen: dict = {}
    for mul, shift in ((operands[0], operands[1]), (operands[1], operands[0])):
        if is_sub and mul is not operands[0]:
            continue  # B − conv·S is not conv·S + B
        if not isinstance(mul, torch.fx.Node) or not isinstance(shift, torch.fx.Node):
            continue
        is_mul = (mul.op == "call_function" and mul.target in _MULS) or (
            mul.op == "call_method" and mul.target == "mul")
        pair = _operands(mul) if is_mul else None
        if pair is None or not _constant(shift, seen):
            continue
        for conv_out, scale in ((pair[0], pair[1]), (pair[1], pair[0])):
            if isinstance(conv_out, torch.fx.Node) and isinstance(scale, torch.fx.Node) \
                    and not _constant(conv_out, seen) and _constant(scale, seen):
                return Affine(conv_out, mul, out, scale, shift, is_sub)
    return None


def per_channel(affine: Affine, channels: int, rank: int, root: nn.Module | None) -> bool:
    """Whether S and B broadcast one value per output channel of a rank-`rank` conv output."""
    try:
        scale = constant_value(affine.scale, root)
        shift = constant_value(affine.shift, root)
    except Exception:  # not evaluable here (a fake or missing attribute): do not fold
        return False
    return all(isinstance(t, torch.Tensor) and _per_channel(t.shape, channels, rank)
               for t in (scale, shift))
