"""DEPLOY: one conv with BN folded into constant weights, folded once and reused.

Right only when no gradient must reach the block's parameters (inference, a frozen backbone,
attacks on a frozen model): `frozen_fold` computes `(W·s, b')` without autograd and caches it
until an input tensor changes (an optimizer step, `load_state_dict`, `copy_`), so it is never
stale. Training through constant folded weights is what the paper shows to be unstable.
"""

import operator

import torch
import torch.fx

from ..blocks import Block
from ..folding import frozen_fold
from ..modes import Mode
from .emit import call, conv_input, tensors
from .registry import register_lowering

__all__ = ["lower_deploy"]


@register_lowering(Mode.DEPLOY)
def lower_deploy(graph: torch.fx.Graph, block: Block) -> torch.fx.Node:
    stem, cfg = block.bn.replace(".", "_"), block.config
    t = tensors(graph, block)
    folded = call(graph, frozen_fold,
                  (t["weight"], t["bias"], t["running_mean"], t["running_var"], t["bn_weight"],
                   t["bn_bias"]),
                  {"eps": block.eps, "transposed": cfg.transposed, "groups": cfg.groups},
                  name=f"{stem}_folded")
    weight = call(graph, operator.getitem, (folded, 0), name=f"{stem}_folded_weight")
    bias = call(graph, operator.getitem, (folded, 1), name=f"{stem}_folded_bias")
    return call(graph, torch.convolution,
                (conv_input(graph, block), weight, bias, list(cfg.stride), list(cfg.padding),
                 list(cfg.dilation), cfg.transposed, list(cfg.output_padding), cfg.groups),
                name=f"{stem}_deploy")
