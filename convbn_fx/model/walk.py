"""The model walk: rewrite a model whole where it traces, else in its largest parts that do.

A model is traced whole where it can be. What the tracer keeps as a call (a submodule that
does not trace, one with hooks, a checkpointing wrapper) is rewritten on its own as a part
that stays an instance of its class (parts.py); a model whose own forward does not trace
(detection models, with data-dependent Python) is rewritten in its largest submodules that
do. `retrace` is the same walk for a graph module whose graph must change after the rewrite.
"""

from __future__ import annotations

import copy
import logging

import torch.fx
import torch.nn as nn

from ..vocabulary.errors import ConvBNError, exception_summary
from ..vocabulary.kinds import block_types, has_hooks, has_object_state, is_declared_leaf
from ..vocabulary.modes import ModeArg
from .parts import (
    TunedPart,
    Untraceable,
    attach,
    graph_module_of,
    is_rewritten,
    make_part,
    replace_submodules,
    rewrite_parts,
    shallow_copy,
)
from .tracer import Trace, trace_graph
from .tree import has_blocks_inside, submodule
from .tuned import TunedGraphModule

__all__ = ["Rewriter", "retrace", "split"]

log = logging.getLogger(__name__)


class Rewriter:
    """One rewrite's walk: a mode rule, whether to copy, and the trace failures seen."""

    def __init__(self, rule: ModeArg, inplace: bool, verify: bool = True):
        self.rule, self.inplace, self.verify, self.errors = rule, inplace, verify, []

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
                return TunedGraphModule(module, graph, self.rule, prefix=prefix,
                                        verify=self.verify)
            return make_part(module, lambda view: TunedGraphModule(
                view, graph, self.rule, prefix=prefix, verify=self.verify),
                inplace=self.inplace)
        try:
            traced = trace_graph(module, keep=is_rewritten)
        except Exception as exc:  # torch.fx raises many kinds; any means "not traceable"
            raise Untraceable(f"{type(module).__name__}: {exception_summary(exc)}") from exc
        # Errors past this point (a policy raising, a forced mode that does not fit) are the
        # user's to see, not a reason to trace in parts.
        root = self.kept_calls(module, traced, prefix)

        def build(view: nn.Module) -> TunedGraphModule:
            return TunedGraphModule(view, traced.graph, self.rule, source=view, prefix=prefix,
                                    untraceable=traced.untraceable, retrace=retrace,
                                    verify=self.verify, split=split)

        if as_part or has_hooks(module):
            return make_part(root, build, inplace=self.inplace)
        return build(root)

    def kept_calls(self, module: nn.Module, traced: Trace, prefix: str) -> nn.Module:
        """`module` with the submodules its trace kept as calls rewritten on their own."""
        replacements = {}
        for target in dict.fromkeys(n.target for n in traced.graph.nodes
                                    if n.op in ("call_module", "get_attr")):
            child = submodule(module, target)  # get_attr: a module passed as a value
            if child is None or isinstance(child, block_types()) \
                    or not has_blocks_inside(child):
                continue
            path = f"{prefix}.{target}" if prefix else target
            if is_declared_leaf(child) or target in traced.untraceable:
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
        """A rewritten module (or part) with this walk's mode rule, sharing everything."""
        gm = graph_module_of(module)
        if gm.convbn_mode == self.rule:
            return module
        if self.inplace:
            gm.set_mode(self.rule)
            return module
        if not isinstance(module, TunedPart):
            return gm.with_mode(self.rule)
        part = shallow_copy(module)
        attach(part, gm.with_mode(self.rule))
        return part


def retrace(view: nn.Module, untraceable: frozenset, rule: ModeArg,
            prefix: str) -> torch.fx.Graph:
    """Trace `view` again, rewriting in place the submodules the new trace keeps as calls."""
    traced = trace_graph(view, untraceable, keep=is_rewritten)
    walk = Rewriter(rule, inplace=True)
    walk.kept_calls(view, traced, prefix)
    if walk.errors:
        log.info("%s: submodules kept as calls: %s", type(view).__name__, "; ".join(walk.errors))
    return traced.graph


def split(view: nn.Module, rule: ModeArg, prefix: str) -> None:
    """Rewrite the children of `view` on their own (its trace did not compute its forward).

    `view` shares its children dict with a graph module; the children are replaced there by
    parts (copies: the input model is not changed), each checking its own trace in turn.
    """
    walk = Rewriter(rule, inplace=False)
    rewritten = walk.parts(view, prefix)
    view._modules.update(rewritten._modules)
    if walk.errors:
        log.info("%s: submodules kept as calls: %s", type(view).__name__, "; ".join(walk.errors))
