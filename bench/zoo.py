"""Model-zoo sweep: how many conv→norm pairs of real models `tune_mode` folds, and exactly.

Pairs are counted independently of convbn_fx's matcher, on the plain model with hooks (see
bench/zoo_pairs.py): a norm whose input is a conv's output makes one pair; a Linear's output
reaching a norm, directly or through a view of the whole output (LeViT), a *linear* pair.
Lost pairs are explained with `--explain` (bench/zoo_explain.py).

Each model is then rewritten in the fine-tuning state (train(), every norm eval(), norm
statistics randomised), run, and checked against the plain model and float64 (see the
project's numerics standard): *out diff*, the rewritten float32 outputs against the plain
float32 outputs (relative L2; a silently wrong rewrite shows here even where float64 is not
run); *algebra*, a float64 copy rewritten gives the float64 original's outputs and every
parameter gradient to ~1e-9 (dropout masks fixed by a seed); *stability*, the float32
rewritten outputs stay within 2x the plain float32 model's own error against float64.
Hugging Face and MONAI models (`check_entry`) get norm statistics drawn around those of each
norm's own input (`zoo_pairs.prepare`). Where the plain model's float32 and float64 runs
differ (drop-path masks drawn with `torch.rand(..., dtype=x.dtype)`) the stability check
cannot be made, and a note says so; where the plain model has no float64 run (DAB-DETR),
neither float64 check is, and the float32 out diff must stay under 1e-4.

    python -m bench.zoo                      # the timm families of the README table
    python -m bench.zoo --zoo torchvision    # torchvision's classification/segmentation
    python -m bench.zoo --zoo hf             # Hugging Face vision models, tiny configs
    python -m bench.zoo --zoo monai --explain    # MONAI 1/2/3-d nets; lost pairs and why
    python -m bench.zoo --models resnet18 efficientnet_b0 --format json
    python -m bench.zoo --zoo hf --per-call  # the real Tune/Eval rule, not every call folding
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn

import convbn_fx
from convbn_fx.kernels import choice
from convbn_fx.tools.testing import compare_to_float64

from .zoo_models import (  # noqa: F401
    FAMILIES,
    HF,
    HF_QUICK,
    MONAI,
    MONAI_QUICK,
    QUICK,
    SIZES,
    TORCHVISION,
    ZOOS,
    ZooModel,
    build_timm,
    build_torchvision,
)
from .zoo_pairs import Pairs, count_pairs, find_pairs, norm_rule, prepare  # noqa: F401

__all__ = ["FAMILIES", "QUICK", "HF", "HF_QUICK", "MONAI", "MONAI_QUICK", "ZooResult",
           "Pairs", "norm_rule", "count_pairs", "find_pairs", "prepare", "check",
           "check_model", "check_entry", "build_timm", "build_torchvision", "algebra_error",
           "output_difference"]


@dataclass
class ZooResult:
    name: str
    pairs: int = 0                  # conv→norm pairs on the plain model (hooks)
    folded: int = 0                 # of those pairs, the ones folded (Tune/Deploy now)
    linear_pairs: int = 0           # Linear→norm pairs, direct or through a view (hooks)
    linear_folded: int = 0          # of those, the ones folded
    view_pairs: int = 0             # conv→(view of the whole output)→norm pairs (hooks)
    shared: int = 0                 # pairs whose conv output has another consumer too
    blocks: int = 0                 # blocks the matcher found (folded or not)
    extra: list = field(default_factory=list)    # folded blocks no hooked pair matches
    norms: int = 0                  # norm modules in the model (all kinds counted)
    frozen: dict = field(default_factory=dict)  # rule -> modules it calls a frozen norm
    algebra: float = float("nan")   # max relative error, float64 rewritten vs float64 plain
    stable: bool | None = False     # float32 outputs within 2x float32's own error (None:
                                    # not measurable, see note)
    out_diff: float = float("nan")  # rel. L2, float32 rewritten vs float32 plain outputs
    runs: bool = False              # the rewritten model ran where the plain one did
    seconds: float = 0.0
    error: str | None = None        # "stage: Type: first line"
    skipped: dict = field(default_factory=dict)  # reason -> count
    lost: list = field(default_factory=list)     # "conv -> norm" hooked but not folded
    why: list = field(default_factory=list)      # lost pairs by reason (with explain=True)
    log: list = field(default_factory=list)      # convbn_fx's INFO lines (parts, failures)
    note: str | None = None         # e.g. the plain model does not run in float64

    @property
    def exact(self) -> bool:
        """Ran, and every check that could be made passed: float64 algebra to 1e-9, float32
        stability; where the plain model has no float64 run, the float32 outputs to 1e-4."""
        if self.error is not None or not self.runs or self.stable is False:
            return False
        if self.algebra != self.algebra:  # not measured
            return self.note is not None and self.out_diff <= 1e-4
        return self.algebra <= 1e-9 and (self.stable or self.note is not None)


# ------------------------------------------------------------------------------ checking

def _tensors(out) -> list[torch.Tensor]:
    """Every floating tensor of a model's output (tensors, dicts, ModelOutputs, tuples)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _run(model: nn.Module, x: torch.Tensor, weights=None):
    """Outputs and every parameter gradient of a weighted sum of the outputs (fixed masks)."""
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        outs = _tensors(model(x))
    if weights is None:
        gen = torch.Generator().manual_seed(1)
        weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        loss.backward()
    result = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    result.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return result, weights


# A tensor this far below the largest of its kind is zero at float64 precision (a conv bias
# whose instance norm cancels it): its error is taken relative to that largest norm.
_ZERO = 1e-12


def _relative(new: dict, ref: dict, floor: float) -> float:
    if set(ref) != set(new) or any(new[k].shape != r.shape for k, r in ref.items()):
        return float("inf")
    top = {kind: max(r.norm().item() for k, r in ref.items() if k.startswith("out") == kind)
           for kind in {k.startswith("out") for k in ref}}

    def scale(k, r):
        t, n = top[k.startswith("out")], r.norm().item()
        return max(t, 1e-300) if n <= _ZERO * t else max(n, floor * t, 1e-300)

    return max(((new[k] - r).norm().item() / scale(k, r) for k, r in ref.items()),
               default=0.0)


def algebra_error(model: nn.Module, x: torch.Tensor, floor: float = 1e-6,
                  calls: int = 1) -> float:
    """Largest relative difference, float64 rewritten vs float64 plain, outputs and grads.

    A gradient that vanishes (an attention key's bias, which softmax cancels: 1e-29 of the
    largest gradient) is rounding noise in both models; as in `convbn_fx.tools.testing`, each
    tensor's difference is taken relative to at least `floor` times the largest norm of its
    kind (outputs, or gradients), and one that is zero at float64 precision (under 1e-12 of
    that norm: MONAI AttentionUnet's conv biases before InstanceNorm, 2e-15) relative to
    the largest norm itself.
    """
    plain = copy.deepcopy(model).double()
    tuned = convbn_fx.tune_mode(plain)
    ref, weights = _run(plain, x.double())
    # `calls` > 1: the later calls too (one that folded nothing runs the forward itself)
    return max(_relative(_run(tuned, x.double(), weights)[0], ref, floor)
               for _ in range(calls))


def output_difference(model: nn.Module, other: nn.Module, x: torch.Tensor) -> float:
    """Relative L2 difference of `other`'s outputs (the rewritten model; or a float64 copy,
    run on x in its dtype) from the plain model's, same random masks."""
    outs = []
    for m in (model, other):
        dtype = next(m.parameters(), x).dtype
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(0)
            outs.append({f"out{i}": o.double() for i, o in enumerate(_tensors(m(x.to(dtype))))})
    return _relative({k: v for k, v in outs[1].items()}, outs[0], 1e-6) if outs[0] else 0.0


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _captured_log():
    log, handler = logging.getLogger("convbn_fx"), _Lines()
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _is_linear(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


def _count(result: ZooResult, infos, pairs) -> dict:
    """Fill in the block counts from `describe()`; returns the skipped pairs' reasons."""
    result.blocks = len(infos)
    folded, skipped, result.skipped = Counter(), {}, {}
    for i in infos:
        if i.folded:
            folded[(i.conv, i.bn)] += 1
        else:
            reason = i.reason or f"lowered {i.lowering}"
            result.skipped[reason] = result.skipped.get(reason, 0) + 1
            skipped[(i.conv, i.bn)] = reason
    result.folded = sum((Counter(pairs.conv + pairs.conv_view) & folded).values())
    result.linear_folded = sum((Counter(pairs.linear) & folded).values())
    hooked = Counter(pairs.conv + pairs.conv_view + pairs.linear)
    result.lost = [f"{c} -> {n}" for (c, n), k in (hooked - folded).items() for _ in range(k)]
    result.extra = [f"{c} -> {n}" for (c, n), k in (folded - hooked).items() for _ in range(k)]
    return skipped


@contextlib.contextmanager
def every_call_folds():
    """Blocks `auto` lowered to Tune fold on every call, whatever the sizes.

    The sweep checks the fold itself; at its small inputs the per-call rule
    (kernels/choice.py) would run most blocks as Eval, exact by construction.
    """
    saved = choice.WEIGHT_COST, choice.CALL_COST
    choice.WEIGHT_COST, choice.CALL_COST = 0.0, 0
    try:
        yield
    finally:
        choice.WEIGHT_COST, choice.CALL_COST = saved


def check(name: str, build: Callable[[], nn.Module], x: torch.Tensor, numerics: bool = True,
          explain: bool = False, calibrated: bool = False, per_call: bool = False) -> ZooResult:
    """Sweep one model: pairs, folded blocks, the rewritten output, the float64 checks.

    `calibrated`: norm statistics calibrated on `x`, then perturbed (see `prepare`).
    `per_call`: the real per-call rule instead of `every_call_folds`, and the float64 check
    on a second call as well: it checks the Eval path and the forward that a call folding
    nothing runs (model/unfolded.py), not the fold.
    """
    if per_call:
        return _check(name, build, x, numerics, explain, calibrated, calls=2)
    with every_call_folds():
        return _check(name, build, x, numerics, explain, calibrated)


def _check(name: str, build: Callable[[], nn.Module], x: torch.Tensor, numerics: bool,
           explain: bool, calibrated: bool, calls: int = 1) -> ZooResult:
    result, stage = ZooResult(name), "build"
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = prepare(build(), x if calibrated else None)
        stage = "count"
        pairs = find_pairs(model, x)
        result.pairs, result.view_pairs = len(pairs.conv), len(pairs.conv_view)
        result.linear_pairs, result.norms, result.frozen = len(pairs.linear), pairs.norms, \
            pairs.frozen
        result.shared = len(pairs.shared)
        stage = "tune_mode"
        with _captured_log() as lines:
            tuned = convbn_fx.tune_mode(model)
            # Nothing traced: tune_mode warned and returned the model (describe would raise).
            infos = convbn_fx.describe(tuned) if tuned is not model else []
        result.log = lines
        skipped = _count(result, infos, pairs)
        stage = "run"
        with _captured_log() as lines:
            result.out_diff = output_difference(model, tuned, x)
            # What runs after the first call: a trace that did not verify runs unrewritten.
            if tuned is not model:
                skipped = _count(result, convbn_fx.describe(tuned), pairs)
        result.log += lines
        result.runs = True
        if explain and result.lost:
            from .zoo_explain import explain_lost

            result.why = explain_lost(model, result.lost, skipped, result.log,
                                      frozenset(pairs.conv_view) | pairs.views,
                                      frozenset(pairs.shared))
        if not numerics:
            result.stable = None
        if numerics:
            stage = "float64"
            try:
                plain64 = output_difference(model, copy.deepcopy(model).double(), x)
            except Exception as exc:  # not convbn_fx's to check: out_diff still is
                result.note = f"the plain model fails in float64 ({type(exc).__name__}: " \
                              f"{str(exc).strip()[:80]}): no float64 checks"
                result.stable, numerics = None, False
        if numerics:
            stage = "algebra"
            result.algebra = algebra_error(model, x, calls=calls)
            if plain64 > 1e-3:  # float32 vs float64 compares two different draws
                result.stable = None
                result.note = f"the plain model's float32 and float64 outputs differ by " \
                              f"{plain64:.0e} (random masks drawn in the input's dtype): " \
                              "no stability check"
            else:
                stage = "stability"
                devs = compare_to_float64(model, tuned, (x,), grads=False)
                result.stable = all(d.ok for d in devs)
    except Exception as exc:  # a sweep reports every model, whatever breaks
        text = str(exc).strip().splitlines()
        result.error = f"{stage}: {type(exc).__name__}: {text[0] if text else ''}"[:300]
    result.seconds = time.perf_counter() - start
    return result


def _input(shape, seed: int = 2) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def check_model(name: str, build=build_timm, size: int | None = None, batch: int = 2,
                numerics: bool = True, explain: bool = False,
                per_call: bool = False) -> ZooResult:
    """Sweep one timm (or torchvision) model by name, input batch×3×size² (default 64)."""
    size = size or SIZES.get(name if build is build_timm else f"tv/{name}", 64)
    return check(name, lambda: build(name), _input((batch, 3, size, size)), numerics, explain,
                 per_call=per_call)


def check_entry(entry: ZooModel, numerics: bool = True, explain: bool = False,
                per_call: bool = False) -> ZooResult:
    """Sweep one Hugging Face or MONAI model (bench.zoo_models)."""
    return check(entry.name, entry.build, _input(entry.shape), numerics, explain,
                 calibrated=True, per_call=per_call)


# ------------------------------------------------------------------------------------ CLI

def _groups(args) -> dict[str, list]:
    if args.zoo in ZOOS:
        quick = {"hf": HF_QUICK, "monai": MONAI_QUICK}[args.zoo]
        wanted = args.models or (quick if args.quick else None)
        groups: dict[str, list] = {}
        for e in ZOOS[args.zoo]:
            if wanted is None or e.name in wanted:
                groups.setdefault(e.family, []).append(e)
        return groups
    if args.models:
        return {"": args.models}
    if args.zoo == "torchvision":
        return {"torchvision": TORCHVISION}
    return {"": QUICK} if args.quick else FAMILIES


def _sci(v: float) -> str:
    return "" if v != v else f"{v:.0e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", help="model names (default: the whole zoo)")
    parser.add_argument("--quick", action="store_true", help="the zoo's quick subset")
    parser.add_argument("--zoo", choices=("timm", "torchvision", "hf", "monai"), default="timm")
    parser.add_argument("--size", type=int, default=None, help="timm/torchvision input size")
    parser.add_argument("--no-numerics", action="store_true")
    parser.add_argument("--explain", action="store_true",
                        help="print each model's lost pairs, skip reasons and trace log")
    parser.add_argument("--per-call", action="store_true",
                        help="the real per-call Tune/Eval rule (default: every call folds), "
                             "float64 checked on two calls")
    parser.add_argument("--format", choices=("plain", "github", "json"), default="github")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    build = build_timm if args.zoo == "timm" else build_torchvision
    rows, results = [], []
    for family, names in _groups(args).items():
        for item in names:
            if isinstance(item, ZooModel):
                r = check_entry(item, not args.no_numerics, args.explain, args.per_call)
            else:
                r = check_model(item, build, args.size, numerics=not args.no_numerics,
                                explain=args.explain, per_call=args.per_call)
            results.append(r)
            print(f"{r.name}: {r.folded}/{r.pairs} folded, linear {r.linear_folded}/"
                  f"{r.linear_pairs}, algebra {r.algebra:.1e}, out diff {r.out_diff:.1e}, "
                  f"stable {r.stable}, {r.seconds:.1f}s {r.error or ''}", file=sys.stderr)
            if args.explain:
                for line in r.why + [f"  folded, not hooked: {x}" for x in r.extra] + (
                        [f"  note: {r.note}"] if r.note else []):
                    print(f"  {line}", file=sys.stderr)
            rows.append([family, r.name, r.folded, r.pairs,
                         f"{r.linear_folded}/{r.linear_pairs}" if r.linear_pairs else "",
                         _sci(r.algebra), _sci(r.out_diff),
                         "n/a" if r.stable is None else "yes" if r.stable else "NO",
                         f"{r.seconds:.1f}", (r.error or "")[:100]])
    if args.format == "json":
        print(json.dumps([asdict(r) for r in results], indent=1))
    else:
        from tabulate import tabulate

        total_f, total_p = sum(r.folded for r in results), sum(r.pairs for r in results)
        lin_f, lin_p = (sum(r.linear_folded for r in results),
                        sum(r.linear_pairs for r in results))
        print(tabulate(rows, ["family", "model", "folded", "conv→norm pairs",
                              "linear→norm folded/pairs", "float64 algebra", "out diff",
                              "float32 stable", "s", "error"],
                       tablefmt="github" if args.format == "github" else "simple"))
        print(f"\ntotal: {total_f} of {total_p} conv→norm pairs folded "
              f"({100 * total_f / max(total_p, 1):.1f} %); linear→norm {lin_f} of {lin_p}; "
              f"{sum(r.error is not None for r in results)} of {len(results)} models errored")
    bad = [r for r in results if r.error or (not args.no_numerics and not r.exact)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
