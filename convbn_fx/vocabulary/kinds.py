"""Which modules are convolutions and norms, which the tracer keeps whole, and which it enters.

Folding rewrites `bn(conv(x))` from the modules' *attributes* (weight, stride, running_var...),
so a module kept whole as one call is only folded when its `forward` is the stock one. A
subclass that overrides `forward` (timm's BatchNormAct2d, Conv2dSame, StdConv2d) is instead
traced *through*: what its forward really computes (`F.batch_norm`, then drop and act;
`pad_same`, then `F.conv2d`; a standardised weight) is matched in the graph, so the real
forward decides, not the class name. `declare_safe` keeps a subclass whole anyway.

Norms whose forward is plain arithmetic on frozen buffers (torchvision's and timm's
FrozenBatchNorm2d, Hugging Face's `*FrozenBatchNorm2d`) are traced through too and matched by
what they compute (graph/affine.py), so no class needs declaring. `declare_frozen_norm` is
for one whose forward does not trace: it is kept whole and described by a `FrozenNorm`
entry (its eps, and the submodules run after normalising: the epilogue). A module holding
running statistics (`running_mean`, `running_var`) is what makes a tree worth tracing.
Third-party classes are recognised only once their package is imported (no dependency).
Functions can be declared too (`declare_leaf_function`): shape-dependent helpers such as
timm's `pad_same` stay one call in the trace and run for real.
"""

from __future__ import annotations

import numbers
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import ConvBNError

__all__ = ["CONV_TYPES", "LINEAR_TYPES", "BN_TYPES", "FrozenNorm", "conv_base", "bn_base",
           "declare_safe", "declare_leaf", "declare_frozen_norm", "frozen_norm", "is_frozen_bn",
           "is_plain", "is_linear", "keeps_whole", "block_types", "all_bn_types",
           "bn_spatial_dims", "has_hooks", "overrides_forward", "wrapper_types", "is_declared_leaf",
           "has_object_state", "declare_leaf_function", "leaf_functions", "holds_statistics"]

CONV_TYPES: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
LINEAR_TYPES: tuple[type, ...] = (nn.Linear,)
BN_TYPES: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# Methods whose override changes what the module computes from its attributes.
_FORWARD_METHODS = ("forward", "_conv_forward", "_check_input_dim")


@dataclass(frozen=True)
class FrozenNorm:
    """A norm computing `epilogue((x − running_mean)·weight/√(running_var+eps) + bias)`.

    The four tensors are buffers (or parameters) of those names and `eps` an attribute; the
    epilogue names submodules applied in order to the normalised output (timm: drop, act).
    """

    epilogue: tuple[str, ...] = ()
    eps: float | None = None        # None: the module's `eps` attribute
# Wrappers whose forward must run as written (it checkpoints or offloads its child): the
# tracer keeps them whole and the wrapped module is rewritten on its own.
_KNOWN_WRAPPERS = (("torch.distributed.algorithms._checkpoint.checkpoint_wrapper",
                    "ActivationWrapper"),)

_safe_classes: set[type] = set()
_leaf_classes: set[type] = set()
_frozen_classes: dict[type, FrozenNorm] = {}
_leaf_functions: set = set()


def _imported(known) -> dict[type, object]:
    found = {}
    for (module, name), value in known.items():
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found[cls] = value
    return found


def _frozen_norms() -> dict[type, FrozenNorm]:
    return dict(_frozen_classes)


def frozen_norm(module: nn.Module) -> FrozenNorm | None:
    """The FrozenNorm entry of the module's class (or a base), else None."""
    kinds = _frozen_norms()
    for cls in type(module).__mro__:
        if cls in kinds:
            return kinds[cls]
    return None


def is_frozen_bn(module: nn.Module) -> bool:
    return frozen_norm(module) is not None


def wrapper_types() -> tuple[type, ...]:
    """Wrappers whose forward must run as written (checkpointing): kept whole when tracing."""
    return tuple(_imported({k: None for k in _KNOWN_WRAPPERS}))


def all_bn_types() -> tuple[type, ...]:
    return BN_TYPES + tuple(_frozen_norms())


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
    """The stock BN class (or frozen norm) `module` is (or derives from), else None."""
    return _base(module, all_bn_types())


def overrides_forward(module: nn.Module, base: type) -> bool:
    """True when `module`'s class changes how `base` computes, and was not declared safe."""
    cls = type(module)
    if cls is base or any(c in _safe_classes for c in cls.__mro__):
        return False
    return any(getattr(cls, m, None) is not getattr(base, m, None) for m in _FORWARD_METHODS)


def is_plain(module: nn.Module) -> bool:
    """A conv, Linear or norm whose forward is its stock base's (or declared safe/frozen)."""
    if is_frozen_bn(module):
        return True
    base = conv_base(module) or bn_base(module)
    return base is not None and not overrides_forward(module, base)


def has_hooks(module: nn.Module) -> bool:
    """Forward or backward hooks: a traced graph would skip them unless the module is a call."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def has_object_state(module: nn.Module) -> bool:
    """True for a module a composable API holds state for by identity (`fully_shard`,
    composable `checkpoint`): only the object itself can be rewritten, never a copy."""
    composable = sys.modules.get("torch.distributed._composable_state")
    mapping = getattr(composable, "_module_state_mapping", None)
    return mapping is not None and module in mapping


def is_declared_leaf(module: nn.Module) -> bool:
    """Declared with `declare_leaf`, or a wrapper whose forward must run as written."""
    return isinstance(module, tuple(_leaf_classes) + wrapper_types())


def keeps_whole(module: nn.Module) -> bool:
    """Modules the tracer keeps as one call: plain block modules, declared leaves, wrappers
    that must run as written, and modules with hooks (which only run on a real call)."""
    return is_plain(module) or is_declared_leaf(module) or has_hooks(module)


def declare_safe(cls: type) -> type:
    """Keep a conv or BN subclass whole and fold it as its stock base class.

    Only for subclasses whose `forward` adds logging or checks and computes exactly what the
    stock module computes from the same attributes. Other subclasses need no declaration:
    their forward is traced and what it computes is matched.
    """
    if not isinstance(cls, type) or not issubclass(cls, CONV_TYPES + LINEAR_TYPES + BN_TYPES):
        raise ConvBNError(
            f"declare_safe expects a subclass of a torch conv, Linear or BatchNorm class, "
            f"got {cls.__name__ if isinstance(cls, type) else type(cls).__name__ + ' object'}; "
            "for other modules use convbn_fx.declare_leaf."
        )
    _safe_classes.add(cls)
    return cls


def declare_frozen_norm(cls: type | None = None, *, epilogue: tuple[str, ...] = (),
                        eps: float | None = None):
    """Declare a frozen batch-norm class whose forward does not trace (one that does is
    matched by what it computes, with no declaration).

    Its forward must compute `y = (x − running_mean)·weight/√(running_var+eps) + bias`
    per channel of an (N, C, ...) input, then apply the submodules named in `epilogue` in
    order (e.g. `("drop", "act")`). `eps` defaults to the module's `eps` attribute, else the
    one small float constant its forward's code holds (Hugging Face writes `epsilon = 1e-5`).
    Usable as `@declare_frozen_norm` or `declare_frozen_norm(Cls, epilogue=("act",))`.
    """
    def register(cls):
        if not isinstance(cls, type) or not issubclass(cls, nn.Module):
            raise ConvBNError(f"declare_frozen_norm expects an nn.Module subclass, got {cls!r}.")
        if not isinstance(epilogue, (tuple, list)) or not all(
                isinstance(e, str) for e in epilogue):
            raise ConvBNError("declare_frozen_norm's epilogue is a tuple of submodule names, "
                              f"got {epilogue!r}.")
        value = eps if eps is not None else _written_eps(cls)
        if value is not None and (not isinstance(value, numbers.Real) or isinstance(
                value, bool) or not 0 < value < 1):
            raise ConvBNError(f"declare_frozen_norm's eps is a small positive number, got "
                              f"{value!r}.")
        _frozen_classes[cls] = FrozenNorm(tuple(epilogue),
                                          None if value is None else float(value))
        return cls

    return register if cls is None else register(cls)


def _written_eps(cls: type) -> float | None:
    """The one small float constant in the class's forward, if it holds exactly one."""
    if "eps" in getattr(cls, "__annotations__", {}) or isinstance(getattr(cls, "eps", None),
                                                                    float):
        return None  # an attribute: read per module
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    consts = [c for c in (code.co_consts if code else ()) if isinstance(c, float) and 0 < c < 1e-2]
    return consts[0] if len(set(consts)) == 1 else None


def holds_statistics(module: nn.Module) -> bool:
    """A module with running statistics, as any batch norm has (frozen or not, stock or not)."""
    return all(isinstance(getattr(module, name, None), torch.Tensor)
               for name in ("running_mean", "running_var"))


def declare_leaf(cls: type) -> type:
    """Keep every module of class `cls` as one call when tracing, without tracing its forward.

    For user modules whose `forward` torch.fx cannot trace (data-dependent control flow) or
    must not inline. Blocks inside such a module are rewritten on their own, in the largest
    submodules that trace. Usable as a decorator.
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ConvBNError(f"declare_leaf expects an nn.Module subclass, got {cls!r}.")
    _leaf_classes.add(cls)
    return cls


def block_types() -> tuple[type, ...]:
    """The module kinds a block is made of: convs, Linear, and every BN kind."""
    return CONV_TYPES + LINEAR_TYPES + all_bn_types()


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


def declare_leaf_function(fn):
    """Keep calls of `fn` as single nodes when tracing (for shape-dependent helpers).

    `fn` must be a module-level function called by name (torch.fx's autowrap). Usable as a
    decorator.
    """
    if not callable(fn) or isinstance(fn, type):
        raise ConvBNError(f"declare_leaf_function expects a function, got {fn!r}; for a "
                          "module class use convbn_fx.declare_leaf.")
    _leaf_functions.add(fn)
    return fn


def leaf_functions() -> list:
    """Declared leaf functions, and those a model zoo declares (when it is imported)."""
    fns = list(_leaf_functions)
    fx = sys.modules.get("timm.layers._fx")
    if fx is not None:
        fns += fx.get_notrace_functions()
    padding = sys.modules.get("timm.layers.padding")
    if padding is not None:  # reads x.size() to pad like TensorFlow: a call, then a plain conv
        fns.append(padding.pad_same)
    return fns
