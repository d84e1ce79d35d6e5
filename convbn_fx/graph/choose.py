"""Choose each block's lowering: the `auto` rule, a forced mode, or the user's policy.

After You et al. (arXiv 2305.11624), section 3: BN that normalises with batch statistics must
stay TRAIN; frozen BN folds, TUNE while any conv/BN parameter trains and DEPLOY (constant
folded weights, computed once) when none does. EVAL is never picked: it is the reference.

A block's state comes from its modules in a module graph (`bn.training`, which parameters
require grad), read afresh on every relowering. A compiled or exported graph has no module
state to consult on every call: its BN calls carry their own `training` flag, and whether
parameters train is unknown, so `auto` picks TUNE (right either way: it recomputes the fold
from the current tensors on every call) and DEPLOY, whose cache a compiled graph could not
keep up to date, is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from ..vocabulary.blocks import Block, BlockInfo
from ..vocabulary.errors import BATCH_STATISTICS, TRAINABLE, ModeError
from ..vocabulary.kinds import is_frozen_bn
from ..vocabulary.modes import Mode

__all__ = ["BlockState", "StateOf", "auto_mode", "uses_batch_stats", "module_state", "graph_state",
           "choose_mode"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockState:
    """What the choice of a block's lowering depends on."""

    uses_batch_stats: bool          # BN normalises with the batch's statistics
    requires_grad: bool | None      # a conv/BN parameter trains; None: not known (compiled)


StateOf = Callable[[Block], BlockState]


def auto_mode(state: BlockState) -> Mode:
    """The `auto` rule (module docstring)."""
    if state.uses_batch_stats:
        return Mode.TRAIN
    return Mode.DEPLOY if state.requires_grad is False else Mode.TUNE


def uses_batch_stats(bn: nn.Module) -> bool:
    return not is_frozen_bn(bn) and (bn.training or bn.running_mean is None)


def module_state(root: nn.Module) -> StateOf:
    """A block's state read from its conv and BN modules under `root`, now."""
    def state(block: Block) -> BlockState:
        conv, bn = root.get_submodule(block.conv), root.get_submodule(block.bn)
        # An affine epilogue has no batch statistics; its owner's parameters may train.
        batch = block.norm == "batch" and uses_batch_stats(bn)
        return BlockState(batch, any(
            p.requires_grad for m in (conv, bn) for p in m._parameters.values() if p is not None))

    return state


def graph_state(block: Block) -> BlockState:
    """A block's state as a compiled or exported graph states it: its BN call's flag."""
    return BlockState(bool(block.training), None)


def _policy_mode(block: Block, policy: Callable, auto: Mode, prefix: str) -> Mode | None:
    pre = f"{prefix}." if prefix else ""
    wanted = policy(BlockInfo(pre + block.conv, pre + block.bn, block.kind, auto, None))
    if wanted is None:
        return None
    try:
        return Mode(wanted)
    except ValueError:
        raise ModeError(f"the mode policy returned {wanted!r} for block {block.bn}; it must "
                        "return a convbn_fx.Mode or None.") from None


def choose_mode(block: Block, state: BlockState, rule, *, prefix: str = "",
                strict: bool = False) -> Mode | None:
    """The lowering for one block, or None to leave it as it is.

    Args:
        block: a block from `find_blocks`; unfoldable blocks get None.
        state: its current state.
        rule: "auto", a Mode to force, or a policy `(BlockInfo) -> Mode | None` (normalised
            by `vocabulary.modes.normalize_mode`).
        prefix: where the graph sits in the model, for the names a policy sees.
        strict: raise ModeError when a forced mode does not fit the state; otherwise log a
            warning and use `auto`'s choice (a state change after the rewrite).
    """
    if not block.foldable:
        return None
    auto = auto_mode(state)
    if rule == "auto":
        return auto
    wanted = rule if isinstance(rule, Mode) else _policy_mode(block, rule, auto, prefix)
    if wanted is None:
        return None
    if wanted is Mode.DEPLOY and state.requires_grad is None:
        raise ModeError("DEPLOY caches folded weights across calls, which a compiled or exported "
                        "graph cannot keep up to date; use mode='tune' (folded on every call).")
    problem = conflict = None
    if state.uses_batch_stats and wanted is not Mode.TRAIN:
        conflict = BATCH_STATISTICS
        problem = (f"{wanted} needs running statistics but BN {block.bn} normalises with "
                   f"batch statistics; call .eval() on it first, or use mode='auto'")
    elif wanted is Mode.DEPLOY and state.requires_grad:
        conflict = TRAINABLE
        problem = (f"DEPLOY folds {block.bn} into constant weights, so its trainable "
                   f"parameters would get no gradient; freeze them with requires_grad_(False), "
                   f"or use mode='tune'")
    if problem is None:
        return wanted
    if strict:
        raise ModeError(problem + ".", mode=wanted, conflict=conflict,
                        block=f"{prefix}.{block.bn}" if prefix else block.bn)
    log.warning("%s; using %s for this block instead", problem, auto)
    return auto
