"""Why a zoo model's conv→norm pairs were not folded: one line per lost pair.

`bench.zoo` finds the lost pairs (counted by hooks on the plain model, not folded by
`tune_mode`). Each is explained, in this order, by

1. *skipped*: the matcher found the block and gave a reason (`describe()`);
2. *untraced*: the smallest module holding both ends failed to trace, so both ran as plain
   Python. convbn_fx logs each trace failure as "path: Class: Error: message"; that module is
   traced again here, and the frame of the model's own code where torch.fx failed
   (file:line, function, source line) is named;
3. *unmatched*: both ends sat in one traced graph, yet no block was found (a norm kept as a
   module call that convbn_fx does not know, or a view between the two ends).

    python -m bench.zoo --zoo hf --models mobilenet_v2 --explain
"""

from __future__ import annotations

import linecache
import re
import sys
import traceback
from collections import Counter
from dataclasses import dataclass

import torch.nn as nn

from convbn_fx.vocabulary.kinds import bn_base

__all__ = ["TraceFailure", "trace_failures", "failure_site", "explain_lost"]

_WITH_PATH = re.compile(r"^(?P<path>[\w.]+): (?P<cls>\w+): (?P<error>\w+): (?P<message>.*)$")
_ROOT = re.compile(r"^(?P<cls>\w+): (?P<error>\w+): (?P<message>.*)$")


@dataclass
class TraceFailure:
    path: str       # "" for the model itself
    cls: str
    error: str
    message: str


def trace_failures(log_lines: list[str]) -> dict[str, TraceFailure]:
    """Every module convbn_fx's walk failed to trace, from its INFO log lines.

    "Model traced in parts: Cls: Error: msg; path: Cls: Error: msg; ..." (the first entry is
    the model itself) and "Model: submodules kept as calls: path: Cls: Error: msg; ...".
    """
    failures: dict[str, TraceFailure] = {}
    for line in log_lines:
        if " traced in parts: " in line:
            entries = line.split(" traced in parts: ", 1)[1].split("; ")
            root = _ROOT.match(entries.pop(0))
            if root:
                failures[""] = TraceFailure("", root["cls"], root["error"], root["message"])
        elif ": submodules kept as calls: " in line:
            entries = line.split(": submodules kept as calls: ", 1)[1].split("; ")
        else:
            continue
        for entry in entries:
            m = _WITH_PATH.match(entry)
            if m:  # a message holding "; " leaves a fragment that matches nothing
                failures[m["path"]] = TraceFailure(m["path"], m["cls"], m["error"],
                                                   m["message"])
    return failures


def _own_frame(tb) -> str:
    """The innermost frame outside torch, convbn_fx and this sweep: where the model's code
    failed; the innermost frame of all when the failure is torch.fx's own (its signature
    handling, before any model code runs)."""
    site = last = ""
    for frame in traceback.extract_tb(tb):
        f = frame.filename
        short = f.split("site-packages/")[-1]
        line = (frame.line or linecache.getline(f, frame.lineno)).strip()
        last = f"{short}:{frame.lineno} in {frame.name}: `{line}`"
        if "/torch/" in f or "/convbn_fx/" in f or "/bench/" in f or f.startswith("<"):
            continue
        site = last
    return site or f"(torch.fx itself) {last}"


def failure_site(module: nn.Module) -> tuple[str | None, frozenset]:
    """Trace `module` alone as convbn_fx does: (where its own forward stopped the trace, or
    None when it traced; the children kept as calls because they did not trace)."""
    from convbn_fx.model.tracer import trace_graph

    try:
        return None, trace_graph(module).untraceable
    except Exception:
        return _own_frame(sys.exc_info()[2]) or "(no frame outside torch)", frozenset()


def _holder(conv: str, norm: str) -> str:
    """The deepest module path holding both ends ("" for the model itself)."""
    common = []
    for x, y in zip(conv.split(".")[:-1], norm.split(".")[:-1]):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _generic(path: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "N", path) or "<model>"


def explain_lost(model: nn.Module, lost: list[str], skipped: dict[tuple[str, str], str],
                 log_lines: list[str], views: frozenset = frozenset(),
                 shared: frozenset = frozenset()) -> list[str]:
    """The reasons the lost pairs ("conv -> norm") were not folded, most common first.

    First the pair itself: the matcher skipped it (its reason), the conv output is read by
    something else too (`shared`: no fold can remove it), the norm is a kind convbn_fx does
    not know, or the norm reads a view of the producer's output (`views`). Then, from the
    pair's deepest common module up to the model: a logged trace failure of that
    module, else a trace of it alone failing (a module its parent's trace kept as a call is
    not logged), else one end inside a child kept as a call; the first module where one of
    these holds explains the pair. A module that traces with both ends in its graph makes
    the pair *unmatched*. (A module traced alone gets every argument as a Proxy; inside its
    parent's trace some are constants, so a standalone failure can be a stricter one.)
    """
    failures = trace_failures(log_lines)
    sites: dict[str, tuple] = {}
    why: Counter = Counter()

    def site(path):
        if path not in sites:
            try:
                sites[path] = failure_site(model.get_submodule(path) if path else model)
            except Exception as exc:  # the explanation must not stop the sweep
                sites[path] = (f"(could not retrace: {type(exc).__name__})", frozenset())
        return sites[path]

    for pair in lost:
        conv, _, norm = pair.partition(" -> ")
        if (conv, norm) in skipped:
            why[f"skipped: {skipped[(conv, norm)]}"] += 1
            continue
        if (conv, norm) in shared:
            why["shared: the conv output is also read by something else (not foldable)"] += 1
            continue
        norm_cls = type(model.get_submodule(norm)).__name__
        if bn_base(model.get_submodule(norm)) is None:
            why[f"unknown norm: {norm_cls} is no norm kind convbn_fx knows"] += 1
            continue
        if (conv, norm) in views:
            why[f"view: {type(model.get_submodule(conv)).__name__}→{norm_cls} through a view "
                "of the whole output (flatten/reshape)"] += 1
            continue
        parts = _holder(conv, norm).split(".") if _holder(conv, norm) else []
        reason = None
        for path in (".".join(parts[:i]) for i in range(len(parts), -1, -1)):
            if isinstance(model.get_submodule(path), (nn.ModuleList, nn.ModuleDict)):
                continue  # no forward: the loop over it is its parent's
            f = failures.get(path)
            where, opaque = site(path)
            if f is not None or where is not None:
                head = f"{f.cls}: {f.error}: {f.message[:100]}" if f else \
                    f"{type(model.get_submodule(path)).__name__} (kept as a call, not logged)"
                reason = f"untraced: {_generic(path)} {head} @ {where}"
                break
            pre = f"{path}." if path else ""
            split = [o for o in opaque if any(e.startswith(pre + o + ".") for e in (conv, norm))]
            if split:
                reason = f"split: {_generic(path)} traces, one end inside the kept call " \
                         f"{_generic(pre + split[0])}"
                break
            reason = f"unmatched: {_generic(path)} traces with both ends in its graph"
            break
        why[reason] += 1
    return [f"{n:4d} x {reason}" for reason, n in why.most_common()]
