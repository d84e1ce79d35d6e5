"""The paper's claims measured on this library: Eval vs Tune vs Deploy, one training step.

You et al. (arXiv 2305.11624) claim that Tune mode trains like Eval mode (same parameters,
same gradients) at about the memory and time of Deploy mode, because the conv output is no
longer kept for BN's backward and BN's elementwise pass disappears. This measures that claim
on torchvision models in the fine-tuning state (train mode, BN frozen), for four variants:

    eval        convbn_fx.tune_mode(m, "eval")   conv, then F.batch_norm with running stats
    tune        convbn_fx.tune_mode(m)           auto: Tune (Deploy for frozen blocks)
    deploy      convbn_fx.deploy_mode(m)         BN folded into new conv parameters
    torch_fuse  torch.nn.utils.fusion            fuse_conv_bn_eval per block, for comparison

Figures: bytes autograd saves for backward in one step (unique storages; deterministic),
peak resident memory of a fresh process running the variant, and the median time of a
forward + backward + SGD step, variants interleaved. Run `python -m bench.modes` (or
`--quick`); it prints tables and rewrites its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from tabulate import tabulate
from torch.nn.utils.fusion import fuse_conv_bn_eval

import convbn_fx
from convbn_fx.tools import measure
from convbn_fx.tools.meters import (
    child_report,
    default_device,
    interleaved_medians,
    peak_during,
    run_child,
)
from convbn_fx.tools.testing import finetune_state, randomize_bn

from .report import header, progress, write_section

VARIANTS = ("eval", "tune", "deploy", "torch_fuse")
SWEEP_BATCHES = (4, 8, 16, 32)
MiB = 2**20


def _fasterrcnn_backbone() -> nn.Module:
    # What fasterrcnn_resnet50_fpn builds around a pretrained backbone: FrozenBatchNorm2d
    # everywhere, conv1 and layer1 frozen. (With weights_backbone=None torchvision would use
    # trainable BatchNorm2d instead, which is not the detection fine-tuning setting.)
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d
    return resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                               norm_layer=FrozenBatchNorm2d, trainable_layers=3)


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build():
        import torchvision
        return getattr(torchvision.models, name)(weights=None)
    return build


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet50": _torchvision("resnet50"),
    "resnet101": _torchvision("resnet101"),
    "mobilenet_v3_large": _torchvision("mobilenet_v3_large"),
    "fasterrcnn_r50_fpn_backbone": _fasterrcnn_backbone,
}


@dataclass
class Case:
    model: str
    batch: int
    size: int   # square input side


FULL = {c.model: c for c in [Case("resnet50", 16, 224), Case("resnet101", 16, 224),
                              Case("mobilenet_v3_large", 16, 224),
                              Case("fasterrcnn_r50_fpn_backbone", 2, 512)]}
QUICK = {c.model: c for c in [Case("resnet50", 4, 64), Case("resnet101", 4, 64),
                               Case("mobilenet_v3_large", 4, 64),
                               Case("fasterrcnn_r50_fpn_backbone", 1, 128)]}
QUICK_MODELS = ("resnet50", "fasterrcnn_r50_fpn_backbone")


def build_model(name: str) -> nn.Module:
    """The model in the fine-tuning state, with random (non-identity) BN statistics."""
    torch.manual_seed(0)
    return finetune_state(randomize_bn(MODELS[name]()))


def torch_fuse(model: nn.Module) -> nn.Module:
    """Deploy the way torch.nn.utils.fusion does it: each block's conv fused, its BN removed.

    Blocks are located with `convbn_fx.describe`, the folding is torch's own. torch gives a
    bias-free conv a new bias that does not require grad; here it trains like the weight, as
    in `deploy_mode`, so both Deploy variants train the same parameters.
    """
    fused = copy.deepcopy(model)
    for info in convbn_fx.describe(fused):
        if info.lowering is None:
            continue
        conv, bn = fused.get_submodule(info.conv), fused.get_submodule(info.bn)
        was_training = conv.training
        conv.eval()  # fuse_conv_bn_eval insists on eval modules; it reads no batch data
        new = fuse_conv_bn_eval(conv, bn).train(was_training)
        new.bias.requires_grad_(new.weight.requires_grad)
        fused.set_submodule(info.conv, new)
        fused.set_submodule(info.bn, nn.Identity())
    return fused


def make_variant(model: nn.Module, variant: str, share: bool = False) -> nn.Module:
    """`variant` of `model`; a deep copy unless `share` (the variant may share parameters).

    eval, tune and deploy are `convbn-fx measure`'s modes; torch_fuse is torch's own fold.
    """
    if variant == "torch_fuse":
        return torch_fuse(model)
    return measure.make_variant(model if share else copy.deepcopy(model), variant)


def blocks(model: nn.Module, net: nn.Module, variant: str) -> str:
    counts = measure.block_counts(model, net, "deploy" if variant == "torch_fuse" else variant)
    return ", ".join(f"{n} {k}" for k, n in counts.items())


def _input(case: Case) -> torch.Tensor:
    return measure.example_input((case.batch, 3, case.size, case.size), default_device())


# -- peak memory: one fresh process per variant ------------------------------------------------

def child_main(model: str, variant: str, batch: int, size: int) -> None:
    """In a fresh process: build one variant, run two steps, report peak memory."""
    net = make_variant(build_model(model), variant, share=True).to(default_device())
    step = measure.training_step(net, _input(Case(model, batch, size)))
    child_report(peak_during(step, measure.PEAK_STEPS, default_device()))


def peak_memory(case: Case, variant: str) -> dict:
    return run_child("bench.modes", ["--child", case.model, variant, str(case.batch),
                                     str(case.size)])


# -- the benchmark ---------------------------------------------------------------------------

def measure_case(case: Case, repeats: int, clock=time.perf_counter) -> list[dict]:
    """Every figure for one model: a row per variant."""
    start = time.perf_counter()
    base = build_model(case.model)
    x = _input(case)
    nets = {v: make_variant(base, v).to(default_device()) for v in VARIANTS}
    rows = {v: {"model": case.model, "variant": v, "input": f"{case.batch}x{case.size}²"}
            for v in VARIANTS}
    for v, net in nets.items():
        rows[v]["blocks"] = blocks(base, net, v)
        rows[v]["saved"] = measure.saved_bytes(net, x) / MiB
    # Memory in fresh processes, two at a time: each reports its own peak, and the timing
    # below runs only after they have all finished.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for v, mem in zip(VARIANTS, pool.map(lambda v: peak_memory(case, v), VARIANTS)):
            rows[v].update(mem)
    times = interleaved_medians({v: measure.training_step(net, x) for v, net in nets.items()},
                                repeats=repeats, warmup=1, clock=clock)
    for v, t in times.items():
        rows[v]["step_ms"] = t * 1e3
    rows["eval"]["bn_share"] = bn_share(nets["eval"], x)
    progress(f"{case.model} ({case.batch}x3x{case.size}x{case.size}): "
             f"Tune/Eval step {times['tune'] / times['eval']:.2f}x, saved "
             f"{rows['tune']['saved'] / rows['eval']['saved']:.2f}x "
             f"[{time.perf_counter() - start:.0f}s]")
    del nets, base
    gc.collect()
    return [rows[v] for v in VARIANTS]


def bn_share(model: nn.Module, x: torch.Tensor) -> float:
    """Fraction of an Eval training step spent in batch-norm kernels (forward and backward).

    Tune can save at most this share of Eval's step time (minus its own per-weight work), so
    it says whether a time goal is reachable on this machine at all.
    """
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step = measure.training_step(model, x)
    step()
    with profile(activities=acts) as prof:
        step()
    events = prof.key_averages()
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(own(e) for e in events)
    return sum(own(e) for e in events if "batch_norm" in e.key) / total if total else 0.0


def _ratio(value: float, ref: float) -> str:
    return f"{value / ref:.2f}" if ref else "—"


def modes_table(rows: list[dict]) -> str:
    cuda = any("cuda_peak" in r for r in rows)
    head = ["model", "input", "variant", "lowerings", "saved MiB", "×Eval", "peak RSS MiB",
            "step RSS MiB", "×Eval", "step ms", "×Eval"]
    if cuda:
        head += ["CUDA peak MiB", "×Eval"]
    body = []
    for r in rows:
        ref = next(e for e in rows if e["model"] == r["model"] and e["variant"] == "eval")
        grow, ref_grow = r["peak_rss"] - r["rss_before"], ref["peak_rss"] - ref["rss_before"]
        line = [r["model"], r["input"], r["variant"], r.get("blocks", ""),
                f"{r['saved']:.1f}", _ratio(r["saved"], ref["saved"]), f"{r['peak_rss']:.0f}",
                f"{grow:.0f}", _ratio(grow, ref_grow), f"{r['step_ms']:.1f}",
                _ratio(r["step_ms"], ref["step_ms"])]
        if cuda:
            line += [f"{r['cuda_peak']:.0f}", _ratio(r["cuda_peak"], ref["cuda_peak"])]
        body.append(line)
    return tabulate(body, head, tablefmt="github")


def sweep(size: int, timed_up_to: int, repeats: int, clock=time.perf_counter) -> list[dict]:
    """resnet50 at each batch size: saved bytes per variant, step time for small batches."""
    base = build_model("resnet50")
    nets = {v: make_variant(base, v).to(default_device()) for v in VARIANTS}
    rows = []
    for batch in SWEEP_BATCHES:
        x = _input(Case("resnet50", batch, size))
        row = {"batch": batch}
        for v, net in nets.items():
            row[v] = measure.saved_bytes(net, x) / MiB
        if batch <= timed_up_to:
            times = interleaved_medians({v: measure.training_step(nets[v], x)
                                         for v in ("eval", "tune")},
                                        repeats=repeats, warmup=1, clock=clock)
            row["time_ratio"] = times["tune"] / times["eval"]
        rows.append(row)
        progress(f"sweep resnet50 batch {batch} ({size}x{size}): saved Tune/Eval "
                 f"{row['tune'] / row['eval']:.2f}x, {row['eval'] - row['tune']:.0f} MiB less")
    return rows


def sweep_table(rows: list[dict]) -> str:
    head = ["batch", "Eval saved MiB", "Tune MiB", "×Eval", "deploy MiB", "×Eval",
            "torch_fuse MiB", "×Eval", "Tune saves MiB", "Tune step ×Eval"]
    body = [[r["batch"], f"{r['eval']:.0f}", f"{r['tune']:.0f}", _ratio(r["tune"], r["eval"]),
             f"{r['deploy']:.0f}", _ratio(r["deploy"], r["eval"]), f"{r['torch_fuse']:.0f}",
             _ratio(r["torch_fuse"], r["eval"]), f"{r['eval'] - r['tune']:.0f}",
             f"{r['time_ratio']:.2f}" if "time_ratio" in r else "—"] for r in rows]
    return tabulate(body, head, tablefmt="github")


def goals(rows: list[dict], quick: bool) -> list[str]:
    """The issue's goals, checked on the resnet50 row (batch 16 in the full run)."""
    by = {r["variant"]: r for r in rows if r["model"] == "resnet50"}
    if not by:
        return []
    checks = [("Tune step time ≤ 0.85× Eval", by["tune"]["step_ms"] / by["eval"]["step_ms"], 0.85),
              ("Tune step time ≤ 1.06× deploy", by["tune"]["step_ms"] / by["deploy"]["step_ms"],
               1.06),
              ("Tune saved bytes ≤ 1.02× deploy", by["tune"]["saved"] / by["deploy"]["saved"],
               1.02)]
    note = " (quick run: not the goal's batch 16 at 224², for a smoke check only)" if quick else ""
    lines = [f"Goals on resnet50 {by['eval']['input']}{note}:"]
    lines += [f"- {'met' if v <= limit else 'MISSED'}: {what} — {v:.2f}×"
              for what, v, limit in checks]
    share = by["eval"].get("bn_share")
    if share is not None:
        lines.append(f"- batch-norm kernels take {share:.1%} of an Eval step here (profiler), "
                     f"so Tune's step time can go no lower than about {1 - share:.2f}× Eval "
                     "on this machine, less the per-weight work Tune adds.")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.modes", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="two models, small inputs, few repeats (under two minutes)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        help="only these models")
    parser.add_argument("--repeats", type=int, help="timed steps per variant (after warm-up)")
    parser.add_argument("--threads", type=int,
                        help="torch threads, here and in the memory subprocesses (default: "
                             "torch's own); 1 keeps a shared, busy machine from thrashing")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time steps by wall clock, or by this process's CPU time (with "
                             "--threads 1 on a busy machine: the compute, not the waiting)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the batch-size sweep")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "VARIANT", "BATCH", "SIZE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model, variant, batch, size = args.child
        child_main(model, variant, int(batch), int(size))
        return
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the subprocesses
        torch.set_num_threads(args.threads)
    table = QUICK if args.quick else FULL
    names = args.models or (QUICK_MODELS if args.quick else list(FULL))
    cases = [table[m] for m in names]
    repeats = args.repeats or (3 if args.quick else 7)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = [r for case in cases for r in measure_case(case, repeats, clock)]
    command = " ".join(["python -m bench.modes"] + (argv if argv is not None else sys.argv[1:]))
    parts = ["## Modes: one training step (fine-tuning state, BN frozen)", "", header(command),
             f"Step time ({args.clock} clock): median of {repeats} interleaved steps after one "
             "warm-up. saved: bytes "
             "autograd keeps for backward (unique storages). peak RSS: a fresh process running "
             "two steps; step RSS: its growth during the steps.", "", modes_table(rows), ""]
    parts += goals(rows, args.quick)
    if not args.no_sweep:
        size, timed = (32, 0) if args.quick else (224, 8)
        srows = sweep(size, timed, repeats=3, clock=clock)
        parts += ["", f"### Batch-size sweep: resnet50 at {size}x{size}", "",
                  "Saved-for-backward MiB per training step; step time only for batch "
                  f"≤ {timed}." if timed else "Saved-for-backward MiB per training step.", "",
                  sweep_table(srows)]
    text = "\n".join(parts)
    print(text)
    write_section("bench.modes", text)


if __name__ == "__main__":
    main()
