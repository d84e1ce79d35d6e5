"""Views of a `Measurement`: the text tables and JSON that `convbn-fx measure` prints.

The measuring is in measure.py; this only lays its figures out, so the CLI, a notebook
and a CI summary show the same numbers. Every figure comes with its ratio to Eval (the
unrewritten computation), which is what a user compares; absolute figures depend on the
machine.
"""

from __future__ import annotations

import json
import textwrap

from tabulate import tabulate

from .figures import InputResult, Measurement, MiB, ModeFigures
from .options import TABLE_FORMATS
from .peak import PEAK_STEPS

__all__ = ["format_text", "format_json"]

MISSING = "—"
NOTE_WIDTH = 100

_PEAK = {"rss_growth": f"growth of resident memory over {PEAK_STEPS} steps in a fresh "
                       "process (CPU)",
         "cuda_max_allocated": f"torch.cuda.max_memory_allocated over {PEAK_STEPS} steps in "
                               "a fresh process"}


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def _blocks(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in counts.items()) or "none"


def _figure(value, fmt: str) -> str:
    return MISSING if value is None else format(value, fmt)


def _row(r: InputResult, f: ModeFigures, sweep: bool) -> list[str]:
    row = [str(r.shape[0])] if sweep else []
    return row + [
        f.mode, _blocks(f.blocks),
        _figure(None if f.saved_bytes is None else f.saved_bytes / MiB, ".1f"),
        _figure(r.ratio(f.mode, "saved_bytes"), ".2f"),
        _figure(f.peak_mib, ".0f"), _figure(r.ratio(f.mode, "peak_mib"), ".2f"),
        _figure(None if f.step_s is None else f.step_s * 1e3, ".1f"),
        _figure(r.ratio(f.mode, "step_s"), ".2f"),
        _figure(f.max_abs_diff, ".1e")]


def _notes(m: Measurement) -> list[str]:
    if m.state == "finetune":
        step = "training step"
    else:
        step = "inference step (nothing is saved for backward)"
    if m.peak is None:
        peak = "not measured"
    else:
        peak = _PEAK[m.peak] + (", after one step that compiles" if m.compiled else "")
    clock = f"median of {m.steps} interleaved steps after a warm-up"
    if m.compiled:
        clock += (", every mode wrapped in torch.compile (dropout drawing eager's random "
                  "numbers, so that outputs compare)")
    notes = [f"saved: bytes autograd keeps for backward in one {step}.",
             f"peak: {peak}.",
             f"step: {clock}. ×Eval: ratio to the eval row.",
             "max Δ out: largest |difference| from the unrewritten model's output "
             "(BN statistics randomised)."]
    if m.state == "finetune" and any("deploy" in r.modes for r in m.inputs):
        notes.append("deploy is convbn_fx.deploy_mode (BN folded into new conv weights): "
                     "training those weights directly is unstable (You et al., "
                     "arXiv 2305.11624); shown for comparison only.")
    return notes


def format_text(m: Measurement, fmt: str = "plain") -> str:
    """The measurement as a table with notes; fmt "plain" or "github" (markdown)."""
    md = fmt == "github"
    sweep = len(m.inputs) > 1
    if sweep:
        shape = _shape(("B",) + tuple(m.inputs[0].shape[1:]))
        where = f"input {shape}, B in {', '.join(str(r.shape[0]) for r in m.inputs)}"
    else:
        where = f"input {_shape(m.inputs[0].shape)}"
    spec = f"`{m.spec}`" if md else m.spec
    title = f"convbn-fx measure: {spec} ({m.model}), state {m.state}, {where}, {m.device}"
    head = (["batch"] if sweep else []) + [
        "mode", "blocks", "saved MiB", "×Eval", "peak MiB", "×Eval", "step ms", "×Eval",
        "max Δ out"]
    rows = [_row(r, f, sweep) for r in m.inputs for f in r.modes.values()]
    align = ["right"] * sweep + ["left", "left"] + ["right"] * 7
    table = tabulate(rows, head, tablefmt=TABLE_FORMATS[fmt], disable_numparse=True,
                     colalign=align)
    notes = _notes(m) + [f"not measured: {e}." for e in m.errors]
    out = [f"### {title}" if md else title, "", table, ""]
    out += [f"- {n}" for n in notes] if md else \
        [textwrap.fill(n, NOTE_WIDTH, subsequent_indent="  ") for n in notes]
    return "\n".join(out) + "\n"


def format_json(m: Measurement) -> str:
    return json.dumps(m.to_json(), indent=2) + "\n"
