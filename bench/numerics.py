"""How far each lowering is from exact: max relative error against a float64 model.

Folding BN into the conv weight changes the order of floating-point operations, so Tune and
Deploy cannot match Eval bit for bit; what matters is that they stay as close to the exact
(float64) answer as the unrewritten float32 model does, in float32 and under bf16 autocast,
for outputs and for gradients. Deploy (`deploy_mode`) trains new folded parameters, so only
its output and the gradient with respect to the input compare with the others.

Run `python -m bench.numerics`; it rewrites its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys

import torch
import torch.nn as nn
import torchvision
from tabulate import tabulate

import convbn_fx
from convbn_fx.tools.testing import finetune_state, randomize_bn

from .report import header, progress, write_section

VARIANTS = ("plain", "eval", "tune", "deploy")
PRECISIONS = ("float32", "bf16 autocast")


def make_variant(model: nn.Module, variant: str) -> nn.Module:
    if variant == "plain":
        return model  # the unrewritten float32 model: the yardstick
    if variant == "deploy":
        return convbn_fx.deploy_mode(model)
    return convbn_fx.tune_mode(model, "eval" if variant == "eval" else "auto")


def _max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _norm_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run(model: nn.Module, x: torch.Tensor, weight: torch.Tensor, precision: str) -> dict:
    """Output, input gradient and parameter gradients of `sum(out * weight)`, as float64."""
    model.zero_grad(set_to_none=True)
    x = x.detach().to(next(model.parameters()).dtype).requires_grad_()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16 autocast" \
        else contextlib.nullcontext()
    with autocast:
        out = model(x)
    (out.double() * weight).sum().backward()
    return {"output": out.detach().double(), "input grad": x.grad.double(),
            "params": {n: p.grad.double() for n, p in model.named_parameters()
                       if p.grad is not None}}


def errors(result: dict, ref: dict, same_params: bool) -> dict[str, tuple[float, float]]:
    """(max relative, norm-wise relative) error of each tensor kind."""
    errs = {key: (_max_rel(result[key], ref[key]), _norm_rel(result[key], ref[key]))
            for key in ("output", "input grad")}
    if same_params:
        names = list(ref["params"])
        if set(names) != set(result["params"]):
            raise AssertionError("the rewritten model's gradients are not the original's")
        worst = max(_max_rel(result["params"][n], ref["params"][n]) for n in names)
        flat = [torch.cat([d["params"][n].flatten() for n in names]) for d in (result, ref)]
        errs["param grads"] = (worst, _norm_rel(*flat))
    return errs


def measure(name: str, batch: int, size: int) -> list[dict]:
    torch.manual_seed(0)
    base = finetune_state(randomize_bn(getattr(torchvision.models, name)(weights=None)))
    reference = copy.deepcopy(base).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen)
    ref_out = reference(x.double())
    weight = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64)
    ref = run(reference, x, weight, "float32")
    rows = []
    for variant in VARIANTS:
        model = make_variant(base, variant)
        for precision in PRECISIONS:
            errs = errors(run(model, x, weight, precision), ref, variant != "deploy")
            rows += [{"precision": precision, "variant": variant, "tensor": key,
                      "max": e[0], "norm": e[1]} for key, e in errs.items()]
        progress(f"{name}: {variant} done")
    return rows


def table(rows: list[dict]) -> str:
    head = ["precision", "variant", "tensor", "max rel. error", "×plain", "norm rel. error",
            "×plain"]
    plain = {(r["precision"], r["tensor"]): r for r in rows if r["variant"] == "plain"}
    body = []
    for r in sorted(rows, key=lambda r: PRECISIONS.index(r["precision"])):
        p = plain[r["precision"], r["tensor"]]
        body.append([r["precision"], r["variant"], r["tensor"], f"{r['max']:.2e}",
                     f"{r['max'] / p['max']:.2f}", f"{r['norm']:.2e}",
                     f"{r['norm'] / p['norm']:.2f}"])
    return tabulate(body, head, tablefmt="github")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.numerics",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision model name")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="square input side")
    args = parser.parse_args(argv)
    rows = measure(args.model, args.batch, args.size)
    text = "\n".join([
        "## Numerics: max relative error against float64", "",
        header(" ".join(["python -m bench.numerics"] + (argv if argv is not None
                                                        else sys.argv[1:]))),
        f"{args.model}, input {args.batch}x3x{args.size}x{args.size}, fine-tuning state, "
        "random BN statistics; gradients of sum(out · w), random w. max rel. error: "
        "max |x − x₆₄| / max |x₆₄| (for parameter gradients, the worst parameter); norm rel. "
        "error: ‖x − x₆₄‖ / ‖x₆₄‖ (all parameter gradients as one vector). The max is "
        "dominated by discrete flips (a ReLU or max-pool choice that float32 makes "
        "differently from float64), so it scatters between variants; the norm does not. "
        "×plain: against the unrewritten model at the same precision. deploy trains new "
        "folded parameters, so its parameter gradients do not compare.", "",
        table(rows)])
    print(text)
    write_section("bench.numerics", text)


if __name__ == "__main__":
    main()
