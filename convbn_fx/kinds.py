"""Which modules are convolutions and which are batch norms, and which subclasses are safe.

Folding rewrites `bn(conv(x))` from the modules' *attributes* (weight, stride, running_var...),
so it is only right when the modules' `forward` is the stock one: a subclass that standardises
its weight or pads in `forward` computes something else. Such subclasses are refused unless
the user declares them safe with `declare_safe`. A Linear counts as the "conv" of a block
(Linear→BatchNorm1d). User modules the tracer must not enter are declared with `declare_leaf`.
"""

from __future__ import annotations

import sys

import torch.nn as nn

from .errors import ConvBNError

__all__ = ["CONV_TYPES", "LINEAR_TYPES", "BN_TYPES", "conv_base", "bn_base", "declare_safe",
           "declare_leaf", "leaf_types", "block_types", "bn_spatial_dims", "is_frozen_bn",
           "is_linear"]

CONV_TYPES: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
LINEAR_TYPES: tuple[type, ...] = (nn.Linear,)
BN_TYPES: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# Methods whose override changes what the module computes from its attributes.
_FORWARD_METHODS = ("forward", "_conv_forward", "_check_input_dim")

_safe_classes: set[type] = set()
_leaf_classes: set[type] = set()


def _frozen_bn_type() -> type | None:
    # torchvision is optional: if a model holds a FrozenBatchNorm2d, torchvision is imported.
    misc = sys.modules.get("torchvision.ops.misc")
    return getattr(misc, "FrozenBatchNorm2d", None)


def is_frozen_bn(module: nn.Module) -> bool:
    frozen = _frozen_bn_type()
    return frozen is not None and isinstance(module, frozen)


def all_bn_types() -> tuple[type, ...]:
    frozen = _frozen_bn_type()
    return BN_TYPES + ((frozen,) if frozen is not None else ())


def _base(module: nn.Module, bases: tuple[type, ...]) -> type | None:
    for cls in type(module).__mro__:
        if cls in bases:
            return cls
    return None


def conv_base(module: nn.Module) -> type | None:
    """The stock conv (or Linear) class `module` is (or derives from), else None."""
    return _base(module, CONV_TYPES + LINEAR_TYPES)


def is_linear(module: nn.Module) -> bool:
    return _base(module, LINEAR_TYPES) is not None


def bn_base(module: nn.Module) -> type | None:
    """The stock BN class `module` is (or derives from), else None."""
    return _base(module, all_bn_types())


def overrides_forward(module: nn.Module, base: type) -> bool:
    """True when `module`'s class changes how `base` computes, and was not declared safe."""
    cls = type(module)
    if cls is base or any(c in _safe_classes for c in cls.__mro__):
        return False
    return any(getattr(cls, m, None) is not getattr(base, m, None) for m in _FORWARD_METHODS)


def declare_safe(cls: type) -> type:
    """Declare a conv or BN subclass safe to fold although it overrides `forward`.

    Use it (also as a class decorator) for subclasses whose `forward` only adds logging or
    checks and computes exactly what the stock module computes from the same attributes.
    """
    if not isinstance(cls, type) or not issubclass(cls, block_types()):
        raise ConvBNError(
            f"declare_safe expects a subclass of a torch conv, Linear or BatchNorm class, "
            f"got {cls.__name__ if isinstance(cls, type) else type(cls).__name__ + ' object'}; "
            "for other modules use convbn_fx.declare_leaf."
        )
    _safe_classes.add(cls)
    return cls


def declare_leaf(cls: type) -> type:
    """Keep every module of class `cls` as one call when tracing, without tracing its forward.

    For user modules whose `forward` torch.fx cannot trace (data-dependent control flow) or
    must not inline; the rest of the model then traces whole. Blocks *inside* such a module
    are not part of the traced graph, so they are left as they are. Usable as a decorator.
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ConvBNError(f"declare_leaf expects an nn.Module subclass, got {cls!r}.")
    _leaf_classes.add(cls)
    return cls


def block_types() -> tuple[type, ...]:
    """The module kinds a block is made of: convs, Linear, and every BN kind."""
    return CONV_TYPES + LINEAR_TYPES + all_bn_types()


def leaf_types() -> tuple[type, ...]:
    """Module types the tracer must keep as calls, so blocks can be found and state read."""
    return block_types() + tuple(_leaf_classes)


def bn_spatial_dims(bn: nn.Module) -> tuple[int, ...]:
    """Spatial ranks of the conv output a BN kind accepts (SyncBatchNorm takes any)."""
    base = bn_base(bn)
    if base is nn.BatchNorm1d:  # (N, C, L); a Linear's (N, C) output is checked at run time
        return (1,)
    if base is nn.BatchNorm2d or is_frozen_bn(bn):
        return (2,)
    if base is nn.BatchNorm3d:
        return (3,)
    return (1, 2, 3)
