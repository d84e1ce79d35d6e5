"""The user-facing entry points: `tune_mode` rewrites a model, `describe` reports on it.

`tune_mode` hands the model to the model walk (model/walk.py): traced whole where it can be,
else in its largest parts that trace, each rewritten by the graph pass and kept following
its module state. `describe` reads back what each block runs as now.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch.fx
import torch.nn as nn

from ..model.parts import Untraceable, is_rewritten, rewritten_graphs
from ..model.tree import has_blocks_inside
from ..model.walk import Rewriter
from ..vocabulary.blocks import BlockInfo
from ..vocabulary.errors import ConvBNError, TraceError
from ..vocabulary.modes import Mode, ModeArg, normalize_mode

__all__ = ["tune_mode", "describe", "check_module", "NOTHING_FOLDS"]

log = logging.getLogger(__name__)


def check_module(model, fn: str) -> None:
    """One sentence for a caller that passed something other than a module."""
    if not isinstance(model, nn.Module):
        raise ConvBNError(f"{fn} expects a torch.nn.Module, got {type(model).__name__}; "
                          "pass the model itself (or torch.fx.symbolic_trace(model)).")


def tune_mode(model: nn.Module, mode: ModeArg = "auto", *, inplace: bool = False,
              verify: bool = True) -> nn.Module:
    """Rewrite every conv→BN block of `model` for efficient fine-tuning (Tune mode).

    Args:
        model: an nn.Module, or a GraphModule from `torch.fx.symbolic_trace`.
        mode: "auto" (per block, from module state: Train, Tune or Deploy), a `Mode` or its
            value to force one, or a policy `(BlockInfo) -> Mode | None` (None: leave as is).
        inplace: rewrite the given GraphModule's graph, or the submodules of a model that
            only traces in parts, instead of returning a new module. Parameters and buffers
            are shared with the input either way.
        verify: on the first call of each new input signature, check that each traced graph
            computes what its module's forward computes (one extra no-grad forward of each,
            once); a module whose trace does not runs its own forward, its submodules
            rewritten on their own. False trusts the traces (for models known to trace).
    Returns:
        A `TunedGraphModule` when the whole model traces, else the model (or, unless
        `inplace`, a shallow copy of it) with its traceable parts rewritten; parts keep their
        class. A model no part of which traces comes back as it is (with a warning if it has
        BN: it ran before, so it runs after).
    """
    check_module(model, "tune_mode")
    rule = normalize_mode(mode)
    try:
        tuned = _rewrite(model, rule, inplace, verify)
    except TraceError as exc:
        # The model ran before the rewrite, so it runs after it: unchanged, and said so.
        log.warning("tune_mode folded nothing: %s Nothing was changed; the model runs as it "
                    "is.", exc, extra={NOTHING_FOLDS: True})
        return model
    infos = _infos(tuned)
    _warn_if_nothing_folds(tuned, infos, rule)
    if log.isEnabledFor(logging.INFO):
        counts = Counter(str(b.lowering) if b.lowering else "skipped" for b in infos)
        log.info("convbn_fx rewrote %s: %s", type(tuned).__name__, dict(counts) or "no blocks")
    return tuned


def _rewrite(model: nn.Module, rule, inplace: bool, verify: bool = True) -> nn.Module:
    walk = Rewriter(rule, inplace, verify)
    try:
        tuned = walk.whole(model)
    except Untraceable as exc:
        walk.errors.insert(0, str(exc))
        result = walk.parts(model, "")
        if not any(is_rewritten(m) for m in result.modules()):
            if not has_blocks_inside(model):
                log.info("%s does not trace and has no BN: nothing to rewrite",
                         type(model).__name__)
                return model
            raise TraceError(
                f"could not trace {type(model).__name__} or any submodule holding a conv/BN "
                f"with torch.fx ({walk.errors[0]}); make its forward traceable or pass the "
                "submodule to rewrite.") from None
        log.info("%s traced in parts: %s", type(model).__name__, "; ".join(walk.errors))
        return result
    if inplace and isinstance(model, torch.fx.GraphModule) and tuned is not model:
        tuned = tuned.take_over(model)  # keeps the caller's object
    if walk.errors:
        log.info("%s: submodules kept as calls: %s", type(model).__name__,
                 "; ".join(walk.errors))
    return tuned


# Set on the records below: a view that shows the blocks itself (the CLI) may leave them out.
NOTHING_FOLDS = "convbn_fx_nothing_folds"


def _warn_if_nothing_folds(model: nn.Module, infos: list[BlockInfo], rule) -> None:
    """One warning when the rewrite saves nothing: silent zero benefit is worse than noise.

    Only at rewrite time (a relowering after a state change is what the user asked for), and
    only for `auto`: a forced mode or a policy says what the user wants.
    """
    if not infos or rule != "auto" or any(i.folded for i in infos):
        return
    n = len(infos)
    blocks = f"{n} conv→BN block{'s' if n != 1 else ''} of {type(model).__name__}"
    training = sum(i.lowering is Mode.TRAIN for i in infos)
    if training:
        which = "their BN layers are" if training == n else f"{training} of them have BN"
        rest = "" if training == n else "; convbn_fx.describe(model) says why the rest cannot"
        log.warning(
            "tune_mode folded none of the %s: %s in training mode (batch statistics), so "
            "nothing changes; to fine-tune with frozen BN call .eval() on them "
            "(convbn_fx.tools.testing.finetune_state(model), or for m in model.modules(): if "
            "isinstance(m, nn.BatchNorm2d): m.eval()) and they fold on the next call%s.",
            blocks, which, rest, extra={NOTHING_FOLDS: True})
    else:
        log.warning("tune_mode could fold none of the %s; convbn_fx.describe(model) gives "
                    "each block's reason.", blocks, extra={NOTHING_FOLDS: True})


def describe(module: nn.Module) -> list[BlockInfo]:
    """The conv→BN blocks of a module and the lowering each runs with in its current state.

    For a module that `tune_mode` has not rewritten, reports what `tune_mode(module)` would
    do (a dry run: the module is not changed).
    """
    check_module(module, "describe")
    graphs = list(rewritten_graphs(module))
    if not graphs:
        if not has_blocks_inside(module):
            return []
        tuned = _rewrite(module, "auto", inplace=False)  # a dry run: no warning
        return describe(tuned) if tuned is not module else []
    return _infos(module)


def _infos(module: nn.Module) -> list[BlockInfo]:
    """The blocks of every rewritten graph inside `module`, each listed once."""
    infos = [(info, bool(gm.convbn_tuning.failed) and not gm.convbn_tuning.trusted)
             for name, gm in rewritten_graphs(module) for info in gm.block_infos(name)]
    # A module whose trace did not verify lists its blocks, and the parts its children were
    # rewritten into list them again: the part, which is what runs, says what it runs.
    live = {(i.conv, i.bn) for i, unused in infos if not unused}
    return [i for i, unused in infos if not (unused and (i.conv, i.bn) in live)]
