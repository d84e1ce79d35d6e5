"""The main job in one run: rewrite torchvision resnet50 for fine-tuning and show what changed.

Fine-tuning state = `model.train()` with every BN frozen (`.eval()`), the usual transfer-learning
and detection setting. `tune_mode` folds each BN into its conv on every call (Tune mode), so the
block trains like Eval while saving about what Deploy saves. Run: `make demo`.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import torch
import torchvision
from tabulate import tabulate

import convbn_fx
from convbn_fx.testing import finetune_state, randomize_bn, saved_tensor_bytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="torchvision model name")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None)
    finetune_state(randomize_bn(model))

    start = time.perf_counter()
    tuned = convbn_fx.tune_mode(torch.fx.symbolic_trace(model))
    seconds = time.perf_counter() - start
    infos = convbn_fx.describe(tuned)
    counts = collections.Counter(str(i.lowering) if i.lowering else "skipped" for i in infos)
    print(f"{args.model}: {len(infos)} conv->BN blocks, rewritten in {seconds * 1e3:.0f} ms")
    print(tabulate(sorted(counts.items()), headers=["lowering", "blocks"]))
    for info in infos:
        if info.reason:
            print(f"  skipped {info.conv} -> {info.bn}: {info.reason}")

    # Eval (conv then BN with running statistics) is the reference Tune must match.
    reference = convbn_fx.tune_mode(model, "eval")
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        diff = (tuned(x) - reference(x)).abs().max().item()

    def step(m):
        return lambda: m(x).logsumexp(1).mean()

    eval_bytes = saved_tensor_bytes(step(reference))
    tune_bytes = saved_tensor_bytes(step(tuned))
    mib = 2 ** 20
    print()
    print(tabulate([
        ["Eval", f"{eval_bytes / mib:.1f}", "1.00"],
        ["Tune", f"{tune_bytes / mib:.1f}", f"{tune_bytes / eval_bytes:.2f}"],
    ], headers=["mode", f"saved for backward, MiB (batch {args.batch}, {args.size}px)",
                "ratio"], disable_numparse=True))
    print(f"\nmax |Tune - Eval| output difference: {diff:.2e}")
    ok = diff < 1e-3 and tune_bytes < eval_bytes
    print("OK" if ok else "UNEXPECTED: Tune should match Eval and save less")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
