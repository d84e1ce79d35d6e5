"""TRAIN: the block runs as written, conv then BN with batch statistics.

Nothing can be folded while BN normalises with the statistics of the batch it is given, so
this lowering leaves the block's nodes untouched.
"""

import torch.fx

from ..vocabulary.blocks import Block
from ..vocabulary.modes import Mode
from .registry import register_lowering

__all__ = ["lower_train"]


@register_lowering(Mode.TRAIN)
def lower_train(graph: torch.fx.Graph, block: Block) -> torch.fx.Node:
    return block.bn_node
