"""The exact peak of a step: the tensor memory alive at its highest point, by category.

A process's resident set is a poor meter on a shared machine: the allocator keeps freed pages,
other threads touch memory, and two identical runs differ by tens of percent. What a user's
GPU must hold is the tensors alive at the step's peak, and torch counts those itself:
`torch.distributed._tools.mem_tracker.MemTracker` is a dispatch mode that sees every storage
every aten op creates, files it as a parameter, buffer, gradient, optimizer state, activation
(made in forward) or temporary (made in backward), and keeps the highest total after any op.
The same bytes come back on every run, and on fake tensors (fake.py) without real memory.

What it does not see: scratch a kernel allocates and frees inside one op (oneDNN, cuDNN
workspaces), the CUDA caching allocator's reserve and fragmentation, the CUDA context.

    peak = tensor_peak(training_step(net, x), net, x)
    peak["total"], peak["activations"]          # bytes
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..vocabulary.errors import ConvBNError

__all__ = ["CATEGORIES", "TRACKED_STEPS", "tensor_peak", "step_growth"]

# Our name for each MemTracker category (its snapshot keys are these strings). "Other" is what
# was alive before the step and is none of the rest: the input batch (see tensor_peak).
CATEGORIES = {"parameters": "Parameter", "buffers": "Buffer", "gradients": "Gradient",
              "optimizer": "Optstate", "activations": "Activation", "temporaries": "Temp",
              "input": "Other"}
# Steps under one tracker; the peak is the highest of them. One is enough for measure's step:
# gradients are None at its start, SGD with lr=0 keeps no state, and the folded weights
# tune_mode caches for frozen blocks are made during it (a test checks that a second step
# peaks at the same bytes). A stateful optimizer's state appears only in a second step.
TRACKED_STEPS = 1


class _NoHook:
    def remove(self) -> None:
        pass


def _tracker(net: nn.Module, x: torch.Tensor):
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as exc:
        raise ConvBNError(f"exact peaks need torch.distributed's MemTracker, which torch "
                          f"{torch.__version__} does not provide here ({exc}); pass "
                          "--no-peak.") from None
    tracker = MemTracker()
    # MemTracker hooks the gradient of every parameter of every module it sees run, and
    # register_hook raises on a frozen parameter (torch 2.5-2.14). Marking frozen ones as
    # hooked already (its own bookkeeping; remove() of these handles does nothing) skips them.
    hooked = getattr(tracker, "_param_to_grad_hook_handles", None)
    if hooked is None:
        raise ConvBNError(f"torch {torch.__version__}'s MemTracker changed in a way convbn_fx "
                          "does not know; pass --no-peak, or report it.")
    for p in net.parameters():
        if not p.requires_grad:
            hooked[p] = (_NoHook(), _NoHook())
    # Tensors made before the tracker is entered are seen only if named here.
    tracker.track_external(net, x)
    return tracker


def tensor_peak(step: Callable[[], object], net: nn.Module, x: torch.Tensor,
                steps: int = TRACKED_STEPS) -> dict[str, int]:
    """Bytes alive at the peak of `steps` calls of `step`, by category, and their "total".

    Args:
        step: one step of `net` on `x` (`steps.training_step`).
        net: the module `step` runs; its parameters and buffers exist before the step.
        x: the input; counted as "input" (it is on the device for the whole step).
        steps: calls under one tracker; later ones see the state earlier ones leave.
    Returns:
        {"parameters": bytes, ..., "input": bytes, "total": bytes}; the categories add up to
        the total. Tensors `net` holds that are neither parameters nor buffers (and made before
        the step) are not counted.
    """
    tracker = _tracker(net, x)
    with tracker:
        for i in range(steps):
            if i:
                tracker.reset_mod_stats()   # MemTracker refuses a second root call otherwise
            step()
    snapshot = tracker.get_tracker_snapshot("peak")   # {device: {category or "Total": bytes}}
    peak = {name: sum(int(per.get(key, 0)) for per in snapshot.values())
            for name, key in CATEGORIES.items()}
    peak["total"] = sum(int(per["Total"]) for per in snapshot.values())
    return peak


def step_growth(peak: dict[str, int]) -> int:
    """The peak less what exists before the step (parameters, buffers, input): what
    `torch.cuda.max_memory_allocated() - memory_allocated()` around the step reports, the
    convention of PyTorch PR #108757."""
    return peak["total"] - peak["parameters"] - peak["buffers"] - peak["input"]
