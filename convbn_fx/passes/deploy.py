"""DEPLOY: one conv with BN folded into constant weights, folded once and reused.

Right only when no gradient must reach the block's parameters (inference, a frozen backbone,
attacks on a frozen model): `frozen_fold` computes `(W·s, b')` without autograd and caches it
until an input tensor changes (an optimizer step, `load_state_dict`, `copy_`), so it is never
stale. Training through constant folded weights is what the paper shows to be unstable.
"""

import operator

import torch.fx

from ..blocks import Block
from ..folding import frozen_fold, linear_bn_deploy
from ..modes import Mode
from .emit import call, conv_call, conv_input, linear_bn_call, source, tensors
from .registry import register_lowering

__all__ = ["lower_deploy"]


@register_lowering(Mode.DEPLOY)
def lower_deploy(graph: torch.fx.Graph, block: Block) -> torch.fx.Node:
    watch = source(graph, block.tensors.get("num_batches_tracked"))
    extra = {} if watch is None else {"watch": watch}
    if any(isinstance(src, torch.fx.Node) for src in block.tensors.values()):
        extra["cache"] = False  # computed per call (e.g. a standardised weight): fold per call
    if block.op == "linear":  # folds per call, only for rank-2 input (see folding.py)
        return linear_bn_call(graph, block, linear_bn_deploy, "deploy", **extra)
    stem, cfg = block.bn.replace(".", "_"), block.config
    t = tensors(graph, block)
    folded = call(graph, frozen_fold,
                  (t["weight"], t["bias"], t["running_mean"], t["running_var"], t["bn_weight"],
                   t["bn_bias"]),
                  {"eps": block.eps, "transposed": cfg.transposed, "groups": cfg.groups, **extra},
                  name=f"{stem}_folded")
    weight = call(graph, operator.getitem, (folded, 0), name=f"{stem}_folded_weight")
    bias = call(graph, operator.getitem, (folded, 1), name=f"{stem}_folded_bias")
    return conv_call(graph, block, conv_input(graph, block), weight, bias, f"{stem}_deploy")
