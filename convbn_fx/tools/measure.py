"""`measure`: what Eval, Tune and Deploy cost on one model, at one input size or a batch sweep.

A user deciding whether to adopt Tune mode asks how much memory and time it saves on *their*
model at *their* input size, before changing a line of training code. This builds the model
from a SPEC (as `convbn-fx report` does), puts it in the state it will run in and, for each
mode, runs one training step (inference for the frozen state): the bytes autograd keeps for
backward (deterministic), the step's peak memory in a fresh process, the median step time over
interleaved steps, the rewrite counts and the largest output difference to the unrewritten
model. `convbn-fx measure` prints the result; bench/ builds on the same functions.

    m = measure("resnet50", [(8, 3, 224, 224)])
    m.inputs[0].ratio("tune", "saved_bytes")     # about 0.55
"""

from __future__ import annotations

import gc
import logging
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..vocabulary.errors import ConvBNError, exception_summary
from .figures import InputResult, Measurement, ModeFigures
from .meters import interleaved_medians, machine
from .peak import peak_memory
from .steps import (
    MEASURE_STATES,
    MODES,
    block_counts,
    compiling,
    example_input,
    is_out_of_memory,
    make_variant,
    out_of_memory,
    outputs,
    prepared_model,
    saved_bytes,
    training_step,
)

__all__ = ["measure", "MODES", "MEASURE_STATES"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], object]   # (steps done, steps in all, what runs now)


def _check_device(device: str) -> torch.device:
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


def _check_args(state: str, modes: Sequence[str], steps: int,
                shapes: Sequence[Sequence[int]]) -> tuple[str, ...]:
    if state not in MEASURE_STATES:
        raise ConvBNError(f"unknown state {state!r}; measure knows {', '.join(MEASURE_STATES)}.")
    for mode in modes:
        if mode not in MODES:
            raise ConvBNError(f"unknown mode {mode!r}; measure knows {', '.join(MODES)}.")
    if steps < 1:
        raise ConvBNError(f"steps must be 1 or more, got {steps}.")
    if not shapes or any(not s or min(s) < 1 for s in shapes):
        raise ConvBNError("every input shape needs one or more sizes, each 1 or more.")
    # Eval is the reference every ratio is taken against: always measured, always first.
    return ("eval",) + tuple(m for m in MODES if m in modes and m != "eval")


def _probe(model: nn.Module, x: torch.Tensor, spec: str, device: torch.device):
    """The unrewritten model's outputs on `x`; ConvBNError when the model rejects `x`."""
    shape = "x".join(map(str, x.shape))
    try:
        outs = outputs(model, x, device)
    except Exception as exc:
        if is_out_of_memory(exc):
            return None, out_of_memory(exc)
        raise ConvBNError(f"{spec} does not accept an input of shape {shape} "
                          f"({exception_summary(exc)}).") from None
    if not outs:
        raise ConvBNError(f"{spec} returns no floating-point tensor on an input of shape "
                          f"{shape}, so there is no loss to train it with.")
    return outs, None


class _StepCount:
    """Steps done of all the steps a measurement runs, reported to a progress callback."""

    def __init__(self, total: int, progress: Progress | None):
        self.done, self.total, self.progress = 0, total, progress

    def advance(self, what: str, n: int = 1) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total, what)


def _untimed(f: ModeFigures, net: nn.Module, x: torch.Tensor, reference: list[torch.Tensor],
             train: bool, device: torch.device, advance: Callable[[str], None]) -> None:
    """The output check and saved bytes of one mode; out of memory is recorded in `f`."""
    try:
        outs = outputs(net, x, device)
        f.max_abs_diff = max((float((o - r).abs().max()) if o.numel() else 0.0
                              for o, r in zip(outs, reference)), default=0.0)
        advance("output check")
        f.saved_bytes = saved_bytes(net, x, train)
        advance("saved bytes")
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        f.error = out_of_memory(exc)
    gc.collect()  # the traceback of an out-of-memory error holds tensors


def _time_steps(nets: dict[str, nn.Module], figs: dict[str, ModeFigures], x: torch.Tensor,
                train: bool, steps: int, after: Callable[[str], object]) -> None:
    """Median step time of every mode not failed yet; an out-of-memory step fails its mode."""
    failed: dict[str, str] = {}

    def guarded(mode: str, step: Callable[[], None]) -> Callable[[], None]:
        def run():
            if mode in failed:
                return
            try:
                step()
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                failed[mode] = out_of_memory(exc)
        return run

    runs = {m: guarded(m, training_step(nets[m], x, train))
            for m, f in figs.items() if f.error is None}
    times = interleaved_medians(runs, repeats=steps, warmup=1, after=after)
    for mode, seconds in times.items():
        if mode in failed:
            figs[mode].error = failed[mode]
        else:
            figs[mode].step_s = seconds


def measure(spec: str, shapes: Sequence[Sequence[int]], *, state: str = "finetune",
            modes: Sequence[str] = MODES, device: str = "cpu", compile: bool = False,
            steps: int = 5, peak: bool = True, progress: Progress | None = None
            ) -> Measurement:
    """Measure each mode of the model SPEC names at each input shape.

    Args:
        spec: as for `convbn-fx report`: a torchvision name, `timm/NAME` or
            `package.module:callable`; a SPEC, not a module, so a fresh process can build
            the same model for the peak-memory figure.
        shapes: input shapes, e.g. `[(8, 3, 224, 224)]`; several for a batch sweep.
        state: "finetune" (train mode, BN frozen: one SGD step) or "frozen" (inference).
        modes: any of "eval", "tune", "deploy"; Eval, the reference, is always measured.
        device: "cpu" or "cuda". compile: wrap every variant in `torch.compile`.
        steps: timed steps per mode, interleaved, after one warm-up step each.
        peak: measure peak memory in a fresh process per mode (a few seconds each).
        progress: called as `progress(done, total, what)` after every step.
    Returns:
        A `Measurement`. An out-of-memory error is recorded for its mode and input, and the
        run goes on; bad input (an unknown SPEC, a model that rejects the shape, no CUDA)
        raises ConvBNError.
    """
    order = _check_args(state, modes, steps, shapes)
    dev = _check_device(device)
    with compiling(compile):
        return _measure(spec, shapes, order, state, dev, compile, steps, peak, progress)


def _measure(spec: str, shapes: Sequence[Sequence[int]], order: tuple[str, ...], state: str,
             dev: torch.device, compile: bool, steps: int, peak: bool,
             progress: Progress | None) -> Measurement:
    train = state == "finetune"
    model = prepared_model(spec, state).to(dev)
    nets, counts = {}, {}
    for mode in order:
        variant = make_variant(model, mode)
        counts[mode] = block_counts(model, variant, mode)
        nets[mode] = torch.compile(variant) if compile else variant
    per_mode = 2 + int(peak) + 1 + steps      # output check, saved bytes, peak, warm-up, steps
    count = _StepCount(len(shapes) * len(order) * per_mode, progress)
    inputs = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        where = f"batch {shape[0]}, " if len(shapes) > 1 else ""
        x = example_input(shape, dev)
        figs = {m: ModeFigures(m, counts[m]) for m in order}
        reference, error = _probe(model, x, spec, dev)
        for mode in order:
            f, start = figs[mode], count.done
            f.error = error
            if f.error is None:
                _untimed(f, nets[mode], x, reference, train, dev,
                         lambda what: count.advance(f"{where}{mode}: {what}"))
            if peak and f.error is None:
                f.peak_mib, f.error = peak_memory(spec, mode, shape, state, str(dev), compile)
                count.advance(f"{where}{mode}: peak memory")
            if f.error is not None:  # nothing more to measure in this mode, not timed either
                count.advance(f"{where}{mode}: skipped", start + per_mode - count.done)
        _time_steps(nets, figs, x, train, steps, lambda m: count.advance(f"{where}{m}: timing"))
        for net in nets.values():
            for p in net.parameters():
                p.grad = None
        del x, reference
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        for f in figs.values():
            if f.error:
                log.info("%s at input %s, %s: %s", spec, shape, f.mode, f.error)
        inputs.append(InputResult(shape, figs))
    return Measurement(spec, type(model).__name__, state, str(dev), compile, steps,
                       ("cuda_max_allocated" if dev.type == "cuda" else "rss_growth")
                       if peak else None, machine(), inputs)
