"""EVAL: conv, then BN with running statistics, spelled out as `F.batch_norm`.

The reference the other frozen-BN lowerings are measured against: it keeps the conv output
for BN's backward and runs BN's elementwise pass, which Tune and Deploy remove. Never chosen
by `auto`; ask for it with `mode="eval"`.
"""

import torch.fx
import torch.nn.functional as F

from ..vocabulary.blocks import Block
from ..vocabulary.modes import Mode
from .emit import call, stem, tensors
from .registry import register_lowering

__all__ = ["lower_eval"]


@register_lowering(Mode.EVAL)
def lower_eval(graph: torch.fx.Graph, block: Block) -> torch.fx.Node:
    t = tensors(graph, block)
    return call(graph, F.batch_norm,
                (block.conv_node, t["running_mean"], t["running_var"], t["bn_weight"],
                 t["bn_bias"], False, 0.0, block.eps),
                name=f"{stem(block)}_eval")
