"""One mode of one model, for measuring: the model, its variants, a training step.

`convbn-fx measure`, its fresh peak-memory processes and bench/ build and run the variants
the same way: the model SPEC names with random non-identity BN statistics, in a state;
`eval` (the unrewritten computation), `tune` (what a user writes, `tune_mode(model)`) and
`deploy` (`deploy_mode`); one step, as TRAINING_STEP says: the gradients are set to None
before the forward, as `zero_grad()` does by default, so none from an earlier step is alive.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, Sequence

import torch
import torch.fx
import torch.nn as nn

from ..frontends.deploy_mode import deploy_mode
from ..frontends.tune import describe, tune_mode
from ..model.tree import has_blocks_inside
from ..vocabulary.errors import ConvBNError, exception_summary
from ..vocabulary.kinds import all_bn_types, holds_statistics
from .options import STATES
from .specs import build_model
from .testing import output_tensors, randomize_bn, saved_tensor_bytes

__all__ = ["MODES", "MEASURE_STATES", "TRAINING_STEP", "check_modes", "check_device",
           "prepared_model", "make_variant", "block_counts",
           "loss_of", "example_input", "training_step", "saved_bytes", "is_out_of_memory",
           "out_of_memory", "compiling", "outputs"]

MODES = ("eval", "tune", "deploy")
MEASURE_STATES = ("finetune", "frozen")    # of options.STATES: a training step, or inference
# What `training_step` runs, in words, for the tables and JSON.
TRAINING_STEP = ("optimizer.zero_grad(set_to_none=True), forward, loss = sum of the outputs' "
                 "means, backward, SGD step (lr=0)")


def check_modes(modes: Sequence[str]) -> tuple[str, ...]:
    """The modes to measure, in order; Eval, the reference every ratio is taken against,
    always and first."""
    for mode in modes:
        if mode not in MODES:
            raise ConvBNError(f"unknown mode {mode!r}; measure knows {', '.join(MODES)}.")
    return ("eval",) + tuple(m for m in MODES if m in modes and m != "eval")


def check_device(device: str) -> torch.device:
    """`device` as a torch.device, or a sentence: not cpu or cuda, or no CUDA here."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConvBNError(f"unknown device {device!r}; use cpu or cuda.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "is built without CUDA" if torch.version.cuda is None else "finds no GPU"
        raise ConvBNError(f"CUDA is not available: torch {torch.__version__} {why} here; "
                          "measure on cpu instead.")
    if dev.type not in ("cpu", "cuda"):
        raise ConvBNError(f"measure runs on cpu or cuda, not {dev.type}.")
    return dev


def prepared_model(spec: str, state: str = "finetune") -> nn.Module:
    """The model SPEC names, with random non-identity BN statistics, in `state`.

    Random BN statistics make the output difference a real check (an identity BN hides a
    wrong fold); the seed is fixed so a fresh process builds the same model.
    """
    torch.manual_seed(0)
    return STATES[state](randomize_bn(build_model(spec)))


def make_variant(model: nn.Module, mode: str) -> nn.Module:
    """`model` in `mode`: eval and tune share its parameters, deploy has folded copies.

    tune is what a user writes, `tune_mode(model)` (auto: Tune for trained blocks, Deploy for
    frozen ones); deploy is `deploy_mode`, BN folded into new conv weights and removed.
    """
    if mode not in MODES:
        raise ConvBNError(f"unknown mode {mode!r}; measure knows {', '.join(MODES)}.")
    if not has_blocks_inside(model):  # nothing to rewrite: do not ask torch.fx to trace it
        return model
    if mode == "deploy":
        return deploy_mode(model)
    return tune_mode(model, "eval" if mode == "eval" else "auto")


_BN_FUNCTIONS = (torch.nn.functional.batch_norm, torch.batch_norm)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, all_bn_types()) or holds_statistics(module)


def _count_bn(model: nn.Module) -> int:
    """Norm layers `model` still runs: in its traced graphs, the norm calls, batch_norm
    functions and the running variances a traced-through frozen norm's arithmetic still
    reads; elsewhere, norm modules. (A folded timm BatchNormAct2d stays in the tree as the
    parent of its act, but nothing calls it.)"""
    count, in_graphs = 0, set()
    for m in model.modules():
        if isinstance(m, torch.fx.GraphModule):
            for n in m.graph.nodes:
                if n.op == "call_function":
                    count += n.target in _BN_FUNCTIONS
                elif n.op == "call_module":
                    count += _is_norm(m.get_submodule(n.target))
                elif n.op == "get_attr" and n.target.endswith("running_var"):
                    count += not any(u.target in _BN_FUNCTIONS for u in n.users)
            in_graphs.update(id(s) for s in m.modules() if s is not m)
    return count + sum(_is_norm(m) and id(m) not in in_graphs for m in model.modules())


def block_counts(model: nn.Module, variant: nn.Module, mode: str) -> dict[str, int]:
    """Blocks per lowering of a tune_mode variant; for deploy, the BN layers folded away."""
    if mode == "deploy":
        return {"folded": _count_bn(model) - _count_bn(variant)}
    if variant is model:
        return {}
    counts = Counter(b.lowering.value if b.lowering else "skipped" for b in describe(variant))
    return dict(counts.most_common())


def loss_of(out) -> torch.Tensor:
    """A scalar to call backward on: the sum of the means of every floating output."""
    return sum(t.float().mean() for t in output_tensors(out) if t.is_floating_point())


def example_input(shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(tuple(shape), generator=gen).to(device)


def training_step(model: nn.Module, x: torch.Tensor, train: bool = True) -> Callable[[], None]:
    """One forward + backward + SGD step of `model` on `x` (a no-grad forward if not `train`).

    SGD runs with lr=0: the optimizer's work is done, but the weights stay as they were, so
    every mode and every batch size of a sweep sees the same model.
    """
    if not train:
        def infer():
            with torch.no_grad():
                model(x)
        return infer
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0) if params else None

    def step():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss = loss_of(model(x))
        if loss.requires_grad:
            loss.backward()
        if opt is not None:
            opt.step()
    return step


def saved_bytes(model: nn.Module, x: torch.Tensor, train: bool = True) -> int:
    """Bytes autograd keeps for backward in one step (`testing.saved_tensor_bytes`)."""
    if not train or not any(p.requires_grad for p in model.parameters()):
        return 0
    n = saved_tensor_bytes(lambda: loss_of(model(x)))
    for p in model.parameters():
        p.grad = None
    return n


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure (CUDA, or the CPU allocator), not for other errors."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or
                                              "can't allocate memory" in text)


def compiling(compile: bool):
    """Where torch.compile is used, dropout draws eager's random numbers, so outputs compare."""
    if not compile:
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(fallback_random=True)


def out_of_memory(exc: BaseException) -> str:
    return f"out of memory ({exception_summary(exc)})"


def _same_randomness(device: torch.device):
    """Same dropout / drop-path masks in every forward: fork the RNG and seed it."""
    devices = [device.index or 0] if device.type == "cuda" else []
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=devices))
    torch.manual_seed(0)
    return stack


def outputs(model: nn.Module, x: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    with _same_randomness(device), torch.no_grad():
        return [t for t in output_tensors(model(x)) if t.is_floating_point()]
