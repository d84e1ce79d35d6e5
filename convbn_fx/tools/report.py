"""`convbn-fx report`: how many conv→BN blocks a model folds, and why the rest do not.

A CI job that relies on Tune mode wants to know when a model change silently stops a block
from folding (a new forward hook, a conv output reused by a skip connection). `make_report`
puts a model in the state it will train in, rewrites it with `tune_mode` and keeps
`describe()`'s answer as a `Report`; the text tables and the JSON are views of it.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import torch
import torch.nn as nn
from tabulate import tabulate

from ..frontends.tune import describe, tune_mode
from ..model.parts import rewritten_graphs
from ..model.tree import has_blocks_inside
from ..model.tuned import TunedGraphModule
from ..vocabulary.blocks import BlockInfo
from ..vocabulary.errors import ConvBNError, exception_summary
from ..vocabulary.modes import Mode
from .options import SCHEMA_VERSION, STATES, TABLE_FORMATS
from .steps import example_input

__all__ = ["Report", "make_report", "format_text", "format_json", "LOWERINGS"]

# Row order of the counts table: folded lowerings first.
LOWERINGS = (Mode.TUNE, Mode.DEPLOY, Mode.TRAIN, Mode.EVAL)

@dataclasses.dataclass
class Report:
    """What `tune_mode` did to one model in one state; the tables and JSON are views of it."""

    spec: str
    model: str                  # class name of the built model
    state: str
    mode: str
    traced_whole: bool          # False: traced in parts (see `parts`)
    parts: list[str]            # qualified names of the rewritten submodules when in parts
    blocks: list[BlockInfo]
    input: tuple[int, ...] | None = None    # called once on this shape: per-call paths known

    @property
    def skipped(self) -> list[BlockInfo]:
        return [b for b in self.blocks if b.lowering is None]

    @property
    def folded(self) -> int:
        return sum(b.folded for b in self.blocks)

    def counts(self) -> dict[str, int]:
        """Blocks per lowering, then skipped, folded and total (a fixed set of keys)."""
        per = Counter(b.lowering for b in self.blocks)
        counts = {m.value: per[m] for m in LOWERINGS}
        counts.update(skipped=per[None], folded=self.folded, total=len(self.blocks))
        return counts

    def paths(self) -> dict[str, int]:
        """Blocks per path the call on `input` took (auto's Tune chooses per call)."""
        per = Counter(b.path for b in self.blocks if b.path is not None)
        return {m.value: per[m] for m in (Mode.TUNE, Mode.EVAL)}

    def failures(self, expect: int | None, fail_on_skip: bool) -> list[str]:
        """One sentence per check that failed."""
        found = []
        if expect is not None and self.folded < expect:
            found.append(f"expected at least {expect} folded blocks, found {self.folded}.")
        if fail_on_skip and self.skipped:
            n = len(self.skipped)
            found.append(f"{n} block{'s' if n != 1 else ''} skipped (--fail-on-skip); the "
                         "report lists the reasons.")
        return found

    def to_json(self) -> dict:
        data = {
            "schema_version": SCHEMA_VERSION,
            "spec": self.spec,
            "model": self.model,
            "state": self.state,
            "mode": self.mode,
            "traced_whole": self.traced_whole,
            "parts": list(self.parts),
            "counts": self.counts(),
            "blocks": [{"conv": b.conv, "bn": b.bn, "kind": b.kind,
                        "lowering": b.lowering.value if b.lowering else None,
                        "reason": b.reason} for b in self.blocks],
        }
        if self.input:  # what one call on the input ran, block by block
            data.update(input=list(self.input), paths=self.paths())
            for row, b in zip(data["blocks"], self.blocks):
                row.update(path=b.path.value if b.path else None, path_reason=b.path_reason)
        return data


def make_report(model: nn.Module, spec: str, state: str = "finetune", mode: str = "auto",
                input_shape: tuple[int, ...] | None = None) -> Report:
    """Put `model` in `state` (in place), rewrite it with `mode` and describe the result.

    With `input_shape`, the rewritten model is called once on a random input of that shape
    (autograd on, as in training), so each block also says which path that call took.
    Raises ConvBNError (ModeError) when a forced mode is invalid for the state, or when the
    model rejects the input.
    """
    STATES[state](model)
    if has_blocks_inside(model):
        tuned = tune_mode(model, mode)
        if input_shape is not None:
            _call_once(tuned, spec, input_shape)
        blocks = describe(tuned)
    else:  # nothing to rewrite: do not ask torch.fx to trace it
        tuned, blocks = None, []
    whole = tuned is None or isinstance(tuned, TunedGraphModule)
    parts = [] if whole else [name for name, _ in rewritten_graphs(tuned)]
    return Report(spec, type(model).__name__, state, mode, whole, parts, blocks, input_shape)


def _call_once(model: nn.Module, spec: str, shape: tuple[int, ...]) -> None:
    try:
        with torch.enable_grad():
            model(example_input(shape))
    except Exception as exc:
        raise ConvBNError(f"{spec} does not accept an input of shape "
                          f"{'x'.join(map(str, shape))} ({exception_summary(exc)}).") from None


def _summary(report: Report) -> str:
    c = report.counts()
    n = len(report.parts)
    traced = "traced whole" if report.traced_whole else \
        f"traced in {n} part{'s' if n != 1 else ''} ({', '.join(report.parts)})"
    line = (f"state {report.state}, mode {report.mode}, {traced}: {c['total']} blocks, "
            f"{c['folded']} folded, {c['skipped']} skipped.")
    if report.input:
        p = report.paths()
        line += (f"\nOne call on {'x'.join(map(str, report.input))}: {p['tune']} blocks ran "
                 f"Tune, {p['eval']} Eval (auto's Tune chooses per call: Tune where the conv "
                 "output is large next to the weight).")
    return line


def format_text(report: Report, fmt: str = "plain", all_blocks: bool = False) -> str:
    """The report as text tables; fmt "plain" or "github" (markdown)."""
    tablefmt = TABLE_FORMATS[fmt]
    md = fmt == "github"
    name = (lambda s: f"`{s}`") if md else str   # markdown would eat `_` and `*` in names
    title = f"convbn-fx report: {name(report.spec)} ({report.model})"
    out = [f"### {title}" if md else title, "", _summary(report), ""]
    counts = report.counts()
    rows = [(m.value, counts[m.value]) for m in LOWERINGS] + [("skipped", counts["skipped"])]
    out.append(tabulate(rows, headers=["lowering", "blocks"], tablefmt=tablefmt))
    if report.skipped:
        out += ["", "#### Skipped blocks" if md else "Skipped blocks:", ""]
        rows = [(name(b.conv), name(b.bn), name(b.kind),
                 b.reason.replace("|", "\\|") if md else b.reason) for b in report.skipped]
        out.append(tabulate(rows, headers=["conv", "bn", "kind", "reason"], tablefmt=tablefmt))
    if all_blocks and report.blocks:
        out += ["", "#### All blocks" if md else "All blocks:", ""]
        rows = [(i, name(b.conv), name(b.bn), name(b.kind),
                 b.lowering.value if b.lowering else "skipped")
                + ((b.path.value if b.path else "—", b.path_reason or "") if report.input else ())
                for i, b in enumerate(report.blocks)]
        head = ["#", "conv", "bn", "kind", "lowering"] + (["path", "why"] if report.input else [])
        out.append(tabulate(rows, headers=head, tablefmt=tablefmt))
    return "\n".join(out) + "\n"


def format_json(report: Report, failures: list[str]) -> str:
    data = report.to_json()
    data["failures"] = failures
    return json.dumps(data, indent=2) + "\n"
