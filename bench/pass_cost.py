"""What the pass itself costs: `tune_mode` against `torch.fx.symbolic_trace`, and its growth.

A rewrite that costs more than tracing the model would be felt on every model load, and one
that grows faster than the model would stall on deep networks. So: `tune_mode(model)` (which
traces itself) and `tune_mode(gm)` (given an already traced GraphModule) are timed against
`symbolic_trace(model)` on resnet50, and `tune_mode` on chains of 100 to 5000 conv→BN blocks,
where the cost per block must stay flat. When it does not, the largest chain is profiled and
the functions with the most own time are printed. The trace check (`verify=True`, the
default) is timed too: one extra no-grad forward on the first call of each input signature,
and the signature lookup on every call after.

Run `python -m bench.pass_cost` (or `--quick`); it rewrites its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import sys
import time

import torch
import torch.fx
import torch.nn as nn
import torchvision
from tabulate import tabulate

import convbn_fx
from convbn_fx.graph.find import find_blocks
from convbn_fx.model.tracer import ConvBNTracer, trace
from convbn_fx.tools.meters import interleaved_medians
from convbn_fx.tools.testing import finetune_state

from .report import header, progress, write_section

CHAINS = (100, 300, 1000, 3000, 5000)
QUICK_CHAINS = (100, 300, 1000)
FLAT = 1.3   # per-block cost at 3000 blocks may exceed the one at 300 by this factor


def chain(n: int) -> nn.Module:
    """n conv→BN blocks in a row, in the fine-tuning state (so `auto` picks Tune)."""
    layers = [m for _ in range(n) for m in (nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))]
    return finetune_state(nn.Sequential(*layers))


def resnet50_cost(repeats: int) -> list[list]:
    model = finetune_state(torchvision.models.resnet50(weights=None))
    gm = torch.fx.symbolic_trace(model)
    steps = {
        "torch.fx.symbolic_trace(model)": lambda: torch.fx.symbolic_trace(model),
        "convbn_fx trace only (ConvBNTracer)": lambda: trace(model),
        "tune_mode(model)": lambda: convbn_fx.tune_mode(model),
        "tune_mode(gm), gm already traced": lambda: convbn_fx.tune_mode(gm),
    }
    times = interleaved_medians(steps, repeats, warmup=1, clock=time.process_time,
                                before=gc.collect)
    ref = times["torch.fx.symbolic_trace(model)"]
    progress(f"resnet50: tune_mode {times['tune_mode(model)'] * 1e3:.0f} ms, symbolic_trace "
             f"{ref * 1e3:.0f} ms")
    return [[name, f"{t * 1e3:.1f}", f"{t / ref:.2f}"] for name, t in times.items()]


def phases(model: nn.Module, repeats: int) -> list[list]:
    """Where `tune_mode`'s time goes: its steps timed one by one, with the graph sizes."""
    graph = ConvBNTracer().trace(model)
    gm = torch.fx.GraphModule(model, graph)
    blocks = find_blocks(graph, gm)
    lowered = convbn_fx.tune_graph(graph, "auto", gm, inplace=False).graph
    steps = {
        f"trace to a graph ({len(graph.nodes)} nodes)": lambda: ConvBNTracer().trace(model),
        "GraphModule(model, traced graph): codegen + compile": lambda: torch.fx.GraphModule(
            model, graph),
        f"find_blocks ({len(blocks)} blocks)": lambda: find_blocks(graph, gm),
        f"tune_graph: find, choose, copy + Tune nodes ({len(lowered.nodes)} nodes)":
            lambda: convbn_fx.tune_graph(graph, "auto", gm, inplace=False),
        "GraphModule(gm, lowered graph): codegen + compile": lambda: torch.fx.GraphModule(
            gm, lowered),
        "tune_mode(model), all of it": lambda: convbn_fx.tune_mode(model),
    }
    times = interleaved_medians(steps, repeats, warmup=1, clock=time.process_time,
                                before=gc.collect)
    return [[name, f"{t * 1e3:.1f}"] for name, t in times.items()]


def verify_cost(repeats: int) -> list[list]:
    """What the trace check costs: the first call of a signature, and each call after it."""
    model = finetune_state(torchvision.models.resnet18(weights=None))
    x = torch.randn(1, 3, 64, 64)
    checked, trusted = convbn_fx.tune_mode(model), convbn_fx.tune_mode(model, verify=False)

    def first(verify: bool):
        tuned = convbn_fx.tune_mode(model, verify=verify)
        with torch.no_grad():
            tuned(x)

    def call(tuned):
        with torch.no_grad():
            tuned(x)

    call(checked), call(trusted)  # the check ran (and passed) for this signature
    times = interleaved_medians(
        {"tune_mode + first call, verify=True": lambda: first(True),
         "tune_mode + first call, verify=False": lambda: first(False),
         "a later call, verify=True": lambda: call(checked),
         "a later call, verify=False": lambda: call(trusted)},
        repeats, warmup=1, clock=time.process_time, before=gc.collect)
    base = {"first": times["tune_mode + first call, verify=False"],
            "later": times["a later call, verify=False"]}
    return [[name, f"{t * 1e3:.2f}", f"{t / base['first' if 'first' in name else 'later']:.2f}"]
            for name, t in times.items()]


def chain_cost(sizes, repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        model = chain(n)
        reps = repeats if n <= 1000 else max(1, repeats // 2)
        times = interleaved_medians(
            {"trace": lambda: torch.fx.symbolic_trace(model),
             "tune": lambda: convbn_fx.tune_mode(model)}, reps, warmup=0,
            clock=time.process_time, before=gc.collect)
        rows.append({"blocks": n, "trace": times["trace"], "tune": times["tune"]})
        progress(f"chain of {n} blocks: tune_mode {times['tune']:.2f} s "
                 f"({times['tune'] / n * 1e6:.0f} µs/block)")
    return rows


def chain_table(rows: list[dict]) -> str:
    head = ["blocks", "symbolic_trace s", "µs/block", "tune_mode s", "µs/block",
            "tune_mode ×trace"]
    body = [[r["blocks"], f"{r['trace']:.3f}", f"{r['trace'] / r['blocks'] * 1e6:.0f}",
             f"{r['tune']:.3f}", f"{r['tune'] / r['blocks'] * 1e6:.0f}",
             f"{r['tune'] / r['trace']:.2f}"] for r in rows]
    return tabulate(body, head, tablefmt="github")


def flatness(rows: list[dict]) -> tuple[float | None, str]:
    """Per-block cost of the largest chain (≥ 3000, else the largest) over that at 300."""
    per = {r["blocks"]: r["tune"] / r["blocks"] for r in rows}
    big = 3000 if 3000 in per else max(per)
    if 300 not in per or big <= 300:
        return None, "per-block cost: too few chain sizes to judge"
    growth = per[big] / per[300]
    verdict = "flat" if growth <= FLAT else "NOT flat"
    text = (f"per-block cost of tune_mode at {big} blocks is {growth:.2f}× that at 300 "
            f"({verdict}; goal: flat, here ≤ {FLAT}×)")
    top = max(per)
    if 1000 in per and top > 1000:
        text += f"; at {top} blocks it is {per[top] / per[1000]:.2f}× that at 1000"
    return growth, text


def profile(n: int, top: int = 15) -> str:
    """The functions with the most own time in one `tune_mode` of an n-block chain."""
    model = chain(n)
    prof = cProfile.Profile()
    prof.enable()
    convbn_fx.tune_mode(model)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return "\n".join(lines[start:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pass_cost",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="chains up to 1000, few repeats")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement")
    parser.add_argument("--profile", action="store_true",
                        help="profile the largest chain even when the cost is flat")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    repeats = args.repeats or (3 if args.quick else 7)
    sizes = QUICK_CHAINS if args.quick else CHAINS
    resnet = resnet50_cost(repeats)
    convbn_fx.tune_mode(chain(10))  # first-use costs (imports, caches) are no chain's
    rows = chain_cost(sizes, max(2, repeats // 2))
    growth, verdict = flatness(rows)
    ratio = float(resnet[2][2])
    parts = ["## Pass cost: the rewrite itself", "",
             header(" ".join(["python -m bench.pass_cost"] + (argv if argv is not None
                                                              else sys.argv[1:]))),
             "Times are CPU seconds of this (single-threaded) Python process "
             "(time.process_time), so other load on the machine does not count.", "",
             f"resnet50, median of {repeats} interleaved runs (fine-tuning state):", "",
             tabulate(resnet, ["call", "ms", "×symbolic_trace"], tablefmt="github"), "",
             f"- {'met' if ratio <= 1.0 else 'MISSED'}: tune_mode(model) ≤ 1× symbolic_trace "
             f"— {ratio:.2f}× (tune_mode traces the model itself, then matches, lowers and "
             "recompiles)", "",
             "Where the time goes, each step timed alone (tune_mode generates code only for the "
             "lowered graph, so it does not pay the second row):", "",
             tabulate(phases(finetune_state(torchvision.models.resnet50(weights=None)),
                             repeats), ["step", "ms"], tablefmt="github"), "",
             "### The trace check", "",
             "resnet18, no-grad forward of 1×3×64×64 (small, so the check's share is large; "
             f"median of {repeats} interleaved runs):", "",
             tabulate(verify_cost(repeats), ["call", "ms", "×verify=False"], tablefmt="github"),
             "",
             "### Chains of Conv2d(4, 4, 1) → BatchNorm2d(4) blocks", "", chain_table(rows), "",
             f"- {verdict}"]
    if args.profile or (growth is not None and growth > FLAT):
        n = max(r["blocks"] for r in rows)
        parts += ["", f"Profile of tune_mode on {n} blocks (own time):", "", "```",
                  profile(n), "```"]
    text = "\n".join(parts)
    print(text)
    write_section("bench.pass_cost", text)
    progress(f"done in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
