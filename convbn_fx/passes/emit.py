"""Graph-building steps the lowerings share: reading a block's tensors and padding its input.

Node names are derived from the BN's name (`layer1_0_bn1_scale`), so the rewritten
`GraphModule.code` reads like hand-written torch code.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F

from ..blocks import Block, TENSORS
from ..folding import conv_function

__all__ = ["call", "tensors", "source", "conv_input", "scale_and_bias", "conv_args",
           "conv_call", "linear_bn_call"]


def _stem(block: Block) -> str:
    return block.bn.replace(".", "_")


def call(graph: torch.fx.Graph, fn: Callable, args: tuple, kwargs: dict | None = None,
         name: str | None = None) -> torch.fx.Node:
    return graph.create_node("call_function", fn, args, kwargs or {}, name=name)


def source(graph: torch.fx.Graph, src) -> torch.fx.Node | None:
    """A block tensor's Source as a node: get_attr for a qualified name, else as it is."""
    return graph.get_attr(src) if isinstance(src, str) else src


def tensors(graph: torch.fx.Graph, block: Block) -> dict[str, torch.fx.Node | None]:
    """The block's six tensors as nodes (get_attr for module graphs), None where absent."""
    return {key: source(graph, block.tensors.get(key)) for key in TENSORS}


def conv_input(graph: torch.fx.Graph, block: Block) -> torch.fx.Node:
    """The conv input, explicitly padded first for padding modes and uneven 'same' padding."""
    cfg = block.config
    if cfg.pre_pad is None:
        return block.input
    return call(graph, F.pad, (block.input, list(cfg.pre_pad)), {"mode": cfg.pad_mode},
                name=f"{_stem(block)}_padded")


def scale_and_bias(graph: torch.fx.Graph, block: Block, t: dict[str, Any]):
    """Emit `s = γ·rsqrt(var+ε)` and `b' = β + s·(b − μ)` (You et al. 2023, eq. 4)."""
    stem = _stem(block)
    var_eps = call(graph, operator.add, (t["running_var"], block.eps), name=f"{stem}_var_eps")
    inv_std = call(graph, torch.rsqrt, (var_eps,), name=f"{stem}_inv_std")
    scale = inv_std if t["bn_weight"] is None else call(
        graph, operator.mul, (t["bn_weight"], inv_std), name=f"{stem}_scale")
    centred = (call(graph, operator.neg, (t["running_mean"],)) if t["bias"] is None
               else call(graph, operator.sub, (t["bias"], t["running_mean"])))
    if t["bn_bias"] is None:
        return scale, call(graph, operator.mul, (scale, centred), name=f"{stem}_shift")
    shift = call(graph, operator.mul, (scale, centred), name=f"{stem}_scaled_mean")
    bias = call(graph, operator.add, (t["bn_bias"], shift), name=f"{stem}_shift")
    return scale, bias


def conv_args(block: Block) -> dict[str, Any]:
    """The block's conv configuration as keyword arguments of `conv_scaled`."""
    cfg = block.config
    return {"stride": list(cfg.stride), "padding": list(cfg.padding),
            "dilation": list(cfg.dilation), "transposed": cfg.transposed,
            "output_padding": list(cfg.output_padding), "groups": cfg.groups}


def conv_call(graph: torch.fx.Graph, block: Block, x, weight, bias,
              name: str) -> torch.fx.Node:
    """`F.conv2d(x, weight, bias, ...)` (or the block's rank and direction) with its config."""
    cfg = block.config
    fn = conv_function(len(cfg.stride), cfg.transposed)
    if cfg.transposed:
        args = (x, weight, bias, list(cfg.stride), list(cfg.padding), list(cfg.output_padding),
                cfg.groups, list(cfg.dilation))
    else:
        args = (x, weight, bias, list(cfg.stride), list(cfg.padding), list(cfg.dilation),
                cfg.groups)
    return call(graph, fn, args, name=name)


def linear_bn_call(graph: torch.fx.Graph, block: Block, fn: Callable, suffix: str,
                   **extra) -> torch.fx.Node:
    """One call of `fn` (folding.linear_bn_tune / _deploy) for a Linear→BN block.

    The fold is decided inside `fn`, per call, from the input's rank (see folding.py), so the
    block's tensors are passed as they are rather than as graph-level scale and shift.
    """
    t = tensors(graph, block)
    return call(graph, fn,
                (block.input, t["weight"], t["bias"], t["running_mean"], t["running_var"],
                 t["bn_weight"], t["bn_bias"]),
                {"eps": block.eps, "bn_ranks": block.bn_ranks, **extra},
                name=f"{_stem(block)}_{suffix}")
