"""The user-facing entry points: `tune_mode` rewrites a model, `describe` reports on it.

A model is traced whole where it can be. What the tracer keeps as a call (a submodule that
does not trace, one with hooks, a checkpointing wrapper) is rewritten on its own as a part
that stays an instance of its class; a model whose own forward does not trace (detection
models, with data-dependent Python) is rewritten in its largest submodules that do.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter

import torch.fx
import torch.nn as nn

from .blocks import BlockInfo
from .errors import ConvBNError, TraceError
from .kinds import block_types, has_hooks, has_object_state, is_declared_leaf
from .modes import ModeArg, normalize_mode
from .parts import (TunedPart, Untraceable, attach, is_rewritten, make_part, one_line,
                    replace_submodules, rewrite_parts, shallow_copy)
from .tracing import Trace, has_blocks_inside, trace_graph
from .tuned import TunedGraphModule

__all__ = ["tune_mode", "describe"]

log = logging.getLogger(__name__)


def _check_module(model, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise ConvBNError(f"{fn} expects a torch.nn.Module, got {type(model).__name__}; "
                          "pass the model itself (or torch.fx.symbolic_trace(model)).")


class _Rewriter:
    """One `tune_mode` call's walk: a mode, whether to copy, and the trace failures seen."""

    def __init__(self, mode, inplace: bool):
        self.mode, self.inplace, self.errors = mode, inplace, []

    def whole(self, module: nn.Module, prefix: str = "", as_part: bool = False) -> nn.Module:
        """`module` traced and rewritten whole; raises Untraceable when its forward won't trace.

        Returns a TunedGraphModule, or a part of the module's own class when `as_part` (the
        untraced Python around it reads its attributes) or when the module has hooks (only a
        call of the module object itself runs them).
        """
        if is_rewritten(module):
            return self.remode(module)
        if has_object_state(module) and not self.inplace:
            raise ConvBNError(
                f"{prefix or type(module).__name__} was passed to fully_shard (or another "
                "composable API that keeps its state on the module object), so it cannot be "
                "rewritten as a copy; call tune_mode(model, inplace=True), or tune_mode "
                "before fully_shard.")
        if isinstance(module, torch.fx.GraphModule):
            graph = copy.deepcopy(module.graph)
            if not as_part and not has_hooks(module):
                return TunedGraphModule(module, graph, self.mode, prefix=prefix)
            return make_part(module, lambda view: TunedGraphModule(
                view, graph, self.mode, prefix=prefix), inplace=self.inplace)
        try:
            traced = trace_graph(module)
        except Exception as exc:  # torch.fx raises many kinds; any means "not traceable"
            raise Untraceable(f"{type(module).__name__}: {one_line(exc)}") from exc
        # Errors past this point (a policy raising, a forced mode that does not fit) are the
        # user's to see, not a reason to trace in parts.
        root = self.kept_calls(module, traced, prefix)

        def build(view: nn.Module) -> TunedGraphModule:
            return TunedGraphModule(view, traced.graph, self.mode, source=view, prefix=prefix,
                                    opaque=traced.opaque)

        if as_part or has_hooks(module):
            return make_part(root, build, inplace=self.inplace)
        return build(root)

    def kept_calls(self, module: nn.Module, traced: Trace, prefix: str) -> nn.Module:
        """`module` with the submodules its trace kept as calls rewritten on their own."""
        replacements = {}
        for target in dict.fromkeys(n.target for n in traced.graph.nodes
                                    if n.op in ("call_module", "get_attr")):
            child = _submodule(module, target)  # get_attr: a module passed as a value
            if child is None or isinstance(child, block_types()) \
                    or not has_blocks_inside(child):
                continue
            path = f"{prefix}.{target}" if prefix else target
            if is_declared_leaf(child) or target in traced.opaque:
                new = self.parts(child, path)  # its own forward runs as written
            else:
                new = self.part_or_parts(child, path)
            if new is not child:
                replacements[target] = new
        return replace_submodules(module, replacements, inplace=self.inplace)

    def part_or_parts(self, child: nn.Module, path: str) -> nn.Module:
        try:
            return self.whole(child, path, as_part=True)
        except Untraceable as exc:
            self.errors.append(f"{path}: {exc}")
            return self.parts(child, path)

    def parts(self, module: nn.Module, prefix: str) -> nn.Module:
        """`module` with its largest traceable children rewritten, recursively."""
        return rewrite_parts(module, lambda child, path: self.whole(child, path, as_part=True),
                             inplace=self.inplace, errors=self.errors,
                             prefix=f"{prefix}." if prefix else "")

    def remode(self, module: nn.Module) -> nn.Module:
        """A rewritten module (or part) with this walk's mode, sharing everything."""
        gm = module.__dict__["_convbn_part"] if isinstance(module, TunedPart) else module
        if gm.convbn_mode == self.mode:
            return module
        if self.inplace:
            gm.set_mode(self.mode)
            return module
        if not isinstance(module, TunedPart):
            return gm.with_mode(self.mode)
        part = shallow_copy(module)
        attach(part, gm.with_mode(self.mode))
        return part


def _submodule(module: nn.Module, target: str) -> nn.Module | None:
    try:
        return module.get_submodule(target)
    except AttributeError:
        return None


def rewrite_kept_calls(module: nn.Module, traced: Trace, mode, prefix: str = "") -> None:
    """Rewrite, in place, the submodules a new trace of `module` keeps as calls."""
    walk = _Rewriter(mode, inplace=True)
    walk.kept_calls(module, traced, prefix)
    if walk.errors:
        log.info("%s: submodules kept as calls: %s", type(module).__name__,
                 "; ".join(walk.errors))


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
        `inplace`, a shallow copy of it) with its traceable parts rewritten; parts keep their
        class. A model without BN that does not trace comes back as it is.
    """
    _check_module(model, "tune_mode")
    mode = normalize_mode(mode)
    walk = _Rewriter(mode, inplace)
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
        _log_counts(result)
        return result
    if inplace and isinstance(model, torch.fx.GraphModule) and tuned is not model:
        model.graph = tuned.graph  # keeps the caller's object; the state check needs ours
        model.__class__ = type(tuned)
        model.__dict__.update({k: v for k, v in tuned.__dict__.items()
                                if k.startswith("_convbn_")})
        tuned = model
    if walk.errors:
        log.info("%s: submodules kept as calls: %s", type(model).__name__,
                 "; ".join(walk.errors))
    _log_counts(tuned)
    return tuned


def _log_counts(model: nn.Module) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    counts = Counter(str(b.lowering) if b.lowering else "skipped" for b in describe(model))
    log.info("convbn_fx rewrote %s: %s", type(model).__name__, dict(counts) or "no blocks")


def _graph_modules(module: nn.Module):
    """(qualified name, TunedGraphModule) for every rewritten graph in the module's tree."""
    for name, m in module.named_modules():
        if isinstance(m, TunedPart):
            yield name, m.__dict__["_convbn_part"]
        elif isinstance(m, TunedGraphModule):
            yield name, m


def describe(module: nn.Module) -> list[BlockInfo]:
    """The conv→BN blocks of a module and the lowering each runs with in its current state.

    For a module that `tune_mode` has not rewritten, reports what `tune_mode(module)` would
    do (a dry run: the module is not changed).
    """
    _check_module(module, "describe")
    parts = list(_graph_modules(module))
    if not parts:
        if not has_blocks_inside(module):
            return []
        tuned = tune_mode(module)
        return describe(tuned) if tuned is not module else []
    return [info for name, m in parts for info in m.block_infos(name)]
