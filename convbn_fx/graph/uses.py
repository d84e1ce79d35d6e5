"""Which uses of a value read only its shape or type, not its values.

A conv output read by an input check (timm's `_assert(x.ndim == 4)`, BN's own rank check) is
still foldable: the folded output has the same shape and type, so such uses move after it
(graph/lower.py) and never keep the unfolded conv alive.
"""

from __future__ import annotations

import torch.fx

from ..kernels.checks import check_input

__all__ = ["is_metadata_use"]

# Reading these from a conv output needs its shape or type, not its values.
_METADATA_ATTRS = {"ndim", "shape", "dtype", "device", "is_cuda", "layout"}
_METADATA_METHODS = {"size", "dim", "ndimension", "get_device"}
# `y.reshape_as(value)` reads only value's shape (LeViT: `bn(lin.flatten(0, 1)).reshape_as(lin)`).
_SHAPE_OF_SECOND = {"reshape_as", "view_as", "expand_as", "type_as"}


def is_metadata_use(user: torch.fx.Node, value: torch.fx.Node) -> bool:
    """`user` reads only the shape or type of `value` (an input check like `x.ndim == 4`)."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is value and user.args[1] in _METADATA_ATTRS
    if user.op == "call_function" and user.target is check_input:
        return user.args[2] is value
    if user.op == "call_method" and user.target in _SHAPE_OF_SECOND:
        return len(user.args) == 2 and user.args[1] is value and user.args[0] is not value
    if user.op == "call_method" and user.target in _METADATA_METHODS:
        return user.args[0] is value and value not in user.args[1:]
    return False
