"""Transfer learning with frozen BN: the same fine-tuning run in Eval and in Tune mode.

Fine-tuning a classifier usually freezes BatchNorm (`bn.eval()`) while every weight trains,
the setting where You et al. (arXiv 2305.11624) show Tune mode matches Eval mode step for step
while keeping less for backward. This example trains two copies of one randomly initialised
torchvision classifier (weights=None, randomised BN statistics, FakeData: no downloads) on the
same batches, one lowered with `mode="eval"` (the reference) and one with `tune_mode`'s auto
rule (which picks Tune), plus a float64 copy of the unrewritten model as the arbiter. It prints
the loss curves side by side and the saved-for-backward memory of one step, and exits 1 unless
Tune stays as close to float64 as float32 Eval does (the project's 2x standard): training
amplifies round-off, so after a few steps no fixed tolerance tells noise from a bug.

    python examples/finetune_classification.py --steps 10
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn as nn
import torchvision
from tabulate import tabulate
from torchvision.datasets import FakeData
from torchvision.transforms import functional as TF

import convbn_fx
from convbn_fx.tools.testing import finetune_state, randomize_bn, saved_tensor_bytes

MODELS = ("resnet18", "mobilenet_v2", "resnet50")


def build_model(name: str, num_classes: int, seed: int) -> nn.Module:
    """A torchvision backbone with a fresh head, BN stats randomised as if pretrained."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    if name.startswith("resnet"):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
    return finetune_state(randomize_bn(model, seed))


def fake_batches(steps: int, batch_size: int, image_size: int, num_classes: int):
    """`steps` fixed batches from FakeData, so both runs see exactly the same data."""
    data = FakeData(size=steps * batch_size, image_size=(3, image_size, image_size),
                    num_classes=num_classes, transform=TF.to_tensor)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    return [(x, y) for x, y in loader]


def train(model: nn.Module, batches, lr: float) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="resnet18")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    # At 32² every block's conv output is small next to its weight, so auto's Tune runs Eval's
    # path on each call there (README: When Tune pays) and saves nothing; at 128² half fold.
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    base = build_model(args.model, args.classes, args.seed)
    batches = fake_batches(args.steps, args.batch_size, args.image_size, args.classes)
    eval_model = convbn_fx.tune_mode(copy.deepcopy(base), "eval")
    tune_model = convbn_fx.tune_mode(copy.deepcopy(base))
    blocks = convbn_fx.describe(tune_model)
    picked = sorted({str(b.lowering) for b in blocks})
    print(f"{args.model}: {len(blocks)} conv-BN blocks, auto picked {', '.join(picked)}")

    # Memory of one step, before training changes anything. Both modes save every conv weight,
    # which the model holds anyway; the difference is in the activations.
    x, y = batches[0]
    param_bytes = sum(p.untyped_storage().nbytes() for p in base.parameters())
    saved = {name: saved_tensor_bytes(lambda m=m: nn.functional.cross_entropy(m(x), y))
             for name, m in (("eval", eval_model), ("tune", tune_model))}
    for m in (eval_model, tune_model):
        m.zero_grad(set_to_none=True)
    paths = [str(b.path) for b in convbn_fx.describe(tune_model) if b.path is not None]
    print(f"per call at {tuple(x.shape)}: {paths.count('tune')} blocks folded (Tune), "
          f"{paths.count('eval')} ran Eval's conv and BN (too small for Tune to pay)")

    curves = {"eval": train(eval_model, batches, args.lr),
              "tune": train(tune_model, batches, args.lr),
              "float64": train(copy.deepcopy(base).double(),
                               [(x.double(), y) for x, y in batches], args.lr)}
    ref = curves["float64"]
    err = {k: [abs(a - r) for a, r in zip(curves[k], ref)] for k in ("eval", "tune")}
    rows = [(i, f"{curves['eval'][i]:.7f}", f"{curves['tune'][i]:.7f}", f"{ref[i]:.7f}",
             f"{err['eval'][i]:.1e}", f"{err['tune'][i]:.1e}") for i in range(args.steps)]
    headers = ("step", "loss eval", "loss tune", "loss float64", "|eval-f64|", "|tune-f64|")
    print(tabulate(rows, headers=headers, disable_numparse=True))
    param_diff = max((p - q).abs().max().item() for p, q in
                     zip(eval_model.parameters(), tune_model.parameters()))
    print(f"max parameter difference eval vs tune after {args.steps} steps: {param_diff:.2e}")
    act = {k: (v - param_bytes) / 2**20 for k, v in saved.items()}
    print(f"saved for backward, one step: eval {saved['eval'] / 2**20:.1f} MiB, "
          f"tune {saved['tune'] / 2**20:.1f} MiB (tune/eval = {saved['tune'] / saved['eval']:.2f}"
          f"); activations only: eval {act['eval']:.2f} MiB, tune {act['tune']:.2f} MiB "
          f"(tune/eval = {act['tune'] / act['eval']:.2f})")

    bound = 2 * max(err["eval"]) + 1e-6 * max(abs(r) for r in ref)
    if max(err["tune"]) > bound:
        print(f"FAIL: tune loss is {max(err['tune']):.1e} off float64, more than 2x float32 "
              f"eval's error (bound {bound:.1e})")
        return 1
    if saved["tune"] >= saved["eval"]:
        print("FAIL: tune mode saved no memory")
        return 1
    print(f"OK: loss curves agree (tune vs float64 {max(err['tune']):.1e}, "
          f"eval vs float64 {max(err['eval']):.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
