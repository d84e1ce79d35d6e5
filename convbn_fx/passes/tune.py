"""TUNE: BN folded into the conv weight on every call (You et al., arXiv 2305.11624, eq. 4).

`s = γ·rsqrt(var+ε)`, `b' = β + s·(b − μ)`, `y = conv(x, W·s, b')`. Gradients reach W, b, γ and
β exactly as in Eval, but the conv output is no longer kept for BN's backward and BN's
elementwise pass is gone. `conv_scaled` recomputes `W·s` in backward rather than keeping it,
so a training step saves about what Deploy saves. A Linear→BatchNorm1d block folds the same
way through `linear_bn_tune`, which checks per call that the input has rank 2.
"""

import torch.fx

from ..kernels.conv import conv_scaled
from ..kernels.linear import linear_bn_tune
from ..vocabulary.blocks import Block
from ..vocabulary.modes import Mode
from .emit import call, conv_args, conv_input, linear_bn_call, scale_and_bias, stem, tensors
from .registry import register_lowering

__all__ = ["lower_tune"]


@register_lowering(Mode.TUNE)
def lower_tune(graph: torch.fx.Graph, block: Block) -> torch.fx.Node:
    if block.op == "linear":
        return linear_bn_call(graph, block, linear_bn_tune, "tune")
    t = tensors(graph, block)
    scale, bias = scale_and_bias(graph, block, t)
    return call(graph, conv_scaled, (conv_input(graph, block), t["weight"], scale, bias),
                conv_args(block), name=f"{stem(block)}_tune")
