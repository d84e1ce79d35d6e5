"""DEPLOY: one conv with BN folded into constant weights, folded once and reused.

Right only when no gradient must reach the block's parameters (inference, a frozen backbone,
attacks on a frozen model): `frozen_fold` computes `(W·s, b')` without autograd and caches it
until an input tensor changes (an optimizer step, `load_state_dict`, `copy_`), so it is never
stale. Training through constant folded weights is what the paper shows to be unstable.
"""

import operator

import torch.fx

from ..kernels.frozen import frozen_fold
from ..kernels.linear import linear_bn_deploy
from ..vocabulary.blocks import Block
from ..vocabulary.modes import Mode
from .emit import call, conv_input, emit_conv, linear_bn_call, source, stem, tensors
from .registry import register_lowering

__all__ = ["lower_deploy"]


@register_lowering(Mode.DEPLOY)
def lower_deploy(graph: torch.fx.Graph, block: Block) -> torch.fx.Node:
    watch = source(graph, block.tensors.get("num_batches_tracked"))
    extra = {} if watch is None else {"watch": watch}
    if any(isinstance(src, torch.fx.Node) for src in block.tensors.values()):
        extra["cache"] = False  # computed per call (e.g. a standardised weight): fold per call
    if block.op == "linear":  # folds per call, only for rank-2 input (see kernels/linear.py)
        return linear_bn_call(graph, block, linear_bn_deploy, "deploy", **extra)
    name, cfg = stem(block), block.config
    t = tensors(graph, block)
    folded = call(graph, frozen_fold,
                  (t["weight"], t["bias"], t["running_mean"], t["running_var"], t["bn_weight"],
                   t["bn_bias"]),
                  {"eps": block.eps, "transposed": cfg.transposed, "groups": cfg.groups, **extra},
                  name=f"{name}_folded")
    weight = call(graph, operator.getitem, (folded, 0), name=f"{name}_folded_weight")
    bias = call(graph, operator.getitem, (folded, 1), name=f"{name}_folded_bias")
    return emit_conv(graph, block, conv_input(graph, block), weight, bias, f"{name}_deploy")
