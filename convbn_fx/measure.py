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

import contextlib
import dataclasses
import gc
import json
import logging
import os
import sys
from collections import Counter
from typing import Callable, Sequence

import torch
import torch.fx
import torch.nn as nn

from .api import describe, tune_mode
from .deploy_export import deploy_mode
from .errors import ConvBNError, exception_summary
from .kinds import all_bn_types
from .meters import (ChildFailed, child_report, interleaved_medians, machine, peak_during,
                     run_child)
from .specs import build_model
from .testing import _tensors, finetune_state, frozen_state, randomize_bn, saved_tensor_bytes
from .tracing import has_blocks_inside

__all__ = ["measure", "Measurement", "InputResult", "ModeFigures", "MODES", "STATES",
           "SCHEMA_VERSION", "prepared_model", "make_variant", "training_step", "saved_bytes",
           "loss_of", "example_input", "is_out_of_memory"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # of Measurement.to_json(); bump on any incompatible change
MODES = ("eval", "tune", "deploy")
STATES = {"finetune": finetune_state, "frozen": frozen_state}
PEAK_STEPS = 2      # steps the fresh process runs: the second sees the first one's leftovers
MiB = 2**20

Progress = Callable[[int, int, str], object]   # (steps done, steps in all, what runs now)


# -- one mode of one model -----------------------------------------------------------------


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


def _count_bn(model: nn.Module) -> int:
    """BN layers `model` still runs: in its traced graphs, the BN calls and batch_norm
    functions; elsewhere, BN modules. (A folded timm BatchNormAct2d stays in the tree as
    the parent of its act, but nothing calls it.)"""
    count, in_graphs = 0, set()
    for m in model.modules():
        if isinstance(m, torch.fx.GraphModule):
            for n in m.graph.nodes:
                if n.op == "call_function":
                    count += n.target in _BN_FUNCTIONS
                elif n.op == "call_module":
                    count += isinstance(m.get_submodule(n.target), all_bn_types())
            in_graphs.update(id(s) for s in m.modules() if s is not m)
    return count + sum(isinstance(m, all_bn_types()) and id(m) not in in_graphs
                       for m in model.modules())


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
    return sum(t.float().mean() for t in _tensors(out) if t.is_floating_point())


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


def _compiling(compile: bool):
    """Where torch.compile is used, dropout draws eager's random numbers, so outputs compare."""
    if not compile:
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(fallback_random=True)


def _out_of_memory(exc: BaseException) -> str:
    return f"out of memory ({exception_summary(exc)})"


def _same_randomness(device: torch.device):
    """Same dropout / drop-path masks in every forward: fork the RNG and seed it."""
    devices = [device.index or 0] if device.type == "cuda" else []
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=devices))
    torch.manual_seed(0)
    return stack


def _outputs(model: nn.Module, x: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    with _same_randomness(device), torch.no_grad():
        return [t for t in _tensors(model(x)) if t.is_floating_point()]


# -- peak memory in a fresh process --------------------------------------------------------


def _peak_in_child(request: dict) -> dict:
    """In the fresh process: build the variant, run PEAK_STEPS steps, report the peak."""
    device = torch.device(request["device"])
    model = prepared_model(request["spec"], request["state"]).to(device)
    net = make_variant(model, request["mode"])
    if request["compile"]:
        net = torch.compile(net)
    x = example_input(request["shape"], device)
    step = training_step(net, x, request["state"] == "finetune")
    try:
        with _compiling(request["compile"]):
            # A compiled step compiles first: that is not the step's memory.
            got = peak_during(step, PEAK_STEPS, device, warmup=int(request["compile"]))
    except Exception as exc:
        if is_out_of_memory(exc):
            return {"error": _out_of_memory(exc)}
        raise
    if device.type == "cuda":
        return {"peak_mib": got["cuda_peak"]}
    return {"peak_mib": got["peak_rss"] - got["rss_before"]}


def _child_env() -> dict[str, str]:
    # The fresh process imports SPEC the way this one does: same sys.path, cwd included.
    path = [p or os.getcwd() for p in sys.path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def peak_memory(spec: str, mode: str, shape: Sequence[int], state: str = "finetune",
                device: str = "cpu", compile: bool = False) -> tuple[float | None, str | None]:
    """(peak MiB, None) of PEAK_STEPS steps of `mode` in a fresh process, or (None, error).

    On CPU the peak is the growth of the process's resident memory during the steps (torch
    allocates outside Python, so only the process sees it); on CUDA it is
    `torch.cuda.max_memory_allocated`.
    """
    request = dict(spec=spec, mode=mode, shape=list(shape), state=state, device=device,
                   compile=compile)
    try:
        got = run_child("convbn_fx.measure", ["--child", json.dumps(request)], env=_child_env())
    except ChildFailed as exc:
        if exc.returncode == -9:  # SIGKILL: on Linux, the kernel's out-of-memory killer
            return None, "out of memory (the fresh process was killed)"
        raise
    return got.get("peak_mib"), got.get("error")


# -- the measurement -----------------------------------------------------------------------


@dataclasses.dataclass
class ModeFigures:
    """One mode at one input; a figure is None when it was not measured (see `error`)."""

    mode: str
    blocks: dict[str, int]              # blocks per lowering; deploy: {"folded": n}
    saved_bytes: int | None = None      # autograd keeps for backward in one step; 0: inference
    peak_mib: float | None = None       # Measurement.peak says which peak
    step_s: float | None = None         # median seconds per step
    max_abs_diff: float | None = None   # largest |output - unrewritten model's output|
    error: str | None = None            # "out of memory (...)": the figures after it are None


@dataclasses.dataclass
class InputResult:
    """Every mode at one input shape."""

    shape: tuple[int, ...]
    modes: dict[str, ModeFigures]

    def ratio(self, mode: str, field: str) -> float | None:
        """`field` of `mode` over Eval's, or None where either is missing or Eval's is 0."""
        ref = getattr(self.modes["eval"], field)
        got = getattr(self.modes[mode], field)
        return got / ref if ref and got is not None else None


@dataclasses.dataclass
class Measurement:
    """What `measure` found; the CLI's tables, JSON and plot are views of it."""

    spec: str
    model: str                  # class name of the built model
    state: str
    device: str
    compiled: bool
    steps: int                  # timed steps per mode, after one warm-up
    peak: str | None            # "rss_growth", "cuda_max_allocated", or None: not measured
    machine: str
    inputs: list[InputResult]

    @property
    def errors(self) -> list[str]:
        """One line per mode that could not be measured at some input."""
        return [f"input {'x'.join(map(str, r.shape))}, {f.mode}: {f.error}"
                for r in self.inputs for f in r.modes.values() if f.error]

    def to_json(self) -> dict:
        def mode_json(r: InputResult, f: ModeFigures) -> dict:
            return {"mode": f.mode, "blocks": f.blocks, "saved_bytes": f.saved_bytes,
                    "saved_mib": None if f.saved_bytes is None else f.saved_bytes / MiB,
                    "peak_mib": f.peak_mib,
                    "step_ms": None if f.step_s is None else f.step_s * 1e3,
                    "max_abs_diff": f.max_abs_diff,
                    "ratio_to_eval": {"saved": r.ratio(f.mode, "saved_bytes"),
                                      "peak": r.ratio(f.mode, "peak_mib"),
                                      "step_time": r.ratio(f.mode, "step_s")},
                    "error": f.error}
        return {"schema_version": SCHEMA_VERSION, "spec": self.spec, "model": self.model,
                "state": self.state, "device": self.device, "compiled": self.compiled,
                "steps": self.steps, "peak_memory": self.peak, "machine": self.machine,
                "inputs": [{"shape": list(r.shape),
                            "modes": [mode_json(r, f) for f in r.modes.values()]}
                           for r in self.inputs],
                "errors": self.errors}


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
    if state not in STATES:
        raise ConvBNError(f"unknown state {state!r}; measure knows {', '.join(STATES)}.")
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
        outs = _outputs(model, x, device)
    except Exception as exc:
        if is_out_of_memory(exc):
            return None, _out_of_memory(exc)
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
        outs = _outputs(net, x, device)
        f.max_abs_diff = max((float((o - r).abs().max()) if o.numel() else 0.0
                              for o, r in zip(outs, reference)), default=0.0)
        advance("output check")
        f.saved_bytes = saved_bytes(net, x, train)
        advance("saved bytes")
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        f.error = _out_of_memory(exc)
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
                failed[mode] = _out_of_memory(exc)
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
    with _compiling(compile):
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


def _child_main(argv: Sequence[str]) -> None:
    if len(argv) != 2 or argv[0] != "--child":
        sys.exit("convbn_fx.measure is run by convbn-fx measure; run that instead.")
    child_report(_peak_in_child(json.loads(argv[1])))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
