"""EVAL: conv, then BN with running statistics, spelled out as `F.batch_norm`.

The reference the other frozen-BN lowerings are measured against: it keeps the conv output
for BN's backward and runs BN's elementwise pass, which Tune and Deploy remove. Never chosen
by `auto`; ask for it with `mode="eval"`. The norm's own input checks still run first.
"""

import torch.fx
import torch.nn.functional as F

from ..vocabulary.blocks import Block
from ..vocabulary.modes import Mode
from .emit import apply_epilogue, call, emit_checks, stem, tensors
from .registry import register_lowering

__all__ = ["lower_eval"]


@register_lowering(Mode.EVAL)
def lower_eval(graph: torch.fx.Graph, block: Block) -> torch.fx.Node:
    if block.norm == "affine":  # the epilogue as traced is its own reference
        return block.bn_node
    t = tensors(graph, block)
    value = block.view if block.view is not None else block.conv_node  # what the norm read
    emit_checks(graph, block, value)
    out = call(graph, F.batch_norm,
               (value, t["running_mean"], t["running_var"], t["bn_weight"],
                t["bn_bias"], False, 0.0, block.eps), name=f"{stem(block)}_eval")
    return apply_epilogue(graph, block, out)
