"""Apply one lowering per block, to a graph or to a copy of it.

A stateful model's template graph is never edited: every (re)lowering starts from a fresh
copy, so a model whose state changes back and forth always gets the lowering for its current
state. Compiler hooks (inductor's pre-grad pass) hand over a graph to edit in place.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Mapping, Sequence

import torch.fx

from ..passes.registry import Lowering, get_lowering
from ..vocabulary.blocks import Block
from ..vocabulary.modes import Mode
from .uses import is_metadata_use

__all__ = ["copy_graph", "lower_graph", "lower_in_place"]

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


def _move_metadata_uses(conv: torch.fx.Node, uses: list[torch.fx.Node],
                        out: torch.fx.Node) -> None:
    """Let input checks of the conv output (`x.ndim == 4`) read the folded output instead.

    The folded output has the same shape and type; the checks, and whatever they feed, move
    after it so the graph stays in order and the unfolded conv is not computed for them.
    """
    for user in uses:
        user.replace_input_with(conv, out)
    # What now comes too early: the checks and whatever they feed, up to `out`. A node after
    # `out` is in order, and so is everything downstream of it.
    early, pending = set(), list(uses)
    while pending:
        node = pending.pop()
        if node not in early and node < out:
            early.add(node)
            pending.extend(node.users)
    anchor = out
    for node in sorted(early):  # in graph order, right after `out`
        anchor.append(node)
        anchor = node


class _SameNodes(dict):
    """A node map that leaves unmapped nodes as they are (lowering a graph in place)."""

    def __missing__(self, node):
        return node


def lower_graph(template: torch.fx.Graph, blocks: Sequence[Block],
                lowerings: Sequence[Mode | None],
                table: Mapping[Mode, Lowering] | None = None) -> tuple[torch.fx.Graph, int]:
    """A copy of `template` with `blocks[i]` lowered by `lowerings[i]` (None: left as is).

    Returns the copy and how many blocks changed (see `lower_in_place`).
    """
    graph, node_map = copy_graph(template)
    return graph, lower_in_place(graph, blocks, lowerings, node_map, table)


def lower_in_place(graph: torch.fx.Graph, blocks: Sequence[Block],
                   lowerings: Sequence[Mode | None],
                   node_map: dict[torch.fx.Node, torch.fx.Node] | None = None,
                   table: Mapping[Mode, Lowering] | None = None) -> int:
    """Lower `blocks[i]` by `lowerings[i]` in `graph` itself, whose nodes `node_map` maps to.

    `table` maps a Mode to the lowering to use instead of the registry's. Returns how many
    blocks changed (a lowering that returns the BN node leaves its block as it is).
    """
    node_map = _SameNodes(node_map or {})
    changed = 0
    for block, mode in zip(blocks, lowerings):
        if mode is None:
            continue
        template_bn = block.bn_node
        block = block.remap(node_map)
        lowering = table[mode] if table and mode in table else get_lowering(mode)
        uses = [u for u in block.conv_node.users  # read only the conv output's shape
                if is_metadata_use(u, block.conv_node) and u not in block.check_nodes]
        with graph.inserting_before(block.bn_node):
            out = lowering(graph, block)
            if out is block.bn_node:
                continue
            out.meta = {**block.bn_node.meta, **out.meta}
        changed += 1
        block.bn_node.replace_all_uses_with(out)
        node_map[template_bn] = out  # a later block fed by this one (conv→BN→conv) reads `out`
        inputs = block.bn_node.all_input_nodes + block.conv_node.all_input_nodes
        for check in block.check_nodes:  # the lowering runs the norm's checks itself
            inputs += check.all_input_nodes
            graph.erase_node(check)
        if all(u in uses or u in block.inner for u in block.conv_node.users):  # conv gone
            # Uses of the Linear output's shape read the kernel's result, not its flatten.
            shaped = out.args[0] if block.view is not None else out
            _move_metadata_uses(block.conv_node, uses, shaped)
        graph.erase_node(block.bn_node)
        for node in block.inner:  # an aten BN's tuple (bn_node was its getitem 0), conv·S
            inputs += node.all_input_nodes
            if not node.users:
                graph.erase_node(node)
        if not block.conv_node.users:
            graph.erase_node(block.conv_node)
        for node in inputs:  # a traced-through module's tensors, now read by the lowering
            if node.op == "get_attr" and not node.users and node.graph is graph:
                graph.erase_node(node)
    graph.lint()
    log.debug("lowered %s", dict(Counter(str(m) for m in lowerings if m is not None)))
    return changed
