"""Training-step time and saved-for-backward bytes: eager vs torch.compile vs convbn_fx.

    python -m bench.compile            # resnet18, batch 8, 224x224, on CPU
    python -m bench.compile --quick    # 64x64, few repeats: checks that everything runs

Transfer-learning state (model.train(), every BN frozen), one SGD step per measurement. Six
ways to run the same model: eager with BN as written (Eval), eager `tune_mode` (Tune),
`torch.compile` alone, `torch.compile` with inductor's `efficient_conv_bn_eval_fx_passes`,
`torch.compile(backend=convbn_fx.backend)`, and `torch.compile(convbn_fx.tune_mode(model))`.
Steps are timed interleaved (one step of each variant per round) after warm-up, so load from other processes hits all variants alike; the
table shows the median. Saved bytes are what autograd keeps for backward during one forward
(`convbn_fx.tools.testing.saved_tensor_bytes`), deterministic unlike time. A full run writes its
table to the "compile" section of bench/RESULTS.md; `--quick` only prints.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tabulate import tabulate

import convbn_fx
from convbn_fx.tools.meters import interleaved_medians
from convbn_fx.tools.testing import finetune_state, randomize_bn, saved_tensor_bytes

from .report import header, progress, write_section


def _eager(model: nn.Module) -> nn.Module:
    return model


def _tune(model: nn.Module) -> nn.Module:
    return convbn_fx.tune_mode(model)


def _compiled_tune(model: nn.Module) -> nn.Module:
    return torch.compile(convbn_fx.tune_mode(model))  # the one-liner, then the usual step


def _compiled(model: nn.Module) -> nn.Module:
    model.compile()
    return model


def _inductor_with_conv_bn_eval(gm, example_inputs):
    # A backend of its own: Dynamo keys compiled code on the backend, so this variant does not
    # reuse the plain torch.compile graph of another copy of the same model class.
    from torch._inductor.compile_fx import compile_fx

    with torch._inductor.config.patch(efficient_conv_bn_eval_fx_passes=True):
        return compile_fx(gm, example_inputs)


def _compiled_inductor_convbn(model: nn.Module) -> nn.Module:
    model.compile(backend=_inductor_with_conv_bn_eval)
    return model


def _compiled_convbn_fx(model: nn.Module) -> nn.Module:
    model.compile(backend=convbn_fx.backend)
    return model


VARIANTS: list[tuple[str, Callable[[nn.Module], nn.Module]]] = [
    ("eager Eval", _eager),
    ("eager Tune (tune_mode)", _tune),
    ("torch.compile", _compiled),
    ("torch.compile + efficient_conv_bn_eval", _compiled_inductor_convbn),
    ("torch.compile(backend=convbn_fx)", _compiled_convbn_fx),
    ("torch.compile(tune_mode(model))", _compiled_tune),
]


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
          y: torch.Tensor) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64x64 images, 3 rounds")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=None, help="image size (default 224)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    size = args.size or (64 if args.quick else 224)
    rounds = args.rounds or (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = finetune_state(randomize_bn(torchvision.models.resnet18(weights=None)))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, size, size, generator=gen)
    y = torch.randint(0, 1000, (args.batch,), generator=gen)

    runs = []
    for name, make in VARIANTS:
        model = make(copy.deepcopy(base))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        runs.append((name, model, opt))

    with torch.no_grad():
        reference = base(x)
    rows_extra = {}
    for name, model, opt in runs:
        progress(f"warming up {name}")
        started = time.perf_counter()
        with torch.no_grad():
            out = model(x)  # compiles the inference graph
        for _ in range(max(warmup, 1)):
            _step(model, opt, x, y)  # compiles forward + backward
        saved = saved_tensor_bytes(lambda: F.cross_entropy(model(x), y))
        rows_extra[name] = (time.perf_counter() - started, saved,
                            (out - reference).abs().max().item())

    progress(f"timing {rounds} interleaved rounds")
    medians = interleaved_medians(
        {name: (lambda m=model, o=opt: _step(m, o, x, y)) for name, model, opt in runs},
        repeats=rounds, warmup=0)

    eval_ms = medians["eager Eval"] * 1e3
    rows = []
    for name, _, _ in runs:
        ms = medians[name] * 1e3
        warm_s, saved, diff = rows_extra[name]
        rows.append([name, f"{ms:.1f}", f"{eval_ms / ms:.2f}x", f"{saved / 2**20:.1f}",
                     f"{warm_s:.0f}", f"{diff:.1e}"])
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m bench.compile", *given])
    text = "\n".join([
        "## torch.compile backends (training step)", "", header(command),
        f"resnet18, batch {args.batch}, {size}x{size}, frozen BN, SGD step; median of {rounds} "
        f"interleaved steps after {warmup} warm-up.", "",
        tabulate(rows, tablefmt="github", headers=[
            "variant", "step ms", "speed vs eager Eval", "saved for backward MiB", "warm-up s",
            "max abs(out - eager), eval"]), ""])
    print(text)
    if not args.quick:
        write_section("compile", text)


if __name__ == "__main__":
    main()
