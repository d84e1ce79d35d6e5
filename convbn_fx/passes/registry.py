"""The lowering registry: one function per Mode that rewrites a single block.

A lowering is `fn(graph, block) -> Node`: called with the graph's insertion point just before
the block's BN node, it adds whatever nodes compute the block and returns the one whose value
replaces the BN's output (returning `block.bn_node` leaves the block as it is). It computes
the whole block: the norm's input checks (`block.checks`, whose traced calls are removed) and
a frozen norm's epilogue (`block.epilogue`) included; `emit.py` has helpers for both.
Lowerings read only the `Block` record, so one lowering serves module, functional and aten
graphs alike.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch.fx

from ..vocabulary.blocks import Block
from ..vocabulary.errors import ConvBNError, LoweringError, ModeError
from ..vocabulary.modes import Mode

__all__ = ["Lowering", "register_lowering", "get_lowering", "get_lowerings", "registry_version"]

Lowering = Callable[[torch.fx.Graph, Block], torch.fx.Node]

_LOWERINGS: dict[Mode, Lowering] = {}
_versions = itertools.count()
_version = next(_versions)


def registry_version() -> int:
    """Changes whenever a lowering is (re)registered, so rewritten models relower."""
    return _version


def register_lowering(mode: Mode | str) -> Callable[[Lowering], Lowering]:
    """Decorator: make `fn` the lowering for `mode`, replacing any earlier one.

    Example::

        @convbn_fx.register_lowering(convbn_fx.Mode.TUNE)
        def my_tune(graph, block):
            ...
    """
    try:
        key = Mode(mode)
    except ValueError:
        raise ModeError(f"cannot register a lowering for {mode!r}: use one of "
                        f"{', '.join(m.value for m in Mode)}.") from None

    def register(fn: Lowering) -> Lowering:
        global _version
        if not callable(fn):
            raise ConvBNError(f"register_lowering({key}) decorates a function "
                              f"(graph, block) -> Node, got {fn!r}.")
        _LOWERINGS[key] = fn
        _version = next(_versions)
        return fn

    return register


def get_lowering(mode: Mode) -> Lowering:
    try:
        return _LOWERINGS[mode]
    except KeyError:
        raise LoweringError(f"no lowering is registered for {mode}; register one with "
                            "@convbn_fx.register_lowering(mode).") from None


def get_lowerings() -> dict[Mode, Lowering]:
    """A copy of the registry: changing it does not change what is registered."""
    return dict(_LOWERINGS)
