"""The rewrite as one pass: find every conv→BN block of a graph, choose, lower.

Every entry point calls this function, whatever the graph's flavour: `tune_mode`'s module
graphs (through TunedGraphModule, again whenever module state changes), the functional graphs
of the torch.compile backend and inductor's pre-grad pass, `torch.export` programs, and
`deploy_mode` (with its own lowering, guards and state). As `torch.fx.passes.infra`'s
`PassBase.call(gm) -> PassResult`, it returns a small record of what it did.

    result = tune_graph(gm.graph)                         # a compiled graph, in place
    gm.recompile()
    [(i.bn, i.lowering) for i in result.infos()]
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch.fx
import torch.nn as nn

from ..passes.registry import Lowering
from ..vocabulary.blocks import Block, BlockInfo
from ..vocabulary.modes import Mode, ModeArg, normalize_mode
from .choose import StateOf, choose_mode, graph_state, module_state
from .find import find_blocks
from .lower import lower_graph, lower_in_place

__all__ = ["TuneResult", "tune_graph"]

log = logging.getLogger(__name__)

Guard = Callable[[Block], "str | None"]


@dataclass
class TuneResult:
    """What `tune_graph` did to a graph."""

    graph: torch.fx.Graph               # the lowered graph (the input itself when in place)
    blocks: list[Block]                 # every block found, as found (nodes of the input)
    lowerings: list[Mode | None]        # per block; None: left as is
    modified: bool                      # whether any block's nodes changed
    per_call: list[bool] = field(default_factory=list)  # per block: Tune or Eval per call

    def infos(self, prefix: str = "") -> list[BlockInfo]:
        """The public summary of each block, names prefixed with `prefix.`."""
        pre = f"{prefix}." if prefix else ""
        return [BlockInfo(pre + b.conv, pre + b.bn, b.kind, m, b.reason)
                for b, m in zip(self.blocks, self.lowerings)]

    def counts(self) -> dict[str, int]:
        return dict(Counter(str(m) if m else "skipped" for m in self.lowerings))


def tune_graph(graph: torch.fx.Graph | torch.fx.GraphModule, mode: ModeArg = "auto",
               root: nn.Module | None = None, *, state: StateOf | None = None,
               inplace: bool = True, strict: bool = False, prefix: str = "",
               guards: Sequence[Guard] = (), lowerings: Mapping[Mode, Lowering] | None = None,
               reuse: TuneResult | None = None) -> TuneResult:
    """Rewrite every foldable conv→BN block of `graph`.

    Args:
        graph: a Graph, or a GraphModule (recompiled here when changed in place).
        mode: "auto", a Mode (or its value) to force, or a policy `(BlockInfo) -> Mode | None`.
        root: the module owning a module graph's modules: blocks follow its modules' state.
            None for compiled and exported graphs, whose BN calls state their own flags.
        state: how to read a block's state, instead of from `root` or the graph.
        inplace: edit `graph`; False lowers a copy and leaves `graph` as it is.
        strict: a forced mode that does not fit a block's state raises ModeError (else a
            warning, and `auto`'s choice).
        prefix: where the graph sits in a model, for the names policies and infos show.
        guards: extra conditions, `(Block) -> reason or None`, run on each foldable block.
        lowerings: Mode → lowering, used instead of the registry's for those modes.
        reuse: an earlier result for this same (unchanged) graph: its blocks are not
            matched again, and when every block gets the lowering it had, `reuse` itself is
            returned.
    Returns:
        A `TuneResult`.
    """
    gm = graph if isinstance(graph, torch.fx.GraphModule) else None
    graph = gm.graph if gm is not None else graph
    rule = normalize_mode(mode)
    if reuse is not None:
        blocks = reuse.blocks
    else:
        blocks = find_blocks(graph, root)
        for block in blocks:
            for guard in guards:
                if block.foldable:
                    block.reason = guard(block)
    if state is None:
        state = module_state(root) if root is not None else graph_state
    states = [state(b) if b.foldable else None for b in blocks]
    chosen = [choose_mode(b, s, rule, prefix=prefix, strict=strict) if b.foldable
              else None for b, s in zip(blocks, states)]
    if reuse is not None and chosen == reuse.lowerings:
        return reuse
    # auto's Tune on a module graph picks Tune or Eval per call from the shapes; a forced
    # Tune folds on every call, and so do compiled and exported graphs (shapes fixed there).
    per_call = [rule == "auto" and m is Mode.TUNE and s.requires_grad is not None
                for m, s in zip(chosen, states)]
    marked = [dataclasses.replace(b, per_call=True) if p else b
              for b, p in zip(blocks, per_call)]
    if inplace:
        changed = lower_in_place(graph, marked, chosen, table=lowerings) \
            if any(m is not None for m in chosen) else 0
        result = TuneResult(graph, blocks, chosen, changed > 0, per_call)
        if gm is not None and changed:
            gm.recompile()
    else:
        lowered, changed = lower_graph(graph, marked, chosen, lowerings)
        result = TuneResult(lowered, blocks, chosen, changed > 0, per_call)
    log.debug("tune_graph%s: %s", f" {prefix}" if prefix else "", result.counts() or "no blocks")
    return result
