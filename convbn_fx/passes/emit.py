"""Graph-building steps the lowerings share: reading a block's tensors and padding its input.

Node names are derived from the BN's name (`layer1_0_bn1_scale`), so the rewritten
`GraphModule.code` reads like hand-written torch code. The fold arithmetic is not written
here a second time: `kernels.fold.scale_and_shift` is run on torch.fx Proxies, which records
its ops into the graph.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F

from ..kernels.conv import conv_function
from ..kernels.fold import scale_and_shift
from ..vocabulary.blocks import TENSORS, Block

__all__ = ["call", "tensors", "source", "conv_input", "scale_and_bias", "conv_args",
           "emit_conv", "linear_bn_call", "stem"]


def stem(block: Block) -> str:
    """The prefix of every node a lowering adds for `block`: its BN's name."""
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
                name=f"{stem(block)}_padded")


# Names of the fold's intermediate values in the generated code (others keep the op's name).
_LABELS = {torch.rsqrt: "inv_std", operator.neg: "centred", operator.sub: "centred"}


class _Recorder(torch.fx.proxy.GraphAppendingTracer):
    """Appends what Proxies compute to a graph, naming each node after the block's BN."""

    def __init__(self, graph: torch.fx.Graph, prefix: str):
        super().__init__(graph)
        self.prefix = prefix

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        label = _LABELS.get(target, getattr(target, "__name__", "op"))
        return super().create_node(kind, target, args, kwargs, f"{self.prefix}_{label}",
                                   type_expr)


def scale_and_bias(graph: torch.fx.Graph, block: Block, t: dict[str, Any]):
    """Record `s = γ·rsqrt(var+ε)` and `b' = β + s·(b − μ)` (You et al. 2023, eq. 4).

    Returns the two nodes; they are named `<bn>_scale` and `<bn>_shift`.
    """
    recorder = _Recorder(graph, stem(block))
    p = {k: None if v is None else torch.fx.Proxy(v, recorder) for k, v in t.items()}
    scale, shift = scale_and_shift(p["bias"], p["running_mean"], p["running_var"],
                                   p["bn_weight"], p["bn_bias"], block.eps)
    for proxy, what in ((scale, "scale"), (shift, "shift")):
        proxy.node._rename(f"{stem(block)}_{what}")
    return scale.node, shift.node


def conv_args(block: Block) -> dict[str, Any]:
    """The block's conv configuration as keyword arguments of `conv_scaled`."""
    cfg = block.config
    return {"stride": list(cfg.stride), "padding": list(cfg.padding),
            "dilation": list(cfg.dilation), "transposed": cfg.transposed,
            "output_padding": list(cfg.output_padding), "groups": cfg.groups}


def emit_conv(graph: torch.fx.Graph, block: Block, x, weight, bias,
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
    """One call of `fn` (kernels.linear.linear_bn_tune / _deploy) for a Linear→BN block.

    The fold is decided inside `fn`, per call, from the input's rank (see kernels/linear.py),
    so the block's tensors are passed as they are rather than as graph-level scale and shift.
    """
    t = tensors(graph, block)
    return call(graph, fn,
                (block.input, t["weight"], t["bias"], t["running_mean"], t["running_var"],
                 t["bn_weight"], t["bn_bias"]),
                {"eps": block.eps, "bn_ranks": block.bn_ranks, **extra},
                name=f"{stem(block)}_{suffix}")
