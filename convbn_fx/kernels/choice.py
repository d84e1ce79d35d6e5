"""Tune or Eval, per call: the fold pays only where the conv output is large next to its weight.

Tune trades activation-sized work for weight-sized work (You et al., arXiv 2305.11624): it
drops BN's passes over the conv output (forward and backward) and the conv output kept for
BN's backward, and adds passes over the weight (`W·s` in forward and again in backward,
∂W = s·∂W', ∂s = Σ ∂W'·W). Which is cheaper depends on the sizes of one call, so a block that
`auto` lowered to Tune decides on every call: Tune when the conv output has at least
`TUNE_PAYS_AT` elements per weight element, else Eval (the block unfolded: conv, then BN
with running statistics). Both compute what Eval computes; the choice changes speed and
memory, never the answer. Under torch.compile the shapes are static and Dynamo specialises
the branch like any other shape check.

The last choice of each block is kept for `describe()`: a TunedGraphModule's forward opens
a store (`recording`), the kernels write `(tuned, output elements, weight elements)` into it
under the block's name, and nothing is recorded while compiling or outside such a forward.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import torch

__all__ = ["TUNE_PAYS_AT", "TUNE_PAYS_AT_INFERENCE", "tune_pays", "conv_output_numel",
           "recording", "record", "Choice", "explain"]

# Conv output elements per weight element from which Tune's step is faster than Eval's:
# measured by bench/crossover.py (see its section of bench/RESULTS.md).
TUNE_PAYS_AT = 1.0
# The same without autograd: only `W·s` in forward against BN's one forward pass.
TUNE_PAYS_AT_INFERENCE = 1.0

Choice = tuple[bool, int, int]   # (took Tune, conv output elements, weight elements)

_STORE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("convbn_fx_paths",
                                                                      default=None)


def tune_pays(out_numel: int, weight_numel: int) -> bool:
    """Tune for a call whose conv output has `out_numel` elements, else Eval."""
    ratio = TUNE_PAYS_AT if torch.is_grad_enabled() else TUNE_PAYS_AT_INFERENCE
    return out_numel >= ratio * weight_numel


def conv_output_numel(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int], transposed: bool,
                      output_padding: Sequence[int], groups: int,
                      pre_pad: Sequence[int] | None = None) -> int:
    """Elements of `torch.convolution`'s output for a batched input, from the shapes alone."""
    sizes = list(x.shape[2:])
    if pre_pad is not None:  # F.pad amounts: the last dim first, (before, after) pairs
        for i in range(len(pre_pad) // 2):
            sizes[-1 - i] += pre_pad[2 * i] + pre_pad[2 * i + 1]
    kernel = weight.shape[2:]
    out = x.shape[0] * (weight.shape[1] * groups if transposed else weight.shape[0])
    for i, size in enumerate(sizes):
        span = dilation[i] * (kernel[i] - 1)
        if transposed:
            out *= (size - 1) * stride[i] - 2 * padding[i] + span + output_padding[i] + 1
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


def record(name: str, tuned: bool, out_numel: int, weight_numel: int) -> None:
    """Note one block's choice for `describe()`, where a forward is recording."""
    store = _STORE.get()
    if store is not None and not torch.compiler.is_compiling():
        store[name] = (tuned, out_numel, weight_numel)


def explain(choice: Choice) -> str:
    """The choice in one sentence, as `describe()` gives it."""
    tuned, out, weight = choice
    if out < 0:
        return "an unbatched input: the block runs unfolded, as its modules compute it"
    ratio = out / weight if weight else float("inf")
    side = "≥" if tuned else "<"
    pays = "folding costs less than BN's passes over it" if tuned else \
        "Tune's passes over the weight would cost more than BN's over the output"
    return f"conv output {out:,} elements = {ratio:.2g}× the weight's {weight:,} " \
           f"({side} {TUNE_PAYS_AT:g}×): {pays}"
