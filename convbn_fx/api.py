"""The user-facing entry points: `tune_mode` rewrites a model, `describe` reports on it.

A model that does not trace whole (detection models, with data-dependent Python) is handled
by tracing the largest submodules that do, recursively, and leaving the rest as Python.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter

import torch.fx
import torch.nn as nn

from .blocks import BlockInfo
from .errors import ConvBNError, TraceError
from .modes import ModeArg, normalize_mode
from .parts import Untraceable, one_line, rewrite_parts
from .tracing import has_blocks_inside, trace_graph
from .tuned import TunedGraphModule

__all__ = ["tune_mode", "describe"]

log = logging.getLogger(__name__)


def _check_module(model, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise ConvBNError(f"{fn} expects a torch.nn.Module, got {type(model).__name__}; "
                          "pass the model itself (or torch.fx.symbolic_trace(model)).")


def _tune_whole(model: nn.Module, mode, prefix: str = "") -> TunedGraphModule:
    if isinstance(model, torch.fx.GraphModule):
        return TunedGraphModule(model, copy.deepcopy(model.graph), mode, prefix=prefix)
    try:
        graph = trace_graph(model)
    except Exception as exc:  # torch.fx raises many kinds; any means "not traceable"
        raise Untraceable(f"{type(model).__name__}: {one_line(exc)}") from exc
    # Errors past this point (a policy raising, a forced mode that does not fit) are the
    # user's to see, not a reason to trace in parts.
    return TunedGraphModule(model, graph, mode, source=model, prefix=prefix)


def tune_mode(model: nn.Module, mode: ModeArg = "auto", *, inplace: bool = False) -> nn.Module:
    """Rewrite every conv→BN block of `model` for efficient fine-tuning (Tune mode).

    Args:
        model: an nn.Module, or a GraphModule from `torch.fx.symbolic_trace`.
        mode: "auto" (per block, from module state: Train, Tune or Deploy), a `Mode` or its
            value to force one, or a policy `(BlockInfo) -> Mode | None` (None: leave as is).
        inplace: rewrite the given GraphModule's graph, or the submodules of a model that
            only traces in parts, instead of returning a new module. Parameters and buffers
            are shared with the input either way.
    Returns:
        A `TunedGraphModule` when the whole model traces, else the model (or, unless
        `inplace`, a shallow copy of it) with its largest traceable parts rewritten.
    """
    _check_module(model, "tune_mode")
    mode = normalize_mode(mode)
    if isinstance(model, TunedGraphModule):
        if model.convbn_mode == mode:
            return model
        if inplace:
            model.set_mode(mode)
            return model
        return model.with_mode(mode)
    try:
        tuned = _tune_whole(model, mode)
    except Untraceable as exc:
        errors = [str(exc)]

        def rewrite(child: nn.Module, path: str) -> nn.Module:
            if isinstance(child, TunedGraphModule):  # rewritten before: only the mode changes
                return tune_mode(child, mode, inplace=inplace)
            return _tune_whole(child, mode, prefix=path)

        result = rewrite_parts(model, rewrite, inplace=inplace, errors=errors)
        if not any(isinstance(m, TunedGraphModule) for m in result.modules()):
            raise TraceError(
                f"could not trace {type(model).__name__} or any submodule holding a conv/BN "
                f"with torch.fx ({errors[0]}); make its forward traceable or pass the "
                "submodule to rewrite.") from None
        log.info("%s traced in parts: %s", type(model).__name__, "; ".join(errors))
        _log_counts(result)
        return result
    if inplace and isinstance(model, torch.fx.GraphModule):
        model.graph = tuned.graph  # keeps the caller's object; the state check needs ours
        model.__class__ = type(tuned)
        model.__dict__.update({k: v for k, v in tuned.__dict__.items()
                                if k.startswith("_convbn_")})
        tuned = model
    _log_counts(tuned)
    return tuned


def _log_counts(model: nn.Module) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    counts = Counter(str(b.lowering) if b.lowering else "skipped" for b in describe(model))
    log.info("convbn_fx rewrote %s: %s", type(model).__name__, dict(counts) or "no blocks")


def describe(module: nn.Module) -> list[BlockInfo]:
    """The conv→BN blocks of a module and the lowering each runs with in its current state.

    For a module that `tune_mode` has not rewritten, reports what `tune_mode(module)` would
    do (a dry run: the module is not changed).
    """
    _check_module(module, "describe")
    parts = [(name, m) for name, m in module.named_modules() if isinstance(m, TunedGraphModule)]
    if not parts:
        return describe(tune_mode(module)) if has_blocks_inside(module) else []
    return [info for name, m in parts for info in m.block_infos(name)]
