"""`deploy_mode`: the classic Deploy export, BN folded into new conv parameters and removed.

`tune_mode` keeps BN's tensors and folds on every call (or caches the fold) so the model stays
trainable and its state_dict unchanged. An exported inference model wants the opposite: one
plain conv per block, with `W' = W·s` and `b' = β + s·(b − μ)` stored as its own parameters and
no BN left (You et al., arXiv 2305.11624, eq. 4). The fold is computed in float64 and rounded
once, so the exported weights are as close to exact as their dtype allows.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx
import torch.nn as nn

from .api import _check_module
from .blocks import Block
from .errors import TraceError
from .folding import scale_weight
from .kinds import is_frozen_bn
from .matching import find_blocks
from .parts import Untraceable, one_line, rewrite_parts
from .tracing import trace
from .tuned import TunedGraphModule

__all__ = ["deploy_mode"]

log = logging.getLogger(__name__)


def _folded_conv(conv: nn.Module, bn: nn.Module, transposed: bool) -> nn.Module:
    """A copy of `conv` whose fresh weight and bias compute `bn(conv(x))` with frozen BN."""
    w = conv.weight.detach().double()
    var = bn.running_var.detach().double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.detach().double() * scale
    shift = -bn.running_mean.detach().double()
    if conv.bias is not None:
        shift = shift + conv.bias.detach().double()
    shift = scale * shift
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    weight = scale_weight(w, scale, transposed, conv.groups).to(conv.weight.dtype)
    new = copy.deepcopy(conv)
    trainable = conv.weight.requires_grad
    new.weight = nn.Parameter(weight, requires_grad=trainable)
    new.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=trainable)
    return new


def _unique_name(gm: torch.fx.GraphModule, base: str) -> str:
    taken = dict(gm.named_modules())
    name, i = f"{base}_folded", 1
    while name in taken:
        name, i = f"{base}_folded{i}", i + 1
    return name


def _skip_reason(block: Block, bn: nn.Module) -> str | None:
    if block.reason is not None:
        return block.reason
    if block.conv_node.op != "call_module":
        return ("the conv was traced through (its class overrides forward), so there is no "
                "conv module to replace: use tune_mode with frozen BN (Deploy) instead")
    if getattr(block, "op", "conv") != "conv":
        return ("Linear→BatchNorm1d folds only for 2-D input, which a graph cannot check; "
                "tune_mode folds it per call")
    if not is_frozen_bn(bn) and bn.training:
        return "BN is in training mode (call .eval() on it to fold it)"
    return None


def _fold_graph(gm: torch.fx.GraphModule, prefix: str = "") -> torch.fx.GraphModule:
    """Fold every frozen conv→BN block of `gm` in place and drop the BN calls."""
    graph = gm.graph
    blocks = find_blocks(graph, gm)
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    folded = 0
    for block in blocks:
        bn = gm.get_submodule(block.bn)
        reason = _skip_reason(block, bn)
        if reason is not None:
            level = logging.WARNING if "training mode" in reason else logging.INFO
            log.log(level, "deploy_mode leaves %s%s -> %s%s as is: %s",
                    prefix, block.conv, prefix, block.bn, reason)
            continue
        new = _folded_conv(gm.get_submodule(block.conv), bn, block.config.transposed)
        if calls.count(block.conv) == 1:
            target = block.conv  # its only call: the folded conv takes its place
        else:
            target = _unique_name(gm, block.conv)  # a shared conv keeps serving other calls
        gm.add_submodule(target, new)
        block.conv_node.target = target
        out = block.conv_node
        with graph.inserting_before(block.bn_node):
            for name in block.epilogue:  # a frozen norm's drop and act still run
                out = graph.call_module(name, (out,))
        block.bn_node.replace_all_uses_with(out)
        inputs = block.bn_node.all_input_nodes
        graph.erase_node(block.bn_node)
        for node in inputs:  # a traced-through BN's tensors
            if node.op == "get_attr" and not node.users:
                graph.erase_node(node)
        folded += 1
    if folded:
        graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    log.info("deploy_mode folded %d of %d blocks in %s%s", folded, len(blocks),
             prefix, type(gm).__name__)
    return gm


def _graph_module(module: nn.Module) -> torch.fx.GraphModule:
    """A plain GraphModule of `module` with conv and BN as calls (raises if it won't trace)."""
    if isinstance(module, TunedGraphModule):
        module.set_mode(lambda info: None)  # its graph becomes the un-lowered template
    if isinstance(module, torch.fx.GraphModule):
        return torch.fx.GraphModule(module, module.graph, type(module).__name__)
    return trace(module)


def deploy_mode(model: nn.Module) -> nn.Module:
    """Fold every frozen conv→BN block into a new conv and remove the BN: for inference/export.

    Each block whose BN is frozen (BN in eval mode, or FrozenBatchNorm2d) becomes one conv whose
    new parameters `W·s` and `β + s·(b − μ)` (a bias is added if the conv had none) reproduce
    the block's eval output. Blocks whose BN is in training mode are left as they are and
    logged. The result is meant for inference and export, not for training: training through
    folded weights is unstable (You et al., arXiv 2305.11624, section 3); fine-tune with
    `tune_mode` instead, which keeps W, γ and β as the trained parameters.

    Args:
        model: an nn.Module, a GraphModule, or a `tune_mode` result. It is deep-copied first
            and never modified. A model that does not trace whole is folded in its largest
            traceable submodules.
    Returns:
        A GraphModule when the whole model traces, else a copy of the model whose traceable
        parts are GraphModules. Its state_dict has no BN entries for the folded blocks.
    Raises:
        TraceError: neither the model nor any submodule holding a conv could be traced.
    """
    _check_module(model, "deploy_mode")
    model = copy.deepcopy(model)
    try:
        gm = _graph_module(model)
    except Exception as exc:  # torch.fx raises many kinds; any means "not traceable"
        errors, parts = [f"{type(model).__name__}: {one_line(exc)}"], []

        def fold(child: nn.Module, path: str) -> nn.Module:
            try:
                part = _graph_module(child)
            except Exception as exc:  # any torch.fx failure: descend into the child
                raise Untraceable(one_line(exc)) from exc
            parts.append(path)
            return _fold_graph(part, f"{path}.")

        rewrite_parts(model, fold, inplace=True, errors=errors)
        if not parts:
            raise TraceError(
                f"deploy_mode could not trace {type(model).__name__} or any submodule holding "
                f"a conv with torch.fx ({errors[0]}); make its forward traceable or pass the "
                "submodule to fold.") from None
        log.info("deploy_mode traced %s in parts: %s", type(model).__name__, "; ".join(errors))
        return model
    return _fold_graph(gm)
