"""`deploy_mode`: the classic Deploy export, BN folded into new conv parameters and removed.

`tune_mode` keeps BN's tensors and folds on every call (or caches the fold) so the model stays
trainable and its state_dict unchanged. An inference model wants the opposite: one plain conv
per block, with `W' = W·s` and `b' = β + s·(b − μ)` stored as its own parameters and no BN
left (You et al., arXiv 2305.11624, eq. 4). It is the same graph pass as `tune_mode`'s, with
one lowering of its own (a new conv module in place of the pair). The fold is computed in
float64 and rounded once, so the new weights are as close to exact as their dtype allows.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
import torch.fx
import torch.nn as nn

from ..graph.affine import constant_value
from ..graph.choose import module_state
from ..graph.tune_graph import tune_graph
from ..kernels.fold import scale_and_shift, scale_weight
from ..model.parts import Untraceable, is_rewritten, rewrite_parts
from ..model.tracer import trace
from ..model.tuned import TunedGraphModule
from ..vocabulary.blocks import Block
from ..vocabulary.errors import TraceError, exception_summary
from ..vocabulary.modes import Mode
from .tune import check_module

__all__ = ["deploy_mode"]

log = logging.getLogger(__name__)

_TRAINING = "BN is in training mode (call .eval() on it to fold it)"


def _folded_conv(conv: nn.Module, scale: torch.Tensor, shift: torch.Tensor,
                 transposed: bool) -> nn.Module:
    """A copy of `conv` whose fresh weight and bias compute `conv(x)·s + shift` (float64
    values, rounded once to the conv's dtype)."""
    weight = scale_weight(conv.weight.detach().double(), scale, transposed, conv.groups)
    bias = shift if conv.bias is None else shift + scale * conv.bias.detach().double()
    new = copy.deepcopy(conv)
    trainable = conv.weight.requires_grad
    new.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=trainable)
    new.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=trainable)
    return new


def _scale_and_shift(gm: torch.fx.GraphModule, block: Block) -> tuple[torch.Tensor, ...]:
    """The block's per-channel scale and shift, in float64, from its current tensors."""
    if block.norm == "affine":
        scale = constant_value(block.tensors["scale"], gm, torch.float64).reshape(-1)
        shift = constant_value(block.tensors["shift"], gm, torch.float64).reshape(-1)
        return scale, -shift if block.negate_shift else shift
    bn = gm.get_submodule(block.bn)
    stats = [None if t is None else t.detach().double() for t in (
        bn.running_mean, bn.running_var, bn.weight, bn.bias)]
    return scale_and_shift(None, *stats, block.eps)


def _unique_name(gm: torch.fx.GraphModule, base: str) -> str:
    taken = dict(gm.named_modules())
    name, i = f"{base}_folded", 1
    while name in taken:
        name, i = f"{base}_folded{i}", i + 1
    return name


def _conv_module(block: Block) -> str | None:
    if block.conv_node.op != "call_module":
        return ("the conv was traced through (its class overrides forward), so there is no "
                "conv module to replace: use tune_mode with frozen BN (Deploy) instead")
    return None


def _conv_not_linear(block: Block) -> str | None:
    if block.op != "conv":
        return ("Linear→BatchNorm1d folds only for 2-D input, which a graph cannot check; "
                "tune_mode folds it per call")
    return None


def _new_conv_lowering(gm: torch.fx.GraphModule):
    """The lowering that calls a new folded conv module instead of the conv→BN pair."""
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]

    def lower(graph: torch.fx.Graph, block: Block) -> torch.fx.Node:
        new = _folded_conv(gm.get_submodule(block.conv), *_scale_and_shift(gm, block),
                           block.config.transposed)
        if calls.count(block.conv) == 1:
            target = block.conv  # its only call: the folded conv takes its place
        else:
            target = _unique_name(gm, block.conv)  # a shared conv keeps serving other calls
        gm.add_submodule(target, new)
        return graph.call_module(target, (block.input,))

    return lower


def _fold_graph(gm: torch.fx.GraphModule, prefix: str = "") -> torch.fx.GraphModule:
    """Fold every frozen conv→BN block of `gm` in place and drop the BN calls."""
    frozen = module_state(gm)

    def state(block):  # the new conv's parameters train as the old did: no gradient is lost
        return dataclasses.replace(frozen(block), requires_grad=False)

    result = tune_graph(gm, "auto", gm, state=state, guards=(_conv_module, _conv_not_linear),
                        lowerings={Mode.DEPLOY: _new_conv_lowering(gm)})
    for block, mode in zip(result.blocks, result.lowerings):
        reason = block.reason or (_TRAINING if mode is Mode.TRAIN else None)
        if reason is not None:
            log.log(logging.WARNING if reason is _TRAINING else logging.INFO,
                    "deploy_mode leaves %s%s -> %s%s as is: %s",
                    prefix, block.conv, prefix, block.bn, reason)
    if result.modified:
        gm.graph.eliminate_dead_code()  # an affine epilogue's scale and shift arithmetic
        gm.recompile()
        gm.delete_all_unused_submodules()
    folded = sum(m is Mode.DEPLOY for m in result.lowerings)
    log.info("deploy_mode folded %d of %d blocks in %s%s", folded, len(result.blocks),
             prefix, type(gm).__name__)
    return gm


def _graph_module(module: nn.Module) -> torch.fx.GraphModule:
    """A plain GraphModule of `module` with conv and BN as calls (raises if it won't trace)."""
    if isinstance(module, TunedGraphModule):
        module.set_mode(lambda info: None)  # its graph becomes the un-lowered template
    if isinstance(module, torch.fx.GraphModule):
        return torch.fx.GraphModule(module, module.graph, type(module).__name__)
    return trace(module, keep=is_rewritten)


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
    check_module(model, "deploy_mode")
    model = copy.deepcopy(model)
    try:
        gm = _graph_module(model)
    except Exception as exc:  # torch.fx raises many kinds; any means "not traceable"
        errors, parts = [f"{type(model).__name__}: {exception_summary(exc)}"], []

        def fold_part(child: nn.Module, path: str) -> nn.Module:
            try:
                part = _graph_module(child)
            except Exception as exc:  # any torch.fx failure: descend into the child
                raise Untraceable(exception_summary(exc)) from exc
            parts.append(path)
            return _fold_graph(part, f"{path}.")

        rewrite_parts(model, fold_part, inplace=True, errors=errors)
        if not parts:
            raise TraceError(
                f"deploy_mode could not trace {type(model).__name__} or any submodule holding "
                f"a conv with torch.fx ({errors[0]}); make its forward traceable or pass the "
                "submodule to fold.") from None
        log.info("deploy_mode traced %s in parts: %s", type(model).__name__, "; ".join(errors))
        return model
    return _fold_graph(gm)
