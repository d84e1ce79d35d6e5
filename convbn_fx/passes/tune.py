"""TUNE: BN folded into the conv weight on every call (You et al., arXiv 2305.11624, eq. 4).

`s = γ·rsqrt(var+ε)`, `b' = β + s·(b − μ)`, `y = conv(x, W·s, b')`. Gradients reach W, b, γ and
β exactly as in Eval, but the conv output is no longer kept for BN's backward and BN's
elementwise pass is gone. The whole block is one kernel call (kernels/blocks.py), which folds
where that is what the block computes (a batched input) and otherwise runs it unfolded. A
block `auto` lowered (`block.per_call`) also names itself to the kernel, which then folds
only where Tune pays for the call's sizes and runs Eval otherwise (kernels/choice.py).
"""

import torch.fx

from ..kernels.blocks import conv_affine_tune, conv_bn_tune, linear_bn_tune
from ..vocabulary.blocks import Block
from ..vocabulary.modes import Mode
from .emit import block_call
from .registry import register_lowering

__all__ = ["lower_tune"]


@register_lowering(Mode.TUNE)
def lower_tune(graph: torch.fx.Graph, block: Block) -> torch.fx.Node:
    choose = {"choose": block.bn} if block.per_call else {}
    if block.norm == "affine":
        return block_call(graph, block, conv_affine_tune, "tune", **choose)
    kernel = linear_bn_tune if block.op == "linear" else conv_bn_tune
    return block_call(graph, block, kernel, "tune", **choose)
