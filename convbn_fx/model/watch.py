"""What a rewritten graph module watches on every call, so its lowering is never stale.

The right lowering of a block depends on module state users change freely after the rewrite:
`model.train()`, `bn.eval()` on one submodule, `requires_grad_()`, a `self.training` branch
that went one way when traced, hooks (or `fully_shard`) added to a module the graph went
through, a submodule replaced. `Watch` holds the few modules that state lives on (derived
once per template graph); `Watch.read()` is the cheap per-call reading, compared with the
reading the current code was generated for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch.fx
import torch.nn as nn

from ..passes.registry import registry_version
from ..vocabulary.blocks import Block
from ..vocabulary.kinds import has_hooks, is_frozen_bn
from .tree import reads_training_flag, traced_through

__all__ = ["StateKey", "Watch"]


class StateKey(NamedTuple):
    """What the chosen lowerings depend on, read before every call."""

    bn_training: list[bool]         # each frozen-or-not BN of a foldable block
    requires_grad: list[bool]       # each parameter of a foldable block's conv and BN
    branch_training: list[bool]     # traced-through modules whose forward reads `training`
    registry: int                   # the lowering registry's version
    hooks: list[bool]               # hooks on block modules and traced-through modules
    replaced: list[bool]            # a traced-through module swapped for another (surgery)

    def needs_retrace(self, old: "StateKey") -> bool:
        """The graph itself must change: a branch flipped, hooks came or went, a swap."""
        return (self.branch_training != old.branch_training or self.hooks != old.hooks
                or self.replaced != old.replaced)

    def structure(self) -> tuple:
        """The part of the state that changes the graph, not only the lowerings."""
        return (self.branch_training, self.registry, self.hooks, self.replaced)


@dataclass
class Watch:
    """The modules a graph module's state lives on (see the module docstring)."""

    bns: list[nn.Module]            # BNs (not frozen norms) of foldable blocks
    owners: list[nn.Module]         # convs and BNs of foldable blocks: their parameters
    branchy: list[nn.Module]        # modules whose traced forward read `self.training`
    hooked: list[nn.Module]         # modules whose hooks change the graph or a fold
    through: list[tuple]            # (parent, name, module) the trace went through

    @classmethod
    def of(cls, gm: nn.Module, template: torch.fx.Graph, blocks: list[Block],
           source: nn.Module | None) -> "Watch":
        """The watch of `gm`, running `template` (traced from `source`, None: not retraceable)."""
        modules = dict(gm.named_modules())
        foldable = [b for b in blocks if b.foldable]
        owners = {id(m): m for b in foldable for m in (modules[b.conv], modules[b.bn])}
        through = traced_through(gm, template)
        inlined = [m for _, _, m in through]
        # A hook on a block module skips the fold; one on a traced-through module would not
        # run at all, so it makes that module a call (a new trace).
        hooked = {id(m): m for m in [modules.get(name) for b in blocks for name in (b.conv, b.bn)]
                  + inlined if m is not None}
        branchy = [] if source is None else (
            [gm] * reads_training_flag(source) + [m for m in inlined if reads_training_flag(m)])
        return cls([modules[b.bn] for b in foldable if not is_frozen_bn(modules[b.bn])],
                   list(owners.values()), branchy, list(hooked.values()), through)

    def read(self) -> StateKey:
        """Everything the chosen lowerings depend on; cheap enough to compute every call."""
        return StateKey(
            [bn.training for bn in self.bns],
            [p.requires_grad for m in self.owners for p in m._parameters.values()
             if p is not None],
            [m.training for m in self.branchy],
            registry_version(),
            [has_hooks(m) for m in self.hooked],
            [parent._modules.get(name) is not m for parent, name, m in self.through],
        )
