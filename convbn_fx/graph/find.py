"""Find every conv→BN block of a graph, whatever flavour it is and however the modules look.

All blocks are found first and rewritten afterwards, one per BN call fed directly by a conv
(or linear) call. A block that is not provably safe to fold is still returned, with the
one-line reason of the first guard that failed (guards.py), so `describe()` can say why it
was skipped. A Linear followed by BatchNorm1d is a block too (`op="linear"`), also through a
flatten of its output (LeViT's `bn(linear(x).flatten(0, 1))`); whether the input has the rank
that makes folding right is only known per call (kernels/blocks.py).
"""

from __future__ import annotations

import torch.fx
import torch.nn as nn

from ..kernels.checks import INPUT_CHECKS, check_input
from ..vocabulary.blocks import Block
from ..vocabulary.kinds import is_frozen_bn
from .ends import End, affine_end, as_source, conv_end, norm_end
from .guards import skip_reason
from .normalize import match_flatten

__all__ = ["find_blocks"]


def find_blocks(graph: torch.fx.Graph, root: nn.Module | None = None) -> list[Block]:
    """Every conv→BN block in `graph`, in graph order.

    Args:
        graph: a module graph (from convbn_fx's tracer: stock convs and BNs are
            `call_module` nodes, subclasses that were traced through left functional calls),
            or a functional or aten graph (torch.compile, torch.export) when `root` is None.
        root: the module owning a module graph's call_module and get_attr targets.
    Returns:
        One `Block` per BN fed directly by a conv or linear; its tensors are qualified names
        (module graphs) or graph nodes. Unfoldable blocks carry a one-line `reason`.
    """
    modules = dict(root.named_modules()) if root is not None else {}
    blocks = []
    for node in list(graph.nodes):
        norm = norm_end(node, modules) or affine_end(node, modules, root)
        if norm is None or not isinstance(norm.input, torch.fx.Node):
            continue
        conv = conv_end(norm.input, modules)
        if conv is None and norm.affine is None:
            conv = _flattened_linear(norm, modules)
        if conv is None:
            continue
        block = Block(conv=conv.name, bn=norm.name, kind=f"{conv.kind}+{norm.kind}",
                      conv_node=conv.node, bn_node=norm.node, training=norm.training,
                      inner=((norm.call,) if norm.call is not norm.node else ())
                      + ((norm.view,) if norm.view is not None else ()))
        block.reason = skip_reason(conv, norm, root)
        if block.reason is None:
            block.input, block.config, block.eps = conv.input, conv.config, norm.eps
            block.epilogue = norm.epilogue
            if conv.linear:
                block.op, block.view, block.flatten = "linear", norm.view, norm.flatten
            block.tensors = {**conv.tensors, **norm.tensors}
            block.checks, block.check_nodes = _input_checks(conv, norm)
            if norm.affine is not None:
                block.norm, block.negate_shift = "affine", norm.affine.subtract
        blocks.append(block)
    return blocks


def _flattened_linear(norm: End, modules: dict[str, nn.Module]) -> End | None:
    """The linear end when the norm reads `linear(x).flatten(s, e)`; notes the view on `norm`.

    Folding commutes with merging the leading dims of a Linear's output (each row is one
    sample of the same features); whether the merge leaves (N, F) is checked per call.
    """
    flat = match_flatten(norm.input)
    if flat is None:
        return None
    conv = conv_end(flat[0], modules)
    if conv is None or not conv.linear:
        return None
    norm.view, norm.flatten = norm.input, flat[1]
    return conv


def _input_checks(conv: End, norm: End) -> tuple[tuple, tuple]:
    """The norm's input checks, which the lowered block must still run: a stock BN module's
    own, or the traced calls of a traced-through BN's (`check_input` on the conv output)."""
    if norm.affine is not None:
        return (), ()
    if norm.node.op == "call_module":
        if is_frozen_bn(norm.module):
            return (), ()
        return tuple((norm.name, name) for name in INPUT_CHECKS
                     if hasattr(norm.module, name)), ()
    traced = tuple(u for u in conv.node.users
                   if u.op == "call_function" and u.target is check_input)
    return tuple((as_source(u.args[0]), u.args[1]) for u in traced), traced
