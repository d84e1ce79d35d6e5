"""What the per-call state check costs, against a resnet18 batch-1 224² forward.

A TunedGraphModule compares module state (BN training flags, requires_grad, `self.training`
branches, registry version) with the state its code was lowered for before every call, so a
model is never run with a stale lowering (issue 3). That check must stay under 1 % of a small
forward. Measured two ways: `follow_state()` alone (read the state, compare), and the whole `__call__` overhead
(a TunedGraphModule vs a plain GraphModule running the same lowered graph, frozen so Deploy's
folds are cached, on an 8×8 input so the difference is not lost in the forward's noise). CPU time with one thread, so a busy
machine does not inflate the figures.

Run `python -m bench.state_check` (`--repeats N` for more samples).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.fx
import torchvision
from tabulate import tabulate

import convbn_fx
from convbn_fx.tools.meters import interleaved_medians
from convbn_fx.tools.testing import finetune_state, frozen_state


def _per_call(fn, calls: int) -> float:
    """CPU seconds per call of `fn`, over a batch of `calls` (timer overhead amortised)."""
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.state_check", description=__doc__)
    parser.add_argument("--repeats", type=int, default=7, help="samples per figure (median)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    model = finetune_state(torchvision.models.resnet18(weights=None))
    tuned = convbn_fx.tune_mode(model)
    plain = torch.fx.GraphModule(tuned, tuned.graph)  # same lowered code, no state check
    x = torch.randn(1, 3, 224, 224)

    calls = 2000
    with torch.no_grad():
        tuned(x)  # lowered for this state once; every later call only checks
        state = sorted(_per_call(tuned.follow_state, calls)
                       for _ in range(args.repeats))
        forward = interleaved_medians({"tuned": lambda: tuned(x), "plain": lambda: plain(x)},
                                      repeats=args.repeats, clock=time.process_time)

        # The whole __call__ overhead, where the forward is cheap enough not to drown it:
        # frozen (Deploy: cached folds), an 8x8 input; interleaved batches, least-disturbed.
        frozen = convbn_fx.tune_mode(frozen_state(torchvision.models.resnet18(weights=None)))
        frozen_plain = torch.fx.GraphModule(frozen, frozen.graph)
        tiny = torch.randn(1, 3, 8, 8)
        frozen(tiny)
        small = {"tuned": [], "plain": []}
        for _ in range(3 * args.repeats):
            small["tuned"].append(_per_call(lambda: frozen(tiny), 200))
            small["plain"].append(_per_call(lambda: frozen_plain(tiny), 200))
        small = {name: min(ts) for name, ts in small.items()}

    check = state[len(state) // 2]
    overhead = small["tuned"] - small["plain"]
    rows = [
        ["state check (follow_state(): read, compare)", f"{check * 1e6:.1f}",
         f"{100 * check / forward['plain']:.3f} %"],
        ["__call__ overhead (tuned − plain, frozen, 8×8)", f"{overhead * 1e6:.1f}",
         f"{100 * overhead / forward['plain']:.3f} %"],
        ["frozen 8×8 forward (plain, min)", f"{small['plain'] * 1e6:.0f}", ""],
        ["frozen 8×8 forward (tuned, min)", f"{small['tuned'] * 1e6:.0f}", ""],
        ["resnet18 b1 224² forward (plain)", f"{forward['plain'] * 1e6:.0f}", "100 %"],
        ["resnet18 b1 224² forward (tuned)", f"{forward['tuned'] * 1e6:.0f}",
         f"{100 * forward['tuned'] / forward['plain']:.1f} %"],
    ]
    print(tabulate(rows, ["what", "µs CPU", "of a forward"], tablefmt="github"))
    print("\nThe tuned − plain difference is below this machine's noise when it is busy; the state\n"
          "check row is the work __call__ adds (one comparison, then the plain call).")
    print(f"\nstate check / forward = {check / forward['plain']:.4%} (goal < 1 %); "
          f"{len(tuned.convbn_tuning.watch.owners)} modules, 1 thread, CPU time")


if __name__ == "__main__":
    main()
