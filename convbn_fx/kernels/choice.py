"""Tune or Eval, per call: the fold pays only where the conv output is large next to its weight.

Tune trades activation-sized work for weight-sized work (You et al., arXiv 2305.11624): it
drops BN's passes over the conv output (forward and backward) and the conv output kept for
BN's backward, and adds passes over the weight (`W·s` in forward and again in backward,
∂W = s·∂W', ∂s = Σ ∂W'·W) and a fixed cost per call (the autograd Function, the fold's small
per-channel ops). Which is cheaper depends on the sizes of one call, so a block that `auto`
lowered to Tune decides on every call, by a cost model counted in BN's output elements:

    Tune  iff  out ≥ WEIGHT_COST · weight + CALL_COST   (faster)
          or   out ≥ KEEP_LIMIT, with autograd on        (Eval would keep ≥ 1 MiB for backward)

else Eval: the block unfolded, conv then BN with running statistics. Past KEEP_LIMIT the conv
itself is large next to Tune's extra work, so Tune costs little time there and keeps what
Deploy keeps. Both paths compute what Eval computes; the choice changes speed and memory,
never the answer. Under torch.compile the shapes are static and Dynamo specialises the branch
like any other shape check.

The last choice of each block is kept for `describe()`: a TunedGraphModule's forward opens
a store (`recording`), the kernels write `(tuned, output elements, weight elements)` into it
under the block's name, and nothing is recorded while compiling or outside such a forward.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import torch

__all__ = ["WEIGHT_COST", "CALL_COST", "KEEP_LIMIT", "tune_pays", "conv_output_numel",
           "recording", "record", "Choice", "explain"]

# The cost model's constants, in conv output elements (BN's forward and backward over one
# element cost 1). Single conv→BN blocks timed on a 2-core EPYC, one thread, Tune against Eval
# (forward + backward): Tune's passes cost 1-4 BN output elements per weight element (more
# once the weight leaves the cache) and ~110 µs per call, BN ~0.9 ns per output element.
# bench/crossover.py checks the rule over a grid of models and sizes (bench/RESULTS.md).
WEIGHT_COST = 3.0
CALL_COST = 2 ** 17
KEEP_LIMIT = 2 ** 18    # 1 MiB of float32

Choice = tuple[bool, int, int, bool]   # (took Tune, output elements, weight elements, autograd)

_STORE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("convbn_fx_paths",
                                                                      default=None)


def tune_pays(out_numel: int, weight_numel: int, grad: bool) -> bool:
    """Tune for a call whose conv output has `out_numel` elements, else Eval (module doc)."""
    return out_numel >= WEIGHT_COST * weight_numel + CALL_COST or \
        (grad and out_numel >= KEEP_LIMIT)


def conv_output_numel(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int], transposed: bool,
                      output_padding: Sequence[int], groups: int,
                      pre_pad: Sequence[int] | None = None) -> int:
    """Elements of `torch.convolution`'s output for a batched input, from the shapes alone
    (a one-element `dilation` or `output_padding` holds for every dimension)."""
    xs, ws = x.shape, weight.shape
    out = xs[0] * (ws[1] * groups if transposed else ws[0])
    dims = len(xs) - 2
    for i in range(dims):
        size = xs[2 + i]
        if pre_pad is not None:  # F.pad amounts: the last dim first, (before, after) pairs
            j = 2 * (dims - 1 - i)
            size += pre_pad[j] + pre_pad[j + 1]
        span = dilation[i if len(dilation) > 1 else 0] * (ws[2 + i] - 1)
        if transposed:
            extra = output_padding[i if len(output_padding) > 1 else 0]
            out *= (size - 1) * stride[i] - 2 * padding[i] + span + extra + 1
        else:
            out *= (size + 2 * padding[i] - span - 1) // stride[i] + 1
    return out


@contextlib.contextmanager
def recording(store: dict) -> Iterator[None]:
    """Record each block's choice into `store` (name -> Choice) while the body runs."""
    token = _STORE.set(store)
    try:
        yield
    finally:
        _STORE.reset(token)


def record(name: str, tuned: bool, out_numel: int, weight_numel: int, grad: bool) -> None:
    """Note one block's choice for `describe()`, where a forward is recording."""
    store = _STORE.get()
    if store is not None and not torch.compiler.is_compiling():
        store[name] = (tuned, out_numel, weight_numel, grad)


def explain(choice: Choice) -> str:
    """The choice in one sentence, as `describe()` gives it."""
    tuned, out, weight, grad = choice
    if out < 0:
        return "an unbatched input: the block runs unfolded, as its modules compute it"
    cost = WEIGHT_COST * weight + CALL_COST
    sizes = f"conv output {out:,} elements, weight {weight:,}"
    if out >= cost:
        return f"{sizes}: Tune's cost ({cost:,.0f}, in BN output elements) is below BN's"
    if tuned:
        return f"{sizes}: Tune, since Eval would keep ≥ {KEEP_LIMIT:,} elements for backward"
    return f"{sizes}: Eval, Tune's cost ({cost:,.0f}, in BN output elements) is above BN's"
