"""`measure`: what Eval, Tune and Deploy cost on one model, at one input size or a batch sweep.

A user deciding whether to adopt Tune mode asks how much memory and time it saves on *their*
model at *their* input size, before changing a line of training code. This builds the model
from a SPEC (as `convbn-fx report` does), puts it in the state it will run in and, for each
mode, runs training steps (inference for the frozen state): the bytes autograd keeps for
backward, the tensor memory alive at the step's peak by category (tensor_peak.py; the same
bytes every run), every step's time over interleaved steps, the rewrite counts and the
largest output difference to the unrewritten model. With `estimate=True` only the peak is
taken, on fake tensors (fake.py): any batch, in seconds. `convbn-fx measure` prints the
result; `fit.py` searches the largest batch that fits; bench/ builds on the same functions.

    m = measure("resnet50", [(8, 3, 224, 224)])
    m.inputs[0].ratio("tune", "peak_bytes")      # about 0.63
"""

from __future__ import annotations

import copy
import gc
import logging
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..vocabulary.errors import ConvBNError, exception_summary
from .fake import check_input, estimate_peak
from .figures import InputResult, Measurement, ModeFigures
from .meters import interleaved_times, machine
from .peak import PEAK_STEPS, peak_memory
from .steps import (
    MEASURE_STATES,
    MODES,
    block_counts,
    compiling,
    example_input,
    check_device,
    check_modes,
    is_out_of_memory,
    make_variant,
    out_of_memory,
    outputs,
    prepared_model,
    saved_bytes,
    training_step,
)
from .tensor_peak import tensor_peak

__all__ = ["measure", "build_variants", "Phases", "Progress", "MODES", "MEASURE_STATES",
           "PEAK_STEPS"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], object]   # (phases done, phases in all, what starts now)


def _check_args(state: str, steps: int, shapes: Sequence[Sequence[int]], estimate: bool,
                compile: bool, peak: bool, process_peak: bool | None) -> None:
    if state not in MEASURE_STATES:
        raise ConvBNError(f"unknown state {state!r}; measure knows {', '.join(MEASURE_STATES)}.")
    if steps < 1:
        raise ConvBNError(f"steps must be 1 or more, got {steps}.")
    if not shapes or any(not s or min(s) < 1 for s in shapes):
        raise ConvBNError("every input shape needs one or more sizes, each 1 or more.")
    if estimate and compile:
        raise ConvBNError("--estimate runs the eager step on fake tensors and cannot see what "
                          "torch.compile's generated code allocates; drop --compile or "
                          "--estimate.")
    if estimate and not peak:
        raise ConvBNError("--estimate estimates the peak, and --no-peak skips it; pass one of "
                          "them.")
    if estimate and process_peak:
        raise ConvBNError("--process-peak runs each mode in a real process, --estimate on fake "
                          "tensors; pass one of them.")


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


class Phases:
    """A run's phases, announced to a progress callback as each one starts."""

    def __init__(self, total: int, progress: Progress | None):
        self.done, self.total, self.progress = 0, total, progress

    def begin(self, what: str) -> None:
        self.total = max(self.total, self.done + 1)
        if self.progress is not None:
            self.progress(self.done, self.total, what)
        self.done += 1

    def skip(self, n: int) -> None:
        self.done += n

    def finish(self) -> None:
        self.done = self.total
        if self.progress is not None:
            self.progress(self.total, self.total, "done")


def build_variants(spec: str, state: str, order: Sequence[str], device: torch.device,
                   phases: Phases, compile: bool = False):
    """(model, {mode: variant}, {mode: block counts}): the model SPEC names, rewritten."""
    phases.begin(f"building {spec}")
    model = prepared_model(spec, state).to(device)
    nets, counts = {}, {}
    for mode in order:
        phases.begin(f"{mode}: rewriting")
        variant = make_variant(model, mode)
        counts[mode] = block_counts(model, variant, mode)
        nets[mode] = torch.compile(variant) if compile else variant
    return model, nets, counts


def _untimed(f: ModeFigures, net: nn.Module, x: torch.Tensor, reference: list[torch.Tensor],
             train: bool, device: torch.device, peak: bool, begin: Callable[[str], None]
             ) -> None:
    """Output check, saved bytes and exact peak of one mode; out of memory is recorded."""
    try:
        begin("output check")
        outs = outputs(net, x, device)
        f.max_abs_diff = max((float((o - r).abs().max()) if o.numel() else 0.0
                              for o, r in zip(outs, reference)), default=0.0)
        begin("saved bytes")
        f.saved_bytes = saved_bytes(net, x, train)
        if peak:
            begin("exact peak")
            # A fresh copy: a weight tune_mode cached before the tracker would be invisible.
            fresh = copy.deepcopy(net)
            f.peak = tensor_peak(training_step(fresh, x, train), fresh, x)
            del fresh
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        f.error = out_of_memory(exc)
        gc.collect()  # the traceback of an out-of-memory error holds tensors


def _time_steps(nets: dict[str, nn.Module], figs: dict[str, ModeFigures], x: torch.Tensor,
                train: bool, steps: int, begin: Callable[[str], object]) -> None:
    """Every step's time, for every mode not failed yet; an out-of-memory step fails its mode."""
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

    def announce(mode: str, i: int) -> None:
        begin(f"{mode}: warm-up step" if i < 0 else f"{mode}: timed step {i + 1}/{steps}")

    runs = {m: guarded(m, training_step(nets[m], x, train))
            for m, f in figs.items() if f.error is None}
    times = interleaved_times(runs, repeats=steps, warmup=1, announce=announce)
    for mode, seconds in times.items():
        if mode in failed:
            figs[mode].error = failed[mode]
        else:
            figs[mode].step_times_s = seconds


def measure(spec: str, shapes: Sequence[Sequence[int]], *, state: str = "finetune",
            modes: Sequence[str] = MODES, device: str = "cpu", compile: bool = False,
            steps: int = 5, peak: bool = True, estimate: bool = False,
            process_peak: bool | None = None, progress: Progress | None = None
            ) -> Measurement:
    """Measure each mode of the model SPEC names at each input shape.

    Args:
        spec: as for `convbn-fx report`: a torchvision name, `timm/NAME` or
            `package.module:callable`; a SPEC, not a module, so a fresh process can build
            the same model for the process peak.
        shapes: input shapes, e.g. `[(8, 3, 224, 224)]`; several for a batch sweep.
        state: "finetune" (train mode, BN frozen: SGD steps) or "frozen" (inference).
        modes: any of "eval", "tune", "deploy"; Eval, the reference, is always measured.
        device: "cpu" or "cuda". compile: wrap every variant in `torch.compile`.
        steps: timed steps per mode, interleaved, after one warm-up step each.
        peak: the tensor memory alive at the peak of a step, by category (`tensor_peak`).
        estimate: only the peak, on fake tensors (`fake.estimate_peak`): any input size, no
            real compute; nothing is timed or compared.
        process_peak: also each mode's peak in a fresh process (resident-set growth on CPU,
            `torch.cuda.max_memory_allocated` on CUDA); None: on CUDA or with compile.
        progress: called as `progress(done, total, what)` as every phase starts.
    Returns:
        A `Measurement`. An out-of-memory error is recorded for its mode and input, and the
        run goes on; bad input (an unknown SPEC, a model that rejects the shape, no CUDA)
        raises ConvBNError.
    """
    _check_args(state, steps, shapes, estimate, compile, peak, process_peak)
    order = check_modes(modes)
    dev = check_device(device)
    if process_peak is None:
        process_peak = peak and not estimate and (dev.type == "cuda" or compile)
    shapes = [tuple(int(s) for s in shape) for shape in shapes]
    with compiling(compile):
        if estimate:
            return _estimate(spec, shapes, order, state, dev, progress)
        return _measure(spec, shapes, order, state, dev, compile, steps, peak, process_peak,
                        progress)


def _estimate(spec: str, shapes: list[tuple[int, ...]], order: tuple[str, ...], state: str,
              dev: torch.device, progress: Progress | None) -> Measurement:
    phases = Phases(1 + len(order) + len(shapes) * (1 + len(order)), progress)
    model, nets, counts = build_variants(spec, state, order, dev, phases)
    inputs = []
    for shape in shapes:
        where = f"batch {shape[0]}, " if len(shapes) > 1 else ""
        phases.begin(f"{where}checking the input")
        check_input(model, shape, spec)
        figs = {m: ModeFigures(m, counts[m]) for m in order}
        for mode in order:
            phases.begin(f"{where}{mode}: estimating the peak")
            figs[mode].peak = estimate_peak(nets[mode], shape, state == "finetune", spec)
        inputs.append(InputResult(shape, figs))
    phases.finish()
    return Measurement(spec, type(model).__name__, state, str(dev), False, 0, "estimated",
                       None, machine(), inputs)


def _measure(spec: str, shapes: list[tuple[int, ...]], order: tuple[str, ...], state: str,
             dev: torch.device, compile: bool, steps: int, peak: bool, process_peak: bool,
             progress: Progress | None) -> Measurement:
    train = state == "finetune"
    # MemTracker cannot vouch for what inductor's generated code allocates: with compile the
    # process peak is the figure.
    exact = peak and not compile
    per_mode = 2 + int(exact) + int(process_peak) + 1 + steps
    phases = Phases(1 + len(order) + len(shapes) * (1 + len(order) * per_mode), progress)
    model, nets, counts = build_variants(spec, state, order, dev, phases, compile)
    inputs = []
    for shape in shapes:
        where = f"batch {shape[0]}, " if len(shapes) > 1 else ""
        phases.begin(f"{where}the unrewritten model's output")
        x = example_input(shape, dev)
        figs = {m: ModeFigures(m, counts[m]) for m in order}
        reference, error = _probe(model, x, spec, dev)
        for mode in order:
            f, start = figs[mode], phases.done
            f.error = error
            if f.error is None:
                _untimed(f, nets[mode], x, reference, train, dev, exact,
                         lambda what: phases.begin(f"{where}{mode}: {what}"))
            if process_peak and f.error is None:
                phases.begin(f"{where}{mode}: peak in a fresh process")
                f.process_peak_mib, f.error = peak_memory(spec, mode, shape, state, str(dev),
                                                          compile)
            if f.error is not None:  # nothing more to measure in this mode, not timed either
                phases.skip(start + per_mode - phases.done)
        _time_steps(nets, figs, x, train, steps,
                    lambda what: phases.begin(f"{where}{what}"))
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
    phases.finish()
    process = ("cuda_max_allocated" if dev.type == "cuda" else "rss_growth") \
        if process_peak else None
    return Measurement(spec, type(model).__name__, state, str(dev), compile, steps,
                       "tensors" if exact else None, process, machine(), inputs)
