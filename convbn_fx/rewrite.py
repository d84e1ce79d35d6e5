"""Apply one lowering per block to a copy of a graph.

The template graph is never edited: every (re)lowering starts from a fresh copy, so a model
whose state changes back and forth always gets the lowering for its current state, and the
caller's graph stays untouched.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

import torch.fx

from .blocks import Block
from .modes import Mode
from .passes import get_lowering

__all__ = ["copy_graph", "lower_graph"]

log = logging.getLogger(__name__)


def copy_graph(graph: torch.fx.Graph) -> tuple[torch.fx.Graph, dict[torch.fx.Node, torch.fx.Node]]:
    """A node-for-node copy of `graph` (metadata shallow-copied) and the old→new node map."""
    node_map: dict[torch.fx.Node, torch.fx.Node] = {}
    new = torch.fx.Graph(tracer_cls=graph._tracer_cls)
    out = new.graph_copy(graph, node_map, return_output_node=True)
    if out is not None:
        value, old_output = out
        new_output = new.output(value, type_expr=getattr(old_output, "type", None))
        new_output.meta = dict(old_output.meta)
        node_map[old_output] = new_output
    new._codegen = graph._codegen
    return new, node_map


def lower_graph(template: torch.fx.Graph, blocks: Sequence[Block],
                lowerings: Sequence[Mode | None]) -> torch.fx.Graph:
    """A copy of `template` with `blocks[i]` lowered by `lowerings[i]` (None: left as is)."""
    graph, node_map = copy_graph(template)
    for block, mode in zip(blocks, lowerings):
        if mode is None:
            continue
        block = block.remap(node_map)
        with graph.inserting_before(block.bn_node):
            out = get_lowering(mode)(graph, block)
        if out is block.bn_node:
            continue
        out.meta = {**block.bn_node.meta, **out.meta}
        block.bn_node.replace_all_uses_with(out)
        graph.erase_node(block.bn_node)
        if not block.conv_node.users:
            graph.erase_node(block.conv_node)
    graph.lint()
    log.debug("lowered %s", dict(Counter(str(m) for m in lowerings if m is not None)))
    return graph
