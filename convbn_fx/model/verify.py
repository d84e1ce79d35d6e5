"""A trace is checked before it is trusted: the traced graph against the module's own forward.

A symbolic trace can take the wrong branch without an error: `isinstance(proxy, Tensor)` is
False, `torch.jit.isinstance` likewise, so a skip connection guarded by such a test silently
disappears from the graph (MONAI's BasicUNet). So on the first call of every new input
signature, a rewritten module runs its traced graph, blocks unfolded (the template), and its
original forward on the same input, without gradients, with the same random numbers and with
its buffers restored afterwards; the two must agree exactly, as they run the same kernels.
Only then are its folded blocks used for that signature. Folding itself is exact by
construction (and tested against float64); what this guards is the trace.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

__all__ = ["call_key", "same_outputs", "isolated", "agree"]


def _leaf_key(value: Any):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__qualname__


def call_key(args: tuple, kwargs: dict) -> tuple | None:
    """The input signature of a call, or None for a call there are no values to compare in
    (being traced or compiled: Proxies, meta or fake tensors).

    The signature is what decides which graph a call may run: the tensors' shapes, dtypes and
    devices, and the values of plain arguments (a flag, a size). Computed on every call, so
    the common one (positional tensors only) skips the pytree.
    """
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return None
    if not kwargs and all(type(a) is torch.Tensor for a in args):
        leaves, spec = args, len(args)
    else:
        leaves, tree = pytree.tree_flatten((args, kwargs))
        spec = str(tree)
    for value in leaves:
        if isinstance(value, torch.fx.Proxy):
            return None
        if isinstance(value, torch.Tensor) and (value.device.type == "meta" or isinstance(
                value, torch._subclasses.FakeTensor)):
            return None
    return (spec,) + tuple(_leaf_key(v) for v in leaves)


def same_outputs(a: Any, b: Any) -> bool:
    """The same structure, and equal leaves (tensors equal up to a few ulps, NaN where NaN)."""
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec_a != spec_b or len(leaves_a) != len(leaves_b):
        return False
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if not isinstance(x, torch.Tensor):
            if x != y and not (x != x and y != y):  # NaN floats compare unequal to themselves
                return False
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point() or x.is_complex():
            if not torch.allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True):
                return False
        elif not torch.equal(x, y):
            return False
    return True


# A module's hooks: the check must not call them (a hook that records features would record
# the check's runs too), and runs both sides without them.
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@contextlib.contextmanager
def _no_hooks(module: nn.Module):
    saved = [(m, name, getattr(m, name)) for m in module.modules() for name in _HOOKS
             if getattr(m, name, None)]
    for m, name, hooks in saved:
        setattr(m, name, type(hooks)())
    try:
        yield
    finally:
        for m, name, hooks in saved:
            setattr(m, name, hooks)


@contextlib.contextmanager
def isolated(module: nn.Module, args: tuple, kwargs: dict, hooks: bool = False):
    """Run the body without gradients (and hooks, unless `hooks`), from one random state,
    leaving no trace on `module`: its buffers (BN's running statistics in training mode)
    are restored afterwards, and the random state is as it was before (the real call that
    follows draws the same masks)."""
    devices = sorted({t.device.index or 0 for t in pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    with torch.random.fork_rng(devices=devices), torch.no_grad(), \
            (contextlib.nullcontext() if hooks else _no_hooks(module)), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real call that follows warns what it warns
        state = torch.random.get_rng_state()
        cuda = [torch.cuda.get_rng_state(d) for d in devices]

        def rewind() -> None:
            torch.random.set_rng_state(state)
            for d, s in zip(devices, cuda):
                torch.cuda.set_rng_state(s, d)
            for buf, copy in saved:
                # Only what changed (BN in training mode): a copy bumps the version counter,
                # which would break the backward of a graph that saved the buffer.
                if not torch.equal(buf, copy):
                    buf.copy_(copy)

        try:
            yield rewind
        finally:
            rewind()


def _fresh(value: Any) -> Any:
    """A copy of the call's tensors: a forward that writes into its input must not change
    what the next run, or the real call, sees."""
    return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)


def agree(reference: Callable, traced: Callable, module: nn.Module, args: tuple,
          kwargs: dict) -> bool:
    """Whether `traced(*args, **kwargs)` computes what `reference` does on this input.

    Without hooks first; a module whose forward needs its hooks (Hugging Face captures
    hidden states with them) is compared with them, their side effects and all.
    """
    for hooks in (False, True):
        with isolated(module, args, kwargs, hooks) as rewind:
            try:
                want = reference(*_fresh(args), **_fresh(kwargs))
            except Exception:
                continue  # needs its hooks, or rejects this input (its own call will say so)
            rewind()
            try:
                got = traced(*_fresh(args), **_fresh(kwargs))
            except Exception:
                return False
            return same_outputs(want, got)
    return True
