"""When Tune pays: Tune against Eval and Deploy over a grid of models, batches and input sizes.

Tune trades activation-sized work (BN's passes over the conv output, the conv output kept for
backward) for weight-sized work (`W·s` in forward and backward, ∂W and ∂s). Where the conv
output is small next to the weight, folding costs more than it saves, so `auto` chooses per
call (convbn_fx/kernels/choice.py: a cost model in BN output elements). This measures, per
point of the grid, one fine-tuning SGD step (train mode, BN frozen, one torch thread) of:

    eval    the plain model (conv, then BN with running statistics)
    tune    convbn_fx.tune_mode(m): auto, Tune or Eval per block and call
    forced  convbn_fx.tune_mode(m, "tune"): every block folds on every call
    deploy  convbn_fx.deploy_mode(m): BN folded into new conv parameters
    again   the plain model once more, as its own variant: its ratio to `eval` is the
            noise of that point (the same computation, measured twice)

Figures: step time as ratios, and the bytes autograd saves for backward (deterministic).
Each step time is the fastest of interleaved steps (the variants in turn), as many as fit a
time budget per point: on one thread a step's CPU time only grows by what disturbs it (a
neighbour's cache traffic, an allocation's page faults), so the fastest is the least
disturbed, and a point of 20 ms steps gets 40 of them where a median of 5 moved by ±10 %.
`forced`/`eval` is the raw crossover the rule is calibrated on; `tune`/`eval` must stay
≤ 1.05 everywhere.

    python -m bench.crossover                 # the grid; writes its section of RESULTS.md
    python -m bench.crossover --quick         # a corner of it (a smoke run)
    python -m bench.crossover --format json --plot crossover.png
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tabulate import tabulate

import convbn_fx
from convbn_fx.kernels import choice
from convbn_fx.tools import measure
from convbn_fx.tools.meters import interleaved_times
from convbn_fx.tools.testing import finetune_state, randomize_bn

from .report import header, progress, write_section

__all__ = ["MODELS", "VARIANTS", "Point", "measure_point", "grid_table", "plot_grid", "main"]

MODELS = ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0")
VARIANTS = ("eval", "tune", "forced", "deploy")
BATCHES, SIZES = (1, 2, 8, 16), (32, 64, 128, 224)
QUICK_MODELS, QUICK_BATCHES, QUICK_SIZES = ("resnet18", "mobilenet_v3_large"), (2, 8), (64, 128)
MIN_REPEATS, MAX_REPEATS = 5, 40
MiB = 2 ** 20


@dataclass
class Point:
    """One model at one input size: every variant's step and saved bytes."""

    model: str
    batch: int
    size: int
    ms: dict[str, float]        # fastest step, per variant
    saved: dict[str, float]     # MiB kept for backward, per variant
    paths: dict[str, int]       # auto's blocks per path on this input: tune, eval
    repeats: int = 0            # timed steps per variant

    def ratio(self, a: str, b: str, of: str = "ms") -> float:
        values = getattr(self, of)
        return values[a] / values[b] if values[b] else float("nan")


def build(name: str) -> nn.Module:
    """The torchvision model in the fine-tuning state, with random BN statistics."""
    import torchvision

    torch.manual_seed(0)
    return finetune_state(randomize_bn(getattr(torchvision.models, name)(weights=None)))


def variants(model: nn.Module) -> dict[str, nn.Module]:
    return {"eval": model, "tune": convbn_fx.tune_mode(model),
            "forced": convbn_fx.tune_mode(model, "tune"),
            "deploy": measure.make_variant(copy.deepcopy(model), "deploy")}


def paths_taken(tuned: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """auto's blocks per path for a training call on `x`."""
    with torch.enable_grad():
        tuned(x)
    per = Counter(i.path.value for i in convbn_fx.describe(tuned) if i.path is not None)
    return {"tune": per["tune"], "eval": per["eval"]}


def measure_point(name: str, nets: dict[str, nn.Module], batch: int, size: int,
                  budget: float, clock=time.process_time, repeats: int | None = None) -> Point:
    """Every variant at one input: `repeats` timed steps each, or as many as fit `budget`
    seconds (between MIN_REPEATS and MAX_REPEATS)."""
    x = measure.example_input((batch, 3, size, size))
    saved = {v: measure.saved_bytes(net, x) / MiB for v, net in nets.items()}
    steps = {v: measure.training_step(net, x) for v, net in nets.items()}
    steps["again"] = measure.training_step(nets["eval"], x)
    steps["eval"]()  # the first step allocates what later ones reuse
    start = clock()
    steps["eval"]()
    each = max(clock() - start, 1e-4)
    if repeats is None:
        repeats = max(MIN_REPEATS, min(MAX_REPEATS, int(budget / (each * len(steps)))))
    times = interleaved_times(steps, repeats=repeats, warmup=1, before=gc.collect, clock=clock)
    paths = paths_taken(nets["tune"], x)
    point = Point(name, batch, size, {v: min(t) * 1e3 for v, t in times.items()}, saved, paths,
                  repeats)
    progress(f"{name} {batch}x3x{size}x{size}: Tune/Eval {point.ratio('tune', 'eval'):.2f}, "
             f"forced/Eval {point.ratio('forced', 'eval'):.2f}, Tune/Deploy "
             f"{point.ratio('tune', 'deploy'):.2f}, saved Tune/Eval "
             f"{point.ratio('tune', 'eval', 'saved'):.2f} ({paths['tune']} Tune, "
             f"{paths['eval']} Eval; {repeats} steps each)")
    return point


def grid_table(points: list[Point]) -> str:
    head = ["model", "input", "Tune/Eval blocks", "steps", "Eval ms", "Eval again ×Eval",
            "Tune ×Eval", "forced ×Eval", "Tune ×Deploy", "saved Tune ×Eval", "×Deploy",
            "forced saved ×Eval"]
    rows = [[p.model, f"{p.batch}×{p.size}²", f"{p.paths['tune']}/{p.paths['eval']}",
             p.repeats, f"{p.ms['eval']:.1f}", _noise(p), f"{p.ratio('tune', 'eval'):.2f}",
             f"{p.ratio('forced', 'eval'):.2f}", f"{p.ratio('tune', 'deploy'):.2f}",
             f"{p.ratio('tune', 'eval', 'saved'):.2f}",
             f"{p.ratio('tune', 'deploy', 'saved'):.2f}",
             f"{p.ratio('forced', 'eval', 'saved'):.2f}"] for p in points]
    return tabulate(rows, head, tablefmt="github")


def _noise(p: Point) -> str:
    return f"{p.ratio('again', 'eval'):.2f}" if "again" in p.ms else ""


def summary(points: list[Point]) -> list[str]:
    """The issue's goals over the grid."""
    worst = max(points, key=lambda p: p.ratio("tune", "eval"))
    more = [p for p in points if p.saved["tune"] > p.saved["eval"]]
    over = [p for p in points if p.ratio("tune", "eval") > 1.05]
    noise = [abs(p.ratio("again", "eval") - 1) for p in points if "again" in p.ms]
    lines = [f"- slowest Tune/Eval: {worst.ratio('tune', 'eval'):.2f} ({worst.model} "
             f"{worst.batch}×{worst.size}²; goal ≤ 1.05); {len(over)} of {len(points)} points "
             "above 1.05" + (f"; Eval again/Eval, the same step measured twice, is up to "
                            f"{max(noise):.0%} off 1" if noise else ""),
             f"- points where Tune saves more bytes than Eval: {len(more)} (goal 0)"]
    big = [p for p in points if (p.model, p.batch, p.size) == ("resnet50", 16, 224)]
    for p in big:
        lines.append(f"- resnet50 16×224²: Tune/Deploy step {p.ratio('tune', 'deploy'):.2f} "
                     f"(goal ≤ 1.03), saved {p.ratio('tune', 'deploy', 'saved'):.3f}× Deploy")
    return lines


def plot_grid(points: list[Point], path: str) -> None:
    """Per model, batch against input size: forced Tune's step over Eval's (where folding
    wins is blue), each cell labelled with auto's ratio."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(p.model for p in points))
    batches = sorted({p.batch for p in points})
    sizes = sorted({p.size for p in points})
    fig = Figure(figsize=(3.6 * len(models) + 1.2, 3.6), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    norm = TwoSlopeNorm(vmin=0.6, vcenter=1.0, vmax=1.8)
    image = None
    for ax, model in zip(axes, models):
        grid = [[float("nan")] * len(sizes) for _ in batches]
        for p in points:
            if p.model == model:
                i, j = batches.index(p.batch), sizes.index(p.size)
                grid[i][j] = p.ratio("forced", "eval")
                forced = p.ratio("forced", "eval")
                ax.text(j, i, f"{forced:.2f}\nauto {p.ratio('tune', 'eval'):.2f}", ha="center",
                        va="center", fontsize=7,
                        color="white" if abs(forced - 1) > 0.35 else "black")
        image = ax.imshow(grid, cmap="RdBu_r", norm=norm, origin="lower", aspect="auto")
        ax.set_xticks(range(len(sizes)), [f"{s}²" for s in sizes])
        ax.set_yticks(range(len(batches)), [str(b) for b in batches])
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("input size")
    axes[0].set_ylabel("batch")
    fig.colorbar(image, ax=list(axes), label="forced Tune step / Eval step (blue: Tune wins)")
    fig.savefig(path, dpi=130)


def _rule() -> str:
    return f"{choice.WEIGHT_COST:g},{choice.CALL_COST},{choice.KEEP_LIMIT}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.crossover",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two models, a 2x2 corner")
    parser.add_argument("--models", nargs="+", choices=MODELS)
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--repeats", type=int,
                        help="timed steps per variant (default: as many as fit --budget)")
    parser.add_argument("--budget", type=float, default=12.0,
                        help="seconds of timed steps per point, all variants (default 12; "
                             f"{MIN_REPEATS} to {MAX_REPEATS} steps each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="time steps by this process's CPU time (default: with one thread "
                             "on a shared machine, the compute and not the waiting) or wall")
    parser.add_argument("--rule", metavar="W,C,K",
                        help="the cost model's WEIGHT_COST, CALL_COST, KEEP_LIMIT instead of "
                             f"{_rule()} (to calibrate it; RESULTS.md is not written)")
    parser.add_argument("--format", choices=("plain", "json"), default="plain")
    parser.add_argument("--plot", metavar="FILE", help="the region plot (needs matplotlib)")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    if args.rule:
        w, c, k = args.rule.split(",")
        choice.WEIGHT_COST, choice.CALL_COST, choice.KEEP_LIMIT = float(w), int(c), int(k)
    models = args.models or (QUICK_MODELS if args.quick else MODELS)
    batches = args.batches or (QUICK_BATCHES if args.quick else BATCHES)
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    budget = args.budget / 3 if args.quick else args.budget
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    start, points = time.perf_counter(), []
    for name in models:
        nets = variants(build(name))
        points += [measure_point(name, nets, b, s, budget, clock, args.repeats)
                   for b in batches for s in sizes]
        del nets
        gc.collect()
    if args.plot:
        plot_grid(points, args.plot)
    if args.format == "json":
        print(json.dumps([asdict(p) for p in points], indent=2))
        return
    command = " ".join(["python -m bench.crossover"] + (argv if argv is not None else
                                                         sys.argv[1:]))
    text = "\n".join(["## When Tune pays: the Tune/Eval crossover", "", header(command),
                      f"One SGD step, fine-tuning state, {args.threads} thread(s), {args.clock} "
                      f"clock: the fastest of the interleaved steps per variant (`steps` of "
                      f"each, {budget:g} s of steps per point). Rule "
                      f"(WEIGHT_COST, CALL_COST, KEEP_LIMIT): {_rule()}. "
                      f"{time.perf_counter() - start:.0f} s.", "", grid_table(points), ""]
                     + summary(points))
    print(text)
    if args.rule is None and not (args.models or args.batches or args.sizes):
        write_section("bench.crossover" + (".quick" if args.quick else ""), text)


if __name__ == "__main__":
    main()
