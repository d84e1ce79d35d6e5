"""DEPLOY: one conv with BN folded into constant weights, folded once and reused.

Right only when no gradient must reach the block's parameters (inference, a frozen backbone,
attacks on a frozen model): `frozen_fold` computes `(W·s, b')` without autograd and caches it
until an input tensor changes (an optimizer step, `load_state_dict`, `copy_`), so it is never
stale. Training through constant folded weights is what the paper shows to be unstable.
"""

import torch.fx

from ..kernels.blocks import conv_affine_deploy, conv_bn_deploy, linear_bn_deploy
from ..vocabulary.blocks import Block
from ..vocabulary.modes import Mode
from .emit import block_call, source
from .registry import register_lowering

__all__ = ["lower_deploy"]


@register_lowering(Mode.DEPLOY)
def lower_deploy(graph: torch.fx.Graph, block: Block) -> torch.fx.Node:
    if block.norm == "affine":  # S and B are computed per call: so is the fold
        return block_call(graph, block, conv_affine_deploy, "deploy")
    extra = {}
    watch = source(graph, block.tensors.get("num_batches_tracked"))
    if watch is not None:
        extra["watch"] = watch
    if any(isinstance(src, torch.fx.Node) for src in block.tensors.values()):
        extra["cache"] = False  # computed per call (e.g. a standardised weight): fold per call
    kernel = linear_bn_deploy if block.op == "linear" else conv_bn_deploy
    return block_call(graph, block, kernel, "deploy", **extra)
