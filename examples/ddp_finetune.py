"""Data-parallel fine-tuning with frozen BN: DistributedDataParallel over a tune_mode model.

`tune_mode` returns an ordinary module whose parameters are the input's, so DDP wraps it like
any model: each process runs the rewritten forward (the per-call state check included) on its
share of the batch, and DDP averages the gradients, which reach W, γ and β through the Tune
fold. With BN frozen, every sample's loss is independent of the others, so K steps on two
processes must leave the same parameters as K steps of one process on the whole batch. This
example runs both (gloo backend, two processes on this machine, FakeData) and exits 1 if the
parameters differ beyond float32 round-off.

    python examples/ddp_finetune.py --steps 3
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torchvision
from torchvision.datasets import FakeData
from torchvision.transforms import functional as TF

import convbn_fx
from convbn_fx.tools.testing import finetune_state, randomize_bn

WORLD_SIZE = 2


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    return convbn_fx.tune_mode(finetune_state(randomize_bn(model, seed)))


def global_batches(args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = FakeData(size=args.steps * args.batch_size, num_classes=5, transform=TF.to_tensor,
                    image_size=(3, args.image_size, args.image_size), random_offset=args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False)
    return list(loader)


def train(model: nn.Module, batches, lr: float) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def worker(rank: int, args, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        model = nn.parallel.DistributedDataParallel(build_model(args.seed))
        share = args.batch_size // WORLD_SIZE
        local = [(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
                 for x, y in global_batches(args)]
        train(model, local, args.lr)
        if rank == 0:
            kinds = sorted({str(b.lowering) for b in convbn_fx.describe(model.module)})
            torch.save({"state": model.module.state_dict(), "lowerings": kinds}, out_path)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch, split in two")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch_size % WORLD_SIZE:
        parser.error(f"--batch-size must be a multiple of {WORLD_SIZE}")

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rank0.pt")
        mp.spawn(worker, args=(args, free_port(), out_path), nprocs=WORLD_SIZE, join=True)
        result = torch.load(out_path)
    print(f"DDP, {WORLD_SIZE} processes (gloo), {args.steps} steps of {args.batch_size // 2} "
          f"images each; lowerings {', '.join(result['lowerings'])}")

    single = build_model(args.seed)
    train(single, global_batches(args), args.lr)
    initial = build_model(args.seed).state_dict()
    diffs = {k: (v - result["state"][k]).abs().max().item()
             for k, v in single.state_dict().items() if v.is_floating_point()}
    moved = max((v - initial[k]).abs().max().item()
                for k, v in single.state_dict().items() if v.is_floating_point())
    worst = max(diffs, key=diffs.get)
    print(f"single process, {args.steps} steps of {args.batch_size} images: parameters moved "
          f"up to {moved:.1e}")
    print(f"max |DDP - single process| over {len(diffs)} tensors: {diffs[worst]:.1e} ({worst})")
    # Averaging two half-batch gradients rounds differently from one whole-batch mean.
    if result["state"].keys() != single.state_dict().keys() or diffs[worst] > 1e-4 * moved:
        print("FAIL: DDP and single-process parameters differ")
        return 1
    print("OK: DDP with tune_mode matches the single-process run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
