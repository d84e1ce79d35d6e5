"""tune_mode under DDP and FSDP2 (`fully_shard`): two CPU processes, gloo, float64.

Every scenario runs in one `torch.multiprocessing.spawn` of two processes (each spawn costs
seconds): a few SGD steps on each rank's half of the batch, then the full parameters, the
bytes one forward saves for backward on each rank, and any error. The reference is one
process training the unrewritten float64 model on the whole batch: with BN frozen every
sample's loss is independent of the others, so the parameters must agree to ~1e-9.

Both orders work for a per-layer sharding plan: `tune_mode` first, then `fully_shard` on its
layers makes the result trace again with each sharded layer kept as a call (its hooks run)
and rewritten in place; `fully_shard` first needs `tune_mode(model, inplace=True)` (FSDP
keeps its state on the module objects, so a copy cannot be sharded), and without it one
ConvBNError sentence says so.
"""

from __future__ import annotations

import datetime
import io
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import convbn_fx
from convbn_fx import Mode
from convbn_fx.tools.testing import saved_tensor_bytes
from tiny_resnet import build

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from torch.distributed.fsdp import fully_shard  # noqa: E402

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 4
LR = 0.1


# The small resnet runs by default; torchvision's resnet18 (the model) is slow.
MODELS = {"tiny": build, "resnet18": lambda: build(torchvision.models.resnet18, num_classes=4)}


def _shard_layers(model: nn.Module) -> nn.Module:
    """The usual resnet plan: one FSDP unit per layer (layer1, layer2, ...), then the root."""
    for name, child in model.named_children():
        if name.startswith("layer"):
            fully_shard(child)
    fully_shard(model)
    return model


SCENARIOS = {
    "ddp": lambda make: nn.parallel.DistributedDataParallel(convbn_fx.tune_mode(make())),
    "fsdp2-tune-then-shard": lambda make: _shard_layers(convbn_fx.tune_mode(make())),
    "fsdp2-shard-then-tune": lambda make: convbn_fx.tune_mode(_shard_layers(make()),
                                                               inplace=True),
    "fsdp2-root-only-tune-then-shard": lambda make: fully_shard(convbn_fx.tune_mode(make())),
    "fsdp2-root-only-shard-then-tune": lambda make: convbn_fx.tune_mode(fully_shard(make()),
                                                                         inplace=True),
    "fsdp2-shard-then-tune-copy": lambda make: convbn_fx.tune_mode(_shard_layers(make())),
}


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=gen, dtype=torch.float64),
             torch.randint(0, 4, (GLOBAL_BATCH,), generator=gen)) for _ in range(STEPS + 1)]


def _train(model: nn.Module, batches) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor shard under FSDP


def _run(name: str, model_name: str, rank: int) -> dict:
    share = GLOBAL_BATCH // WORLD
    local = [(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
             for x, y in _batches()]
    model = SCENARIOS[name](MODELS[model_name])
    _train(model, local[:STEPS])
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    params = {n: _full(p).detach().clone() for n, p in inner.named_parameters()}
    x, y = local[STEPS]
    saved = saved_tensor_bytes(lambda: F.cross_entropy(model(x), y))
    lowerings = [i.lowering for i in convbn_fx.describe(inner)]
    return {"params": params, "saved": saved, "lowerings": lowerings,
            "pickle": _pickled(inner, x, call=name == "ddp")}


def _pickled(model: nn.Module, x: torch.Tensor, call: bool) -> dict:
    """torch.save of the whole model: the loaded copy's output, or the error at save."""
    buf = io.BytesIO()
    try:
        torch.save(model, buf)
    except Exception as exc:
        return {"error": str(exc), "is_convbn_error": isinstance(exc, convbn_fx.ConvBNError)}
    if not call:  # a sharded model's forward would wait for the other rank
        return {"saved": True}
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    return {"same": torch.equal(loaded(x), model(x)),
            "lowerings": [i.lowering for i in convbn_fx.describe(loaded)]}


def _worker(rank: int, model_name: str, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for name in SCENARIOS:
            try:
                results[name] = _run(name, model_name, rank)
            except Exception as exc:  # recorded for the test that owns the scenario
                lines = str(exc).strip().splitlines()
                results[name] = {"error": f"{type(exc).__name__}: {lines[0] if lines else ''}",
                                 "is_convbn_error": isinstance(exc, convbn_fx.ConvBNError),
                                 "traceback": traceback.format_exc(limit=-4)}
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["tiny", pytest.param("resnet18", marks=pytest.mark.slow)])
def model_name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def ranks(model_name, tmp_path_factory) -> list[dict]:
    """Every scenario's results on each rank, from one spawn of two processes."""
    out = tmp_path_factory.mktemp(f"distributed-{model_name}")
    mp.spawn(_worker, args=(model_name, _free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process(model_name) -> dict:
    """The unrewritten float64 model trained in one process on the whole batch; Tune's
    saved bytes for one rank's share of a batch; how many blocks the model has."""
    make = MODELS[model_name]
    model = make()
    batches = _batches()
    _train(model, batches[:STEPS])
    x, y = batches[STEPS]
    tuned = convbn_fx.tune_mode(make())
    share = GLOBAL_BATCH // WORLD
    saved = saved_tensor_bytes(lambda: F.cross_entropy(tuned(x[:share]), y[:share]))
    return {"params": {n: p.detach() for n, p in model.named_parameters()}, "saved": saved,
            "blocks": sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())}


def _result(ranks: list[dict], name: str, rank: int = 0) -> dict:
    result = ranks[rank][name]
    assert "error" not in result, f"{name}: {result['error']}\n{result['traceback']}"
    return result


def _assert_trains_like_one_process(ranks, single_process, name: str) -> None:
    result = _result(ranks, name)
    assert result["lowerings"] == [Mode.TUNE] * single_process["blocks"]
    got, want = result["params"], single_process["params"]
    assert set(got) == set(want)
    for n, p in want.items():
        torch.testing.assert_close(got[n], p, rtol=1e-9, atol=1e-9 * p.abs().max().item(),
                                   msg=lambda m, n=n: f"{name} {n}: {m}")
    for rank in range(WORLD):
        # Each rank keeps what Tune keeps for its share of the batch (and FSDP's unsharded
        # parameters, which are the same weights Tune saves); 2 % for the wrappers' own.
        saved = _result(ranks, name, rank)["saved"]
        assert saved <= 1.02 * single_process["saved"], (name, rank, saved)


@pytest.mark.parametrize("name", [
    "ddp", "fsdp2-tune-then-shard", "fsdp2-shard-then-tune", "fsdp2-root-only-tune-then-shard",
    "fsdp2-root-only-shard-then-tune"])
def test_trains_like_one_process_on_the_whole_batch(ranks, single_process, name):
    _assert_trains_like_one_process(ranks, single_process, name)


def test_sharded_model_rewritten_as_a_copy_is_one_convbn_error_sentence(ranks):
    result = ranks[0]["fsdp2-shard-then-tune-copy"]
    assert result.get("is_convbn_error"), result
    assert "inplace=True" in result["error"] and "\n" not in result["error"]


def test_the_module_inside_ddp_round_trips_through_torch_save(ranks, single_process):
    result = _result(ranks, "ddp")["pickle"]
    assert result.get("same"), result
    assert result["lowerings"] == [Mode.TUNE] * single_process["blocks"]


@pytest.mark.parametrize("name", [
    "fsdp2-tune-then-shard", "fsdp2-shard-then-tune", "fsdp2-root-only-tune-then-shard",
    "fsdp2-root-only-shard-then-tune"])
def test_saving_a_sharded_model_is_one_convbn_error_sentence(ranks, name):
    """FSDP keeps its state on the module objects, which a pickle cannot carry."""
    result = _result(ranks, name)["pickle"]
    assert result.get("is_convbn_error"), result
    assert "fully_shard" in result["error"] and "state_dict" in result["error"]
    assert "\n" not in result["error"]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_an_unsupported_order_is_one_convbn_error_sentence(ranks, name):
    """Whatever does not work says so in one ConvBNError sentence, never deep in FSDP."""
    for rank in range(WORLD):
        result = ranks[rank][name]
        if "error" in result:
            assert result["is_convbn_error"], result["traceback"]
            assert "\n" not in result["error"] and "tune_mode" in result["error"]
