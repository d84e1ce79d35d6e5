"""The one chain of skip reasons: why a conv→BN pair is not provably safe to fold.

Every graph flavour runs the same guards, in the same order, and the first that fails names
the reason `describe()` shows, one sentence each. When in doubt a pair is not folded: a
skipped block costs only the saving, a wrong fold costs a wrong answer.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..vocabulary.kinds import bn_base, bn_spatial_dims, conv_base, has_hooks, is_linear, is_plain
from .affine import per_channel
from .ends import End
from .normalize import static_shape
from .uses import is_metadata_use

__all__ = ["skip_reason"]

Guard = Callable[[End, End, "nn.Module | None"], "str | None"]


def _called_whole(conv: End, norm: End) -> list[nn.Module]:
    return [e.module for e in (conv, norm) if e.node.op == "call_module"]


def _end_reasons(conv: End, norm: End, root) -> str | None:
    """What one end alone rules out: run-time flags, no running statistics, its own call."""
    for end, what in ((conv, "conv"), (norm, "BN")):
        if end.reason:
            return end.reason
        if end.node.op != "call_module":
            continue
        if end.extra_args:
            return f"the {what} is called with extra arguments (e.g. output_size)"
        if not is_plain(end.module) and not has_hooks(end.module):
            return (f"{type(end.module).__name__} overrides forward with code that does not "
                    "trace, so what it computes cannot be checked; convbn_fx.declare_safe(cls) "
                    "if it computes what the stock one does")
    return None


def _owned(conv: End, norm: End, root) -> str | None:
    if root is not None and conv.module is None:
        return "no module owns the conv's weight, so its state cannot be followed"
    return None


def _hooks(conv: End, norm: End, root) -> str | None:
    called = _called_whole(conv, norm)
    if any(m._forward_hooks or m._forward_pre_hooks for m in called):
        return "the conv or BN has forward hooks, which folding would skip"
    if any(m._backward_hooks or m._backward_pre_hooks for m in called):
        return "the conv or BN has backward hooks, which folding would skip"
    return None


def _other_uses(conv: End, norm: End, root) -> str | None:
    reads = norm.view if norm.view is not None else norm.call
    others = [u.name for u in conv.node.users
              if u is not reads and not is_metadata_use(u, conv.node)]
    if others:
        return f"the conv output is also used by {', '.join(others)}"
    if norm.view is not None and len(norm.view.users) > 1:
        others = ", ".join(u.name for u in norm.view.users if u is not norm.call)
        return f"the flattened Linear output is also used by {others}"
    if norm.view is not None and norm.epilogue:
        return "a norm with an epilogue after a flatten of the Linear output is not folded"
    if norm.call is not norm.node and len(norm.call.users) > 1:
        if norm.affine is not None:
            others = ", ".join(u.name for u in norm.call.users if u is not norm.node)
            return f"the scaled conv output is also used by {others}"
        return "BN's saved statistics (outputs 1 and 2) are used too"
    return None


def _lazy(conv: End, norm: End, root) -> str | None:
    if conv.module is not None and any(isinstance(p, nn.parameter.UninitializedParameter)
                                       for p in conv.module.parameters()):
        return "the conv has uninitialized (lazy) parameters"
    return None


def _out_channels(conv: End, root) -> int | None:
    module = conv.module
    if module is not None and conv_base(module) is not None:
        return module.out_features if is_linear(module) else module.out_channels
    shape = static_shape(conv.tensors["weight"], root)
    if shape is None:
        return None  # unknown shapes: BN itself would reject a mismatch at run time
    if conv.linear or not conv.config.transposed:
        return shape[0]
    return shape[1] * conv.config.groups


def _affine(conv: End, norm: End, root) -> str | None:
    """An affine epilogue folds only into a conv, with one scale and shift per channel."""
    if norm.affine is None:
        return None
    if conv.linear:
        return "a Linear's affine epilogue is not folded (only BatchNorm1d's)"
    out = _out_channels(conv, root)
    if out is None or not per_channel(norm.affine, out, len(conv.config.stride) + 2, root):
        return ("the scale and shift are not one value per output channel of the conv, so "
                "they do not fold into its weight")
    return None


def _shapes(conv: End, norm: End, root) -> str | None:
    """Whether the norm normalises the channels (features) that the conv (linear) makes."""
    if norm.affine is not None:
        return None
    bn = norm.module if norm.node.op == "call_module" else None
    if conv.linear and bn is not None and bn_base(bn) not in (nn.BatchNorm1d,
                                                              nn.SyncBatchNorm):
        return f"{type(bn).__name__} does not normalise a Linear's output features"
    out, mean = _out_channels(conv, root), static_shape(norm.tensors["running_mean"], root)
    channels = (mean[0] if mean else 1) if mean is not None else None
    if out is not None and channels is not None and out != channels:
        what = "Linear has {} output features" if conv.linear else "conv has {} output channels"
        return f"{what.format(out)} but BN has {channels}"
    if not conv.linear and bn is not None and len(conv.config.stride) not in bn_spatial_dims(bn):
        return f"{type(bn).__name__} does not accept the output of a " \
               f"{len(conv.config.stride)}-d conv"
    return None


_GUARDS: tuple[Guard, ...] = (_end_reasons, _owned, _hooks, _other_uses, _lazy, _affine,
                              _shapes)


def skip_reason(conv: End, norm: End, root: nn.Module | None) -> str | None:
    """The first precondition of folding that fails, as one sentence; None when foldable.

    `root` is the module owning a module graph's modules and tensors (None for compiled and
    exported graphs, whose tensors are graph nodes).
    """
    for guard in _GUARDS:
        reason = guard(conv, norm, root)
        if reason is not None:
            return reason
    return None
