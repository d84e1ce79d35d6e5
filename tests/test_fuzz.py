"""Property tests on random conv/BN models: the rewrite never changes what a model computes.

Each seed builds a random model (tests/fuzz_models.py), puts it in a random state, rewrites it
with a random mode rule, then walks a random sequence of state changes (train/eval, one BN at a
time, requires_grad, new statistics, load_state_dict, an SGD step, deepcopy, inference mode).
After every step: outputs and every parameter gradient match a float64 copy of the unrewritten
model (the project's 2x-float32 standard), and `describe()` agrees with the generator's oracle
and with the code that runs. `pytest --fuzz N` runs N seeds instead of the default few hundred.
"""

from __future__ import annotations

import copy
import random
import zlib
from collections import Counter

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

import convbn_fx
from convbn_fx import Mode, ModeError
from convbn_fx.kernels.blocks import (conv_affine_deploy, conv_affine_tune, conv_bn_deploy,
                                      conv_bn_tune, linear_bn_deploy, linear_bn_tune)
from convbn_fx.tools.testing import compare_to_float64

from fuzz_models import STATES, FuzzCase, apply_state, make_case

DEFAULT_SEEDS = 200


def pytest_generate_tests(metafunc):
    if "seed" in metafunc.fixturenames:
        n = metafunc.config.getoption("fuzz") or DEFAULT_SEEDS
        start = metafunc.config.getoption("fuzz_start")
        metafunc.parametrize("seed", range(start, start + n), ids=lambda s: f"seed{s}")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: thread start-up dominates, and the test machine is shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the oracle --------------------------------------------------------------------------------

def _policy(seed: int):
    """A per-block policy, deterministic in (seed, BN name)."""
    choices = [None, Mode.TRAIN, Mode.EVAL, Mode.TUNE, Mode.DEPLOY, "tune"]

    def policy(info):
        return choices[zlib.crc32(f"{seed}:{info.bn}".encode()) % len(choices)]
    return policy


def _pick_mode(rng: random.Random, seed: int):
    r = rng.random()
    if r < 0.55:
        return "auto"
    if r < 0.85:
        return rng.choice([Mode.EVAL, Mode.TUNE, Mode.DEPLOY, "tune", "EVAL"])
    return _policy(seed)


def _expected(model, info_conv: str, info_bn: str, kind: str, foldable: bool, mode):
    """(lowering, problem) the DESIGN.md table prescribes for one block in its current state."""
    if not foldable:
        return None, None
    conv, bn = model.get_submodule(info_conv), model.get_submodule(info_bn)
    frozen = isinstance(bn, FrozenBatchNorm2d)
    batch_stats = not frozen and (bn.training or bn.running_mean is None)
    requires_grad = any(p.requires_grad for m in (conv, bn)
                        for p in m.parameters(recurse=False))
    auto = Mode.TRAIN if batch_stats else (Mode.TUNE if requires_grad else Mode.DEPLOY)
    if mode == "auto":
        return auto, None
    if callable(mode) and not isinstance(mode, (Mode, str)):
        wanted = mode(convbn_fx.BlockInfo(info_conv, info_bn, kind, auto, None))
        if wanted is None:
            return None, None
    else:
        wanted = mode
    wanted = Mode(wanted.lower() if isinstance(wanted, str) else wanted)
    if batch_stats and wanted is not Mode.TRAIN:
        return auto, "batch stats"
    if wanted is Mode.DEPLOY and requires_grad:
        return auto, "trainable"
    return wanted, None


def _oracle_blocks(case: FuzzCase, via_fx: bool) -> tuple[Counter, Counter]:
    """Expected (conv, bn, foldable) call sites and BN call counts in the traced graph."""
    frozen = {n for n, m in case.model.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    if not via_fx:
        return case.blocks, case.bn_calls
    # torch.fx.symbolic_trace inlines FrozenBatchNorm2d, so its blocks are not blocks there.
    return (Counter({k: v for k, v in case.blocks.items() if k[1] not in frozen}),
            Counter({k: v for k, v in case.bn_calls.items() if k not in frozen}))


def check_describe(case: FuzzCase, model, tuned, mode, via_fx: bool) -> None:
    """describe() matches the oracle, and the code that runs matches describe()."""
    infos = convbn_fx.describe(tuned)
    blocks, bn_calls = _oracle_blocks(case, via_fx)
    got = Counter((i.conv, i.bn, i.reason is None) for i in infos)
    assert got == blocks, f"blocks {dict(got)} != oracle {dict(blocks)}\n{case}"
    for info in infos:
        assert info.reason is None or info.lowering is None, f"skipped yet lowered: {info}"
        want, _ = _expected(model, info.conv, info.bn, info.kind, info.reason is None, mode)
        assert info.lowering == want, f"{info} but the state calls for {want}\n{case}"

    # FrozenBatchNorm2d is traced through: its blocks are `conv·S + B` arithmetic (an affine
    # block), folded by the affine kernels, and left as that arithmetic in Eval.
    frozen = {n for n, m in case.model.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    lowered = Counter((i.lowering, i.bn in frozen) for i in infos)
    modules = Counter(n.target for n in tuned.graph.nodes if n.op == "call_module")
    functions = Counter(n.target for n in tuned.graph.nodes if n.op == "call_function")
    assert functions[conv_bn_tune] + functions[linear_bn_tune] == lowered[Mode.TUNE, False], \
        tuned.code
    assert functions[conv_affine_tune] == lowered[Mode.TUNE, True], tuned.code
    assert functions[conv_bn_deploy] + functions[linear_bn_deploy] == \
        lowered[Mode.DEPLOY, False], tuned.code
    assert functions[conv_affine_deploy] == lowered[Mode.DEPLOY, True], tuned.code
    assert functions[F.batch_norm] == lowered[Mode.EVAL, False], tuned.code
    for bn, calls in bn_calls.items():   # a folded or Eval-lowered block drops its BN call
        if bn in frozen:   # never a module call: its forward is traced through
            assert modules[bn] == 0, f"{bn}: called as a module\n{tuned.code}"
            continue
        gone = sum(1 for i in infos if i.bn == bn and i.lowering in
                   (Mode.TUNE, Mode.DEPLOY, Mode.EVAL))
        assert modules[bn] == calls - gone, f"{bn}: {modules[bn]} calls left\n{tuned.code}"
    for conv, calls in case.conv_calls.items():   # a folded block drops its conv call
        gone = sum(1 for i in infos if i.conv == conv and i.folded)
        assert modules[conv] == calls - gone, f"{conv}: {modules[conv]} calls left\n{tuned.code}"


# The 2x-float32 bound plus a floor of 1e-5 of the largest reference magnitude in the
# comparison (compare_to_float64's default floor is 1e-6 of the tensor's own magnitude). Why:
# a bias in front of a batch-statistics BN has an exactly-zero gradient, and a 1-channel BN's
# parameter gradients are short cancelling sums that CPU BN accumulates in double, so the plain
# float32 error there is noise, and any other float32 order of the same sums lands at 2-3x that
# noise (fuzz seeds 4, 40, 123, 237, 248). A wrong fold, stale lowering or stale Deploy weights
# is off by 1e-3 of that magnitude or more, so this floor hides none of them.
FLOOR = 1e-5


def off_against_float64(model, tuned, x: torch.Tensor, grads: bool = True) -> list:
    """The deviations outside the bound above (an empty list when all is well)."""
    # With floor=1, compare_to_float64's bound is 2x baseline plus the reference magnitude.
    devs = compare_to_float64(model, tuned, [x], grads=grads, floor=1.0)
    scale = max((d.bound - 2 * d.baseline for d in devs), default=0.0)
    return [d for d in devs if d.error > 2 * d.baseline + FLOOR * scale]


def check_numerics(case: FuzzCase, model, tuned, x: torch.Tensor) -> None:
    bad = off_against_float64(model, tuned, x)
    lines = [f"{d.name}: error {d.error:.3g}, float32 error {d.baseline:.3g}" for d in bad]
    assert not bad, "off against float64:\n" + "\n".join(lines) + f"\n{case}\n{tuned.code}"


def check_input_grad(model, tuned, x: torch.Tensor) -> None:
    """Gradient to the input (what an attack on a frozen model needs) against float64."""
    ref = copy.deepcopy(model).double()
    grads = []
    for m, inp in ((ref, x.double()), (model, x), (tuned, x)):
        inp = inp.detach().requires_grad_(True)
        outs = m(inp)
        gen = torch.Generator().manual_seed(7)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
        grads.append(torch.autograd.grad(loss, inp)[0].double())
    base = (grads[1] - grads[0]).abs().max().item()
    err = (grads[2] - grads[0]).abs().max().item()
    assert err <= 2 * base + FLOOR * max(grads[0].abs().max().item(), 1e-3), (err, base)


def _snapshot(module) -> dict:
    return {
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "flags": [(n, m.training) for n, m in module.named_modules()],
        "grad": [(n, p.requires_grad) for n, p in module.named_parameters()],
        "code": module.code if isinstance(module, torch.fx.GraphModule) else None,
    }


def _same_snapshot(a: dict, b: dict) -> bool:
    return (a["flags"] == b["flags"] and a["grad"] == b["grad"] and a["code"] == b["code"]
            and a["state"].keys() == b["state"].keys()
            and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"]))


def _sgd_step(tuned, x: torch.Tensor) -> None:
    params = [p for p in tuned.parameters() if p.requires_grad]
    if not params:
        return
    loss = sum((o * o).mean() for o in tuned(x))
    if not loss.requires_grad:   # no output depends on a trainable parameter
        return
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(0.05 * g)


# -- the property ------------------------------------------------------------------------------

def _step(rng: random.Random, case: FuzzCase, model, source, tuned, x, history: list[str]):
    """One random state change (or deepcopy, or an inference-mode check)."""
    action = rng.choice(list(STATES) + ["sgd", "deepcopy", "inference"])
    history.append(action)
    if action == "sgd":
        _sgd_step(tuned, x)
    elif action == "deepcopy":
        # One memo for all keeps them sharing modules, as a deepcopy of a wrapper would.
        model, source, tuned = copy.deepcopy((model, source, tuned))
        case.model = model
        assert {id(p) for p in tuned.parameters()} <= {id(p) for p in model.parameters()}
    elif action == "inference":
        with torch.inference_mode():
            bad = off_against_float64(source, tuned, x, grads=False)
        assert not bad, f"inference mode: {bad}\n{case}"
    else:
        target = rng.choice(["model", "tuned"])
        history[-1] += f" on {target}"
        apply_state(action, model if target == "model" else tuned, rng)
    return model, source, tuned


def run_case(seed: int) -> None:
    case = make_case(seed)
    rng = random.Random(seed * 7919 + 1)
    gen = torch.Generator().manual_seed(seed + 1)
    model = case.model
    first = rng.choice(["train", "eval", "finetune", "frozen", "mixed"])
    apply_state(first, model, rng)
    mode = _pick_mode(rng, seed)
    via_fx = rng.random() < 0.2
    history = [f"state {first}", f"tune_mode({'symbolic_trace(model)' if via_fx else 'model'}, "
               f"{getattr(mode, '__name__', mode)!s})"]
    source = torch.fx.symbolic_trace(model) if via_fx else model

    blocks, _ = _oracle_blocks(case, via_fx)
    problems = [_expected(model, c, b, "", True, mode)[1] for (c, b, ok) in blocks if ok]
    before = _snapshot(source)
    if any(problems):
        with pytest.raises(ModeError):
            convbn_fx.tune_mode(source, mode)
        mode = "auto"
    tuned = convbn_fx.tune_mode(source, mode)
    assert _same_snapshot(before, _snapshot(source)), "tune_mode changed its input"
    assert tuned.state_dict().keys() == source.state_dict().keys()
    shared = {k: v.data_ptr() for k, v in source.state_dict().items()}
    assert shared == {k: v.data_ptr() for k, v in tuned.state_dict().items()}

    try:
        for _ in range(rng.randint(2, 5)):
            x = torch.randn(case.input.shape, generator=gen)
            check_describe(case, model, tuned, mode, via_fx)
            # The unrewritten reference is what was passed in: symbolic_trace bakes buffers
            # read inside traced-through modules (FrozenBatchNorm2d) into constants, and the
            # rewrite must compute what that GraphModule computes.
            check_numerics(case, source, tuned, x)
            if not any(p.requires_grad for p in model.parameters()):
                check_input_grad(source, tuned, x)
            model, source, tuned = _step(rng, case, model, source, tuned, x, history)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nsteps: {'; '.join(history)}") from None


def test_fuzz(seed):
    run_case(seed)
