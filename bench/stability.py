"""The paper's stability claim: training Deploy's folded weights is unstable, Tune is not.

Deploy folds BN once into new conv parameters `W' = W·s`, `b'` (`s = γ/√(σ²+ε)`) and trains
those; it is as cheap as Tune, but one SGD step turns each output channel of `W'` 1/s² times
as far as Eval's step does, and a pretrained network has small s, so Deploy diverges at
learning rates where Eval and Tune train well (You et al., arXiv 2305.11624).
This reproduces it on a small ResNet pretrained on digits 0–4 (scikit-learn's bundled
`load_digits`, nothing downloaded) and fine-tuned on digits 5–9 with a new head and frozen BN,
over a learning-rate sweep, seeds, SGD and AdamW, and prints the per-channel step ratio
that explains the table (bench/step_ratio.py).

    python -m bench.stability                  # full sweep: RESULTS.md section, bench/stability.png
    python -m bench.stability --quick          # SGD, the learning rates around the edge (smoke run)
    python -m bench.stability --quick --format json

Needs `pip install 'convbn-fx[bench]'` (scikit-learn); the plot needs matplotlib.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate
from torchvision.models.resnet import BasicBlock

import convbn_fx

from .report import header, progress, write_section
from .step_ratio import StepRatios, ratio_table, step_ratios

__all__ = ["DigitsResNet", "Task", "Run", "MissingExtra", "MODES", "OPTIMIZERS",
           "FULL", "QUICK", "load_tasks", "batch_order", "freeze_bn", "pretrain", "new_head",
           "prepare", "finetune", "failure", "sweep", "float64_agreement", "summarise",
           "edge_lr", "main"]

MODES = ("eval", "tune", "deploy")
CLASSES = 5
# Failure criteria, in the order checked (README "Why not train Deploy?"):
DIVERGED = "diverged"              # a non-finite training loss at any step
ENDED_ABOVE = "ended above"        # full training-set loss after the last step > before the first
COLLAPSED = "collapsed"            # test accuracy ≤ CHANCE_LIMIT (chance is 1/5 = 0.2)
CHANCE_LIMIT = 0.25

STEPS, BATCH = 60, 32
OPTIMIZERS = {
    # name: (class, keyword arguments besides lr)
    "sgd": (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 5e-4}),
    "adamw": (torch.optim.AdamW, {"weight_decay": 1e-2}),
}
FULL = {"sgd": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
        "adamw": [1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1]}
QUICK = {"sgd": [0.03, 0.1, 0.3]}
PLOT = pathlib.Path(__file__).with_name("stability.png")


class MissingExtra(RuntimeError):
    """An optional dependency of the benchmark is not installed."""


class DigitsResNet(nn.Module):
    """torchvision BasicBlocks of widths 16/32/64 on 1×16×16 digits: 11 conv→BN blocks, 82k
    parameters. Small enough to pretrain in half a minute on two CPU cores, deep enough that
    its BN scales spread over channels as a real backbone's do."""

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = BasicBlock(16, 32, stride=2, downsample=_downsample(16, 32))
        self.layer3 = BasicBlock(32, 64, stride=2, downsample=_downsample(32, 64))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(64, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _downsample(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))


def freeze_bn(model: nn.Module) -> nn.Module:
    """The fine-tuning state: `train()`, then every BN `.eval()` (running statistics, frozen)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


# --- data ---------------------------------------------------------------------------------

@dataclass
class Task:
    """One classification task: images N×1×16×16 and labels 0..4, split in train and test."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_tasks(test_share: float = 0.3, seed: int = 0) -> tuple[Task, Task]:
    """Digits 0–4 (pretraining) and 5–9 (fine-tuning) from scikit-learn's bundled 8×8 digits,
    scaled to 16×16 and normalised with the pretraining set's mean and std."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingExtra("bench.stability needs scikit-learn for its data (the digits it "
                           "ships): pip install 'convbn-fx[bench]'") from None
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for first in (0, 5):
        idx = torch.nonzero((y >= first) & (y < first + CLASSES)).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        cut = int(len(idx) * (1 - test_share))
        tasks.append((x[idx[:cut]], y[idx[:cut]] - first, x[idx[cut:]], y[idx[cut:]] - first))
    mean, std = tasks[0][0].mean(), tasks[0][0].std()
    return tuple(Task((a - mean) / std, b, (c - mean) / std, d) for a, b, c, d in tasks)


def batch_order(n: int, steps: int, batch: int, seed: int) -> list[torch.Tensor]:
    """The indices of each step's batch: consecutive seeded permutations of 0..n-1."""
    gen = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch / n)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(epochs)])
    return [order[i * batch:(i + 1) * batch] for i in range(steps)]


# --- training -----------------------------------------------------------------------------

def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def pretrain(task: Task, epochs: int = 30, lr: float = 0.5, seed: int = 0,
             batch: int = BATCH) -> nn.Module:
    """The 'pretrained backbone': BN in training mode, SGD with momentum, no weight decay.

    BN makes each conv's output independent of its weight's scale, so without weight decay a
    large step grows the weights instead of breaking the network; the running variances grow
    with them and s = γ/√(σ²+ε) ends small (median about 0.25), the regime of pretrained
    networks the paper's argument is about. The large learning rate stands in for a real
    backbone's long pretraining: at 0.05, s stays around 1 here (0.5–3), and Deploy's steps
    are not much larger than Eval's.
    """
    torch.manual_seed(seed)
    model = DigitsResNet().train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    n = len(task.y_train)
    steps = epochs * math.ceil(n / batch)
    for i, idx in enumerate(batch_order(n, steps, batch, seed)):
        loss = F.cross_entropy(model(task.x_train[idx]), task.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (i + 1) % (steps // 3) == 0:
            progress(f"pretrain: step {i + 1}/{steps}, loss {loss.item():.3f}")
    return model


def new_head(seed: int, features: int = 64) -> nn.Linear:
    """The fine-tuning task's fresh classifier, the same for every mode of one seed."""
    with torch.random.fork_rng():
        torch.manual_seed(1000 + seed)
        return nn.Linear(features, CLASSES)


def prepare(pretrained: nn.Module, head: nn.Module, mode: str) -> nn.Module:
    """A fresh fine-tuning copy of `pretrained` with `head`, in `mode`, BN frozen.

    eval: the plain model (conv, then BN with running statistics); tune: `tune_mode` of it;
    deploy: `deploy_mode` of it, whose folded conv weights and biases are what trains.
    """
    model = copy.deepcopy(pretrained)
    model.fc = copy.deepcopy(head)
    freeze_bn(model)
    if mode == "eval":
        return model
    if mode == "tune":
        model = convbn_fx.tune_mode(model)
        lowerings = {info.lowering for info in convbn_fx.describe(model)}
        if lowerings != {convbn_fx.Mode.TUNE}:
            raise RuntimeError(f"tune_mode lowered the blocks to {lowerings}, not Tune only")
        return model
    if mode == "deploy":
        model = freeze_bn(convbn_fx.deploy_mode(model))
        bns = [n for n, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        if bns or frozen:
            raise RuntimeError(f"deploy_mode left BN {bns} or parameters {frozen} not trained")
        return model
    raise ValueError(f"unknown mode {mode!r}: expected one of {MODES}")


@dataclass
class Run:
    """One fine-tuning run and its outcome."""
    mode: str
    optimizer: str
    lr: float
    seed: int
    initial_loss: float   # loss on the whole fine-tuning training set, before the first step
    final_loss: float     # the same, after the last step
    accuracy: float       # test accuracy after the last step
    losses: list[float] = field(default_factory=list)   # each step's batch loss, before it
    failure: str | None = None

    @property
    def peak(self) -> float:
        """The largest finite batch loss as a multiple of the initial loss."""
        return max(v for v in self.losses if math.isfinite(v)) / self.initial_loss


def failure(run: Run) -> str | None:
    """Why `run` failed (DIVERGED, ENDED_ABOVE, COLLAPSED, checked in that order), or None."""
    if not all(math.isfinite(v) for v in run.losses + [run.final_loss]):
        return DIVERGED
    if run.final_loss > run.initial_loss:
        return ENDED_ABOVE
    if run.accuracy <= CHANCE_LIMIT:
        return COLLAPSED
    return None


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    cls, kwargs = OPTIMIZERS[name]
    return cls(model.parameters(), lr=lr, **kwargs)


def finetune(model: nn.Module, task: Task, optimizer: str, lr: float, seed: int,
             steps: int = STEPS, batch: int = BATCH, mode: str = "") -> Run:
    """Train every parameter of `model` on `task` for `steps` steps (batches fixed by `seed`).

    Stops early once the loss is not finite (every later step would be NaN). Raises if some
    parameter got no gradient: a head or folded weight left out would make the comparison
    meaningless.
    """
    dtype = next(model.parameters()).dtype
    x_train, x_test = task.x_train.to(dtype), task.x_test.to(dtype)
    opt = make_optimizer(optimizer, model, lr)
    run = Run(mode, optimizer, lr, seed, _loss(model, x_train, task.y_train), math.nan, math.nan)
    for i, idx in enumerate(batch_order(len(task.y_train), steps, batch, seed)):
        loss = F.cross_entropy(model(x_train[idx]), task.y_train[idx])
        run.losses.append(loss.item())
        if not math.isfinite(run.losses[-1]):
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if i == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None]
            if missing:
                raise RuntimeError(f"{mode or 'the model'}: no gradient reaches {missing}")
        opt.step()
    run.final_loss = _loss(model, x_train, task.y_train)
    run.accuracy = accuracy(model, x_test, task.y_test)
    run.failure = failure(run)
    return run


def sweep(pretrained: nn.Module, task: Task, lrs: dict[str, list[float]], seeds: int,
          steps: int = STEPS, batch: int = BATCH) -> list[Run]:
    """Every mode × optimizer × learning rate × seed; the modes of one seed start from the same
    weights (same head) and see the same batches."""
    runs, total, start = [], sum(len(v) for v in lrs.values()) * seeds, time.perf_counter()
    for optimizer, rates in lrs.items():
        for lr in rates:
            for seed in range(seeds):
                head = new_head(seed)
                for mode in MODES:
                    model = prepare(pretrained, head, mode)
                    runs.append(finetune(model, task, optimizer, lr, seed, steps, batch, mode))
                outcomes = ", ".join(f"{r.mode} {r.accuracy:.3f} {r.failure or ''}".rstrip()
                                     for r in runs[-len(MODES):])
                progress(f"fine-tune {len(runs) // len(MODES)}/{total}: {optimizer} lr {lr:g} "
                         f"seed {seed}: {outcomes} ({time.perf_counter() - start:.0f} s)")
    return runs


def float64_agreement(pretrained: nn.Module, task: Task, optimizer: str, lr: float,
                      seed: int = 0, steps: int = STEPS) -> float:
    """Largest relative difference of Eval's and Tune's batch losses, fine-tuned in float64.

    In float32 the two trajectories part by rounding, which a learning rate near the edge
    amplifies; in float64 they must stay together, because Tune computes what Eval computes.
    """
    pretrained, head = copy.deepcopy(pretrained).double(), new_head(seed).double()
    runs = [finetune(prepare(pretrained, head, mode), task, optimizer, lr, seed, steps)
            for mode in ("eval", "tune")]
    return max(abs(a - b) / abs(b) for a, b in zip(runs[1].losses, runs[0].losses))


# --- summary ------------------------------------------------------------------------------

def summarise(runs: list[Run]) -> list[dict]:
    """One row per mode × optimizer × learning rate: mean accuracy, failed runs, seeds."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.optimizer, r.lr, r.mode), []).append(r)
    return [{"mode": mode, "optimizer": opt, "lr": lr,
             "accuracy": statistics.fmean(r.accuracy for r in group),
             "failed": sum(r.failure is not None for r in group), "seeds": len(group)}
            for (opt, lr, mode), group in groups.items()]


def edge_lr(rows: list[dict], optimizer: str) -> float | None:
    """The smallest learning rate where Deploy fails in most seeds while Eval and Tune fail in
    none: the edge the README's plot shows."""
    by = {(r["lr"], r["mode"]): r for r in rows if r["optimizer"] == optimizer}
    for lr in sorted({lr for lr, _ in by}):
        d, e, t = by[lr, "deploy"], by[lr, "eval"], by[lr, "tune"]
        if 2 * d["failed"] > d["seeds"] and e["failed"] == 0 and t["failed"] == 0:
            return lr
    return None


def _tune_vs_eval(runs: list[Run]) -> dict[tuple, float]:
    """Largest relative difference of Tune's and Eval's batch losses, per optimizer and lr."""
    pairs: dict[tuple, Run] = {(r.optimizer, r.lr, r.seed): r for r in runs if r.mode == "eval"}
    out: dict[tuple, float] = {}
    for r in runs:
        if r.mode != "tune":
            continue
        e = pairs[r.optimizer, r.lr, r.seed]
        diffs = [abs(a - b) / abs(b) for a, b in zip(r.losses, e.losses)
                 if math.isfinite(a) and math.isfinite(b)]
        key = (r.optimizer, r.lr)
        out[key] = max([out.get(key, 0.0)] + diffs)
    return out


def table(rows: list[dict], runs: list[Run], tablefmt: str = "github") -> str:
    """Per optimizer: learning rate × mode, 'mean accuracy [failed runs]'."""
    by = {(r["optimizer"], r["lr"], r["mode"]): r for r in rows}
    peaks: dict[tuple, float] = {}
    for r in runs:
        if r.mode == "deploy":
            peaks[r.optimizer, r.lr] = max(peaks.get((r.optimizer, r.lr), 0.0), r.peak)
    close = _tune_vs_eval(runs)
    body = []
    for opt, lr in sorted({(r["optimizer"], r["lr"]) for r in rows},
                          key=lambda k: (list(OPTIMIZERS).index(k[0]), k[1])):
        cells = [f"{by[opt, lr, m]['accuracy']:.3f} [{by[opt, lr, m]['failed']}]" for m in MODES]
        peak = peaks[opt, lr]
        body.append([opt, f"{lr:g}", *cells, f"{peak:.1f}×" if peak < 1e3 else f"{peak:.0e}×",
                     f"{close[opt, lr]:.0e}"])
    head = ["optimizer", "lr", "Eval", "Tune", "Deploy", "Deploy peak loss",
            "Tune vs Eval Δloss"]
    return tabulate(body, head, tablefmt=tablefmt, disable_numparse=True)


# --- the plot -----------------------------------------------------------------------------

def plot(runs: list[Run], edges: dict[str, float], path: pathlib.Path) -> str | None:
    """Draw each mode's batch-loss curves at each optimizer's edge learning rate.

    Returns a note instead when matplotlib is missing or there is nothing to draw.
    """
    if not edges:
        return "no learning rate separates Deploy from Eval and Tune: no plot drawn"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'convbn-fx[plot]'): no plot drawn"
    fig, axes = plt.subplots(len(edges), len(MODES), figsize=(8, 2.4 * len(edges)),
                             sharey=True, squeeze=False)
    for row, (opt, lr) in enumerate(edges.items()):
        chosen = [r for r in runs if r.optimizer == opt and r.lr == lr]
        initial = statistics.fmean(r.initial_loss for r in chosen)
        for col, mode in enumerate(MODES):
            ax = axes[row][col]
            for r in (r for r in chosen if r.mode == mode):
                finite = [v if math.isfinite(v) else math.nan for v in r.losses]
                line, = ax.plot(range(len(finite)), finite, lw=1)
                if r.failure == DIVERGED:
                    ax.plot(len(finite) - 2, finite[-2], "x", color=line.get_color())
            ax.axhline(initial, color="gray", ls="--", lw=0.8)
            ax.set_yscale("log")
            failed = sum(r.failure is not None for r in chosen if r.mode == mode)
            seeds = sum(r.mode == mode for r in chosen)
            ax.set_title(f"{mode.capitalize()} — {opt} lr {lr:g}: {failed}/{seeds} failed",
                         fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[row][0].set_ylabel("batch loss", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return None


# --- the command --------------------------------------------------------------------------

def _jsonable(value: float) -> float | None:
    return value if math.isfinite(value) else None


def report(rows: list[dict], runs: list[Run], ratios: list[StepRatios], edges: dict,
           agreement: dict, args: argparse.Namespace, command: str, pretrain_accuracy: float,
           tablefmt: str = "github") -> str:
    """The section of RESULTS.md (and the plain and github output): setup, table, mechanism."""
    optimizers = "; ".join(f"{cls.__name__} " + ", ".join(f"{k.replace('_', ' ')} {v:g}"
                                                         for k, v in kw.items())
                           for cls, kw in OPTIMIZERS.values())
    setup = (f"DigitsResNet (torchvision BasicBlocks, widths 16/32/64, 11 conv→BN blocks, "
             f"{sum(p.numel() for p in DigitsResNet().parameters()) / 1000:.0f}k parameters), "
             f"pretrained on digits 0–4 (scikit-learn `load_digits`, 8×8 scaled to 16×16) with "
             f"BN in training mode, no weight decay, {args.epochs} epochs: test accuracy "
             f"{pretrain_accuracy:.3f}. Fine-tuned on digits 5–9 with a new head, BN frozen, "
             f"every parameter trained, {args.steps} steps at batch {BATCH}; {optimizers}. "
             f"The three modes of a seed start from "
             f"the same weights and see the same batches. Cells: mean test accuracy over "
             f"{args.seeds} seeds [runs that failed: diverged (a non-finite loss), ended above "
             f"their initial loss (whole fine-tuning training set, after the last step vs "
             f"before the first) or collapsed to chance (test accuracy ≤ {CHANCE_LIMIT})]. "
             f"Deploy peak loss: the largest batch loss over the initial loss, worst seed. "
             f"Tune vs Eval Δloss: largest relative difference of their batch losses (float32).")
    agreement_text = []
    if edges:
        where = " and ".join(f"{agreement[o]:.0e} at {o} lr {lr:g}" for o, lr in edges.items())
        agreement_text = [f"In float64, Eval's and Tune's batch losses agree to {where} (seed 0, "
                          f"{args.steps} steps): the float32 differences above are rounding, "
                          "which a learning rate near the edge amplifies.", ""]
    edge_text = ", ".join(f"{o} {lr:g}" for o, lr in edges.items()) or "none"
    s = ratios[0].summary()
    mechanism = (f"Per-channel step of the folded weight W' after one step from the pretrained "
                 f"weights (seed 0's head and first batch), Deploy over Eval, against the "
                 f"prediction (`step_ratios`): the whole step, and its part orthogonal to W' "
                 f"(which turns a channel's filter; along W', Eval's own γ step adds to Eval's). "
                 f"BN scale s = γ/√(σ²+ε) over the {s['channels']} channels: median "
                 f"{s['s_median']:.3f} (5–95 %: {s['s_5']:.3f}–{s['s_95']:.3f}), so an SGD step "
                 f"turns Deploy's filters {s['s_95'] ** -2:.0f}–{s['s_5'] ** -2:.0f}× as far as "
                 f"Eval's.")
    return "\n".join([
        "## Stability: why not train Deploy's folded weights", "", header(command), setup, "",
        table(rows, runs, tablefmt), "", *agreement_text,
        f"Edge learning rate (Deploy fails in most seeds, Eval and Tune in none): {edge_text}.",
        "", mechanism, "", ratio_table(ratios, tablefmt)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stability",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="SGD at the learning rates around the edge, 3 seeds (a few "
                             "minutes); prints only, RESULTS.md and the plot are left alone")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=STEPS, help="fine-tuning steps")
    parser.add_argument("--epochs", type=int, default=30, help="pretraining epochs")
    parser.add_argument("--format", choices=("plain", "github", "json"), default="github")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on tensors this small a second thread "
                             "costs more in start-up than it computes, 8x on a busy 2-core CPU)")
    parser.add_argument("--plot", type=pathlib.Path, default=None,
                        help=f"where to draw the loss curves (full run default: {PLOT})")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m bench.stability"] + list(argv))
    lrs = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    try:
        pre_task, task = load_tasks()
    except MissingExtra as exc:
        print(exc, file=sys.stderr)
        return 2
    start = time.perf_counter()
    pretrained = pretrain(pre_task, epochs=args.epochs)
    pre_acc = accuracy(pretrained.eval(), pre_task.x_test, pre_task.y_test)
    progress(f"pretrained in {time.perf_counter() - start:.0f} s: test accuracy {pre_acc:.3f}")
    runs = sweep(pretrained, task, lrs, args.seeds, args.steps)
    rows = summarise(runs)
    edges = {o: lr for o in lrs if (lr := edge_lr(rows, o)) is not None}
    probe = prepare(pretrained, new_head(0), "eval")
    idx = batch_order(len(task.y_train), 1, BATCH, 0)[0]
    ratios = [step_ratios(probe, task.x_train[idx], task.y_train[idx], OPTIMIZERS[o][0],
                          edges.get(o, lrs[o][0]), **OPTIMIZERS[o][1]) for o in lrs]
    agreement = {o: float64_agreement(pretrained, task, o, lr, steps=args.steps)
                 for o, lr in edges.items()}
    if args.format == "json":
        print(json.dumps({
            "rows": rows, "edge": edges, "float64_agreement": agreement,
            "step_ratio": [r.summary() for r in ratios],
            "runs": [{k: (_jsonable(v) if isinstance(v, float) else v)
                      for k, v in asdict(r).items() if k != "losses"} for r in runs]},
            indent=1))
    else:
        print(report(rows, runs, ratios, edges, agreement, args, command, pre_acc,
                     "github" if args.format == "github" else "simple"))
    path = args.plot or (None if args.quick else PLOT)
    if path is not None:
        note = plot(runs, edges, path)
        progress(note or f"plot: {path}")
    if not args.quick:
        write_section("bench.stability", report(rows, runs, ratios, edges, agreement, args,
                                                 command, pre_acc) + f"\n\nPlot: `{PLOT.name}`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
