"""`measure --estimate`: the same tracked step on fake tensors, at any batch, in seconds.

The question users have is a GPU one (what does Tune save at my batch on my 24 GB card?) and
a CPU cannot run resnet50 at batch 256 in useful time or memory. It need not: under
`FakeTensorMode` every op computes only its output's shape, dtype and strides, and MemTracker
(tensor_peak.py) counts the storages it would have allocated, so the peak of the fake step is
the real step's to the byte, with no compute and no memory of that size. (But for one thing:
tune_mode caches the folded weight of a frozen block between calls, and refolds a fake one
on every call, so the estimate lacks those cached weights.)

The model is rewritten for real first (tune_mode and deploy_mode run exactly as for a user;
deploy_mode deep-copies, which crashes on a model built from fake tensors), then a deep copy
has its parameters, buffers and other tensor attributes swapped for fakes.

    peak = estimate_peak(tune_mode(model), (256, 3, 224, 224))   # bytes by category
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    UnsupportedOperatorException,
    is_fake,
)
from torch.utils._pytree import tree_leaves, tree_map_only

from ..vocabulary.errors import ConvBNError, exception_summary
from .steps import training_step
from .tensor_peak import tensor_peak

__all__ = ["fake_copy", "estimate_peak", "check_input", "WHAT_IT_MODELS"]

WHAT_IT_MODELS = ("tensor memory only: not the CUDA caching allocator's reserve and "
                  "fragmentation, cuDNN/cuBLAS workspaces, the CUDA context, or scratch a "
                  "kernel frees within one op")


def fake_copy(net: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """A deep copy of `net` whose tensors are fakes of `mode`: same shapes, dtypes, strides,
    devices and requires_grad, no data. A tensor shared in `net` stays shared in the copy."""
    net = copy.deepcopy(net)
    fakes: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor, parameter: bool = False) -> torch.Tensor:
        if is_fake(t):
            return t
        if id(t) not in fakes:
            f = mode.from_tensor(t.detach())
            fakes[id(t)] = nn.Parameter(f, requires_grad=t.requires_grad) if parameter else f
        return fakes[id(t)]

    for m in net.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = fake(p, parameter=True)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = fake(b)
    # Plain tensor attributes too (graph constants, torchvision's AnchorGenerator.cell_anchors
    # list): a real tensor meeting a fake one in an op is an error.
    for m in net.modules():
        for name, value in list(vars(m).items()):
            if name in ("_parameters", "_buffers", "_modules") or \
                    not isinstance(value, (torch.Tensor, list, tuple, dict)):
                continue
            if any(isinstance(t, torch.Tensor) and not is_fake(t) for t in tree_leaves(value)):
                object.__setattr__(m, name, tree_map_only(torch.Tensor, fake, value))
    return net


def estimate_peak(net: nn.Module, shape: Sequence[int], train: bool = True,
                  spec: str = "the model") -> dict[str, int]:
    """`tensor_peak` of `net`'s step on a fake input of `shape`, on `net`'s device.

    Args:
        net: a real module (rewritten already); it is copied, not changed.
        shape: the input shape, any size: nothing of that size is allocated.
        train: a training step (as `steps.training_step`), else an inference step.
        spec: names the model in error sentences.
    Raises:
        ConvBNError: the model runs an operation fake tensors cannot (nonzero, nms, `.item()`:
        output sizes that depend on the data). Other errors are raised as the model raises
        them; `check_input` turns a shape the model rejects into a sentence first.
    """
    mode = FakeTensorMode()
    fake = fake_copy(net, mode)
    try:
        with mode:
            x = torch.empty(tuple(shape), device=_device(net))
            return tensor_peak(training_step(fake, x, train), fake, x)
    except _fake_limits() as exc:
        raise _cannot_estimate(spec, exc) from None


def check_input(model: nn.Module, shape: Sequence[int], spec: str) -> None:
    """Fail with a sentence when the unrewritten `model` rejects a fake input of `shape`
    (no-grad forward on fake tensors): before any variant runs, so a variant's error is ours."""
    mode = FakeTensorMode()
    fake = fake_copy(model, mode)
    try:
        with mode, torch.no_grad():
            fake(torch.empty(tuple(shape), device=_device(model)))
    except _fake_limits() as exc:
        raise _cannot_estimate(spec, exc) from None
    except Exception as exc:
        raise ConvBNError(f"{spec} does not accept an input of shape "
                          f"{'x'.join(map(str, shape))} ({exception_summary(exc)}).") from None


def _device(net: nn.Module) -> torch.device:
    return next((t.device for t in net.parameters()), torch.device("cpu"))


def _fake_limits() -> tuple[type[BaseException], ...]:
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return (DataDependentOutputException, DynamicOutputShapeException,
            GuardOnDataDependentSymNode, UnsupportedOperatorException)


def _cannot_estimate(spec: str, exc: BaseException) -> ConvBNError:
    func = getattr(exc, "func", None)
    op = type(exc).__name__ if func is None else str(func)
    if isinstance(exc, UnsupportedOperatorException):
        why = f"runs {op}, which has no fake-tensor implementation"
    else:
        why = (f"runs an operation whose output size depends on the data ({op}; nonzero, nms, "
               ".item() and the like), which fake tensors cannot run")
    return ConvBNError(f"{spec} {why}, so its memory cannot be estimated; measure it without "
                       "--estimate.")
