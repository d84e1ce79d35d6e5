"""Views of a `Measurement` and a `FitResult`: the text, tables and JSON `convbn-fx measure` prints.

The measuring is in measure.py and fit.py; this only lays their figures out, so the CLI, a
notebook and a CI summary show the same numbers. Every figure comes with its ratio to Eval
(the unrewritten computation), which is what a user compares; times come with their spread,
since on a busy machine the same step can take ten times as long from one call to the next.
"""

from __future__ import annotations

import json
import textwrap

from tabulate import tabulate

from .fake import WHAT_IT_MODELS
from .figures import GiB, FitResult, InputResult, Measurement, MiB, ModeFigures
from .options import TABLE_FORMATS
from .peak import PEAK_STEPS
from .steps import TRAINING_STEP
from .tensor_peak import CATEGORIES, TRACKED_STEPS

__all__ = ["format_text", "format_json", "format_fit_text", "format_fit_json", "memory_unit",
           "format_size"]

MISSING = "—"
NOTE_WIDTH = 100
IN_NOISE = "≈"   # before a step-time ratio whose min-max range overlaps Eval's

_PROCESS = {"rss_growth": ("RSS MiB", f"growth of the resident set over {PEAK_STEPS} steps "
                                      "in a fresh process (counts the allocator's cache and "
                                      "other threads: noisy on a busy machine)"),
            "cuda_max_allocated": ("CUDA MiB", f"torch.cuda.max_memory_allocated over "
                                               f"{PEAK_STEPS} steps in a fresh process (the "
                                               "caching allocator's count, rounding included)")}


def memory_unit(largest_bytes: float) -> tuple[str, int, str]:
    """(name, bytes, format) for figures up to `largest_bytes`: GiB from 4 GiB, MiB from
    4 MiB, else KiB; digits to about a thousandth of the largest, so that figures that print
    alike are alike to that much and figures that differ more do not print alike."""
    if largest_bytes >= 4 * GiB:
        return "GiB", GiB, ".3f"
    return ("MiB", MiB, ".1f") if largest_bytes >= 4 * MiB else ("KiB", 2**10, ".1f")


def format_size(n: int) -> str:
    """24 GiB, 80 GB, 1.5 GiB: a budget as the user wrote it, near enough."""
    for name, unit in (("GiB", GiB), ("GB", 10**9), ("MiB", MiB), ("MB", 10**6)):
        if n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n / GiB:.2f} GiB"


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def _blocks(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in counts.items()) or "none"


def _figure(value, fmt: str) -> str:
    return MISSING if value is None else format(value, fmt)


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return format(ms, ".0f" if ms >= 100 else ".1f")


def _time_cells(r: InputResult, f: ModeFigures) -> list[str]:
    spread = f.step_range_s
    ratio = _figure(r.ratio(f.mode, "step_s"), ".2f")
    if r.time_in_noise(f.mode):
        ratio = IN_NOISE + ratio
    return [MISSING if f.step_s is None else _ms(f.step_s),
            MISSING if spread is None else f"{_ms(spread[0])}–{_ms(spread[1])}", ratio]


def _row(m: Measurement, r: InputResult, f: ModeFigures, unit: tuple[str, int, str]) -> list:
    row = [str(r.shape[0])] if len(m.inputs) > 1 else []
    row += [f.mode, _blocks(f.blocks)]
    if not m.estimated:
        row += [_figure(None if f.saved_bytes is None else f.saved_bytes / MiB, ".1f"),
                _figure(r.ratio(f.mode, "saved_bytes"), ".2f")]
    if m.peak is not None:
        row += [_figure(None if f.peak is None else f.peak_bytes / unit[1], unit[2]),
                _figure(r.ratio(f.mode, "peak_bytes"), ".2f")]
    if m.process_peak is not None:
        row += [_figure(f.process_peak_mib, ".1f"), _figure(r.ratio(f.mode, "process_peak_mib"),
                                                           ".2f")]
    if not m.estimated:
        row += _time_cells(r, f) + [_figure(f.max_abs_diff, ".1e")]
    return row


def _head(m: Measurement, unit: tuple[str, int, str]) -> list[str]:
    head = (["batch"] if len(m.inputs) > 1 else []) + ["mode", "blocks"]
    if not m.estimated:
        head += ["saved MiB", "×Eval"]
    if m.peak is not None:
        head += [f"peak {unit[0]}", "×Eval"]
    if m.process_peak is not None:
        head += [_PROCESS[m.process_peak][0], "×Eval"]
    if not m.estimated:
        head += ["step ms", "min–max", "×Eval", "max Δ out"]
    return head


def _categories(m: Measurement, unit: tuple[str, int, str], fmt: str) -> list[str]:
    sweep = len(m.inputs) > 1
    head = (["batch"] if sweep else []) + ["mode", *CATEGORIES, "total"]
    rows = [([str(r.shape[0])] if sweep else []) + [f.mode] +
            [format(f.peak[k] / unit[1], unit[2]) for k in (*CATEGORIES, "total")]
            for r in m.inputs for f in r.modes.values() if f.peak is not None]
    if not rows:
        return []
    table = tabulate(rows, head, tablefmt=TABLE_FORMATS[fmt], disable_numparse=True,
                     colalign=["right"] * sweep + ["left"] + ["right"] * (len(CATEGORIES) + 1))
    return [f"peak by category, {unit[0]}:", "", table, ""]


def _peak_note(m: Measurement) -> str:
    steps = "a step" if TRACKED_STEPS == 1 else f"{TRACKED_STEPS} steps"
    seen = (f"tensor memory alive at the highest point of {steps}, counted by "
            "torch's MemTracker: parameters, buffers, gradients, optimizer state, activations "
            "(made in forward), temporaries (made in backward) and the input batch; the same "
            "bytes every run")
    if m.estimated:
        return (f"peak: estimated: the same step on fake tensors (FakeTensorMode), nothing "
                f"computed; {seen}. It models {WHAT_IT_MODELS}.{_ops(m.device)}")
    if m.peak is None and m.compiled:
        return ("peak: not measured with --compile: MemTracker cannot vouch for the buffers "
                "inductor's generated code allocates (see the process peak).")
    if m.peak is None:
        return "peak: not measured."
    return f"peak: {seen}; not counted: scratch a kernel frees within one op, allocator caches."


def _ops(device: str) -> str:
    if device.startswith("cuda"):
        return ""
    return (f" The ops are {device}'s: a CUDA step can keep slightly different tensors "
            "(cuDNN) and rounds each to 512 bytes.")


def _notes(m: Measurement) -> list[str]:
    step = "training step" if m.state == "finetune" else \
        "inference step (nothing is saved for backward)"
    notes = []
    if m.state == "finetune":
        notes.append(f"step: {TRAINING_STEP}; the input is on the device throughout.")
    if not m.estimated:
        notes.append(f"saved: bytes autograd keeps for backward in one {step}.")
    notes.append(_peak_note(m))
    if m.process_peak is not None:
        notes.append(f"{_PROCESS[m.process_peak][0]}: {_PROCESS[m.process_peak][1]}"
                     + (", after one step that compiles." if m.compiled else "."))
    if not m.estimated:
        clock = (f"step ms: median of {m.steps} interleaved steps after a warm-up, min–max "
                 "beside it.")
        if m.steps >= 3:
            clock += (f" {IN_NOISE}: the range overlaps eval's, so the difference is inside "
                      "this machine's noise.")
        if m.compiled:
            clock += (" Every mode is wrapped in torch.compile (dropout drawing eager's random "
                      "numbers, so that outputs compare).")
        notes.append(clock)
        notes.append("max Δ out: largest |difference| from the unrewritten model's output "
                     "(BN statistics randomised). ×Eval: ratio to the eval row.")
    if m.state == "finetune" and any("deploy" in r.modes for r in m.inputs):
        notes.append("deploy is convbn_fx.deploy_mode (BN folded into new conv weights): "
                     "training those weights directly is unstable (You et al., "
                     "arXiv 2305.11624); shown for comparison only.")
    return notes


def _lines(title: str, body: list[str], notes: list[str], fmt: str) -> str:
    md = fmt == "github"
    out = [f"### {title}" if md else title, ""] + body
    out += [f"- {n}" for n in notes] if md else \
        [textwrap.fill(n, NOTE_WIDTH, subsequent_indent="  ") for n in notes]
    return "\n".join(out) + "\n"


def format_text(m: Measurement, fmt: str = "plain") -> str:
    """The measurement as tables with notes; fmt "plain" or "github" (markdown)."""
    if len(m.inputs) > 1:
        shape = _shape(("B",) + tuple(m.inputs[0].shape[1:]))
        where = f"input {shape}, B in {', '.join(str(r.shape[0]) for r in m.inputs)}"
    else:
        where = f"input {_shape(m.inputs[0].shape)}"
    spec = f"`{m.spec}`" if fmt == "github" else m.spec
    title = (f"convbn-fx measure: {spec} ({m.model}), state {m.state}, {where}, {m.device}"
             + (", estimated" if m.estimated else ""))
    unit = memory_unit(max((f.peak_bytes or 0 for r in m.inputs for f in r.modes.values()),
                           default=0))
    head = _head(m, unit)
    rows = [_row(m, r, f, unit) for r in m.inputs for f in r.modes.values()]
    align = ["right"] * (len(m.inputs) > 1) + ["left", "left"] + \
        ["right"] * (len(head) - 2 - (len(m.inputs) > 1))
    table = tabulate(rows, head, tablefmt=TABLE_FORMATS[fmt], disable_numparse=True,
                     colalign=align)
    notes = _notes(m) + [f"not measured: {e}." for e in m.errors]
    return _lines(title, [table, ""] + _categories(m, unit, fmt), notes, fmt)


def format_json(m: Measurement) -> str:
    return json.dumps(m.to_json(), indent=2) + "\n"


def fit_lines(fit: FitResult) -> list[str]:
    """One line per mode: "tune: batch 607 (peak 23.987 GiB; batch 608: 24.026 GiB), ..."."""
    unit = memory_unit(fit.budget)
    ref = fit.modes["eval"].batch
    lines = []
    for f in fit.modes.values():
        if f.batch is None:
            lines.append(f"{f.mode}: nothing fits (batch 1 needs "
                         f"{format(f.next_total / unit[1], unit[2])} {unit[0]})")
            continue
        line = f"{f.mode}: batch {f.batch} (peak {format(f.peak['total'] / unit[1], unit[2])}"
        if f.next_total is None:
            line += f" {unit[0]}; the largest batch searched)"
        else:
            line += (f" {unit[0]}; batch {f.batch + 1}: "
                     f"{format(f.next_total / unit[1], unit[2])} {unit[0]})")
        if f.mode != "eval" and ref:
            line += f", {f.batch / ref:.2f}× eval's batch"
        lines.append(line)
    return lines


def format_fit_text(fit: FitResult, fmt: str = "plain") -> str:
    """The largest batch per mode, one line each, with notes; fmt "plain" or "github"."""
    spec = f"`{fit.spec}`" if fmt == "github" else fit.spec
    title = (f"convbn-fx measure: {spec} ({fit.model}), state {fit.state}, input "
             f"{_shape(('B',) + fit.sample_shape)}, {fit.device}, largest B within "
             f"{format_size(fit.budget)}")
    lines = fit_lines(fit)
    body = ([f"- {line}" for line in lines] if fmt == "github" else lines) + [""]
    probes = ", ".join(f"{f.mode} {len(f.probes)}" for f in fit.modes.values())
    notes = [f"budget: {format_size(fit.budget)} = {fit.budget} bytes of tensor memory; leave "
             "room for the rest (CUDA context, allocator cache: pass a smaller size).",
             "peak: estimated on fake tensors (FakeTensorMode), the step under torch's "
             f"MemTracker; it models {WHAT_IT_MODELS}.{_ops(fit.device)}",
             f"step: {TRAINING_STEP}; the input is counted." if fit.state == "finetune" else
             "step: inference (no grad); the input is counted.",
             f"search: secant then regula falsi on the batch; estimates made: {probes}."]
    return _lines(title, body, notes, fmt)


def format_fit_json(fit: FitResult) -> str:
    return json.dumps(fit.to_json(), indent=2) + "\n"
