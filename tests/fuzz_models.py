"""Random conv/BN models from a seed, for the property tests in test_fuzz.py.

A model is a small straight-line program over tensors (conv, BN, conv→BN, nested Sequential
blocks, ReLU, residual adds, taps to the output), with convs and BNs sometimes reused and conv
outputs sometimes used more than once. Every module is run on a real tensor while the program
is built, so the model is always valid in eager mode; shapes stay tiny so hundreds of cases run
in seconds. The generator also records which call sites are conv→BN blocks and whether each
one may be folded, which is the oracle `describe()` is checked against.
"""

from __future__ import annotations

import random
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

from convbn_fx.tools.testing import finetune_state, frozen_state, randomize_bn

__all__ = ["FuzzNet", "FuzzCase", "make_case", "STATES", "apply_state"]

CONV = {False: {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d},
        True: {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
MAX_C, MAX_S = 8, 10


class FuzzNet(nn.Module):
    """Runs `program`: each step reads earlier values by index and appends one value."""

    def __init__(self, program: list[tuple], outputs: list[int]):
        super().__init__()
        self.program = program
        self.outputs = outputs

    def forward(self, x):
        vals = [x]
        for op, *args in self.program:
            if op == "mod":            # ("mod", name, src): conv, BN, Sequential or ReLU
                vals.append(self.get_submodule(args[0])(vals[args[1]]))
            elif op == "relu":
                vals.append(F.relu(vals[args[0]]))
            elif op == "add":
                vals.append(vals[args[0]] + vals[args[1]])
        return tuple(vals[i] for i in self.outputs)


@dataclass
class FuzzCase:
    seed: int
    model: FuzzNet
    input: torch.Tensor
    dims: int
    blocks: Counter = field(default_factory=Counter)     # (conv, bn, foldable) -> call sites
    bn_calls: Counter = field(default_factory=Counter)   # BN name -> call sites
    conv_calls: Counter = field(default_factory=Counter)
    lines: list[str] = field(default_factory=list)       # the program, for failure messages

    def __str__(self) -> str:
        shape = "x".join(map(str, self.input.shape))
        return f"seed {self.seed}, {self.dims}-d, input {shape}:\n  " + "\n  ".join(self.lines)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _random_conv(rng: random.Random, dims: int, c_in: int) -> nn.Module:
    transposed = rng.random() < 0.25
    groups = rng.choice([1, 1, 1] + _divisors(c_in))
    c_out = groups * rng.randint(1, max(1, MAX_C // groups))
    k = tuple(rng.randint(1, 3) for _ in range(dims)) if rng.random() < 0.3 else rng.randint(1, 3)
    stride = rng.choice([1, 1, 2])
    dilation = rng.choice([1, 1, 2])
    kw = dict(stride=stride, dilation=dilation, groups=groups, bias=rng.random() < 0.5)
    if transposed:
        kw["padding"] = rng.randint(0, 1)
        kw["output_padding"] = rng.randint(0, max(stride, dilation) - 1)
    else:
        choices = [0, 1, 2, tuple(rng.randint(0, 2) for _ in range(dims))]
        if stride == 1:
            choices += ["same", "valid"]
        kw["padding"] = rng.choice(choices)
        kw["padding_mode"] = rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
    return CONV[transposed][dims](c_in, c_out, k, **kw)


def _random_bn(rng: random.Random, dims: int, c: int) -> nn.Module:
    if dims == 2 and rng.random() < 0.15:
        return FrozenBatchNorm2d(c)
    return BN[dims](c, affine=rng.random() < 0.8, track_running_stats=rng.random() < 0.85)


def _channels(bn: nn.Module) -> int:
    return bn.num_features if hasattr(bn, "num_features") else bn.running_var.shape[0]


def _fits(t: torch.Tensor) -> bool:
    return t.shape[1] <= MAX_C and all(2 <= s <= MAX_S for s in t.shape[2:])


def make_case(seed: int) -> FuzzCase:
    """A random model, input and block oracle; the same seed always gives the same case."""
    # Module initialisation draws from the global generator: seed it, without disturbing it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _make_case(seed)


def _make_case(seed: int) -> FuzzCase:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    dims = rng.choice([1, 2, 2, 3])
    spatial = {1: (4, 10), 2: (4, 8), 3: (3, 5)}[dims]
    shape = (2, rng.randint(1, 6)) + tuple(rng.randint(*spatial) for _ in range(dims))
    x = torch.randn(shape, generator=gen)

    net = FuzzNet([], [])
    program, lines = net.program, []
    vals = [x]                       # eager values, for shapes
    producer: list[str | None] = [None]   # conv name that produced each value, else None
    users: list[set] = [set()]
    convs: dict[str, nn.Module] = {}
    bns: dict[str, nn.Module] = {}
    case = FuzzCase(seed, net, x, dims, lines=lines)
    sites: list[tuple[str, str, int]] = []   # (conv, bn, value index of the conv output)

    def emit(step: tuple, value: torch.Tensor, text: str, conv: str | None = None) -> int:
        idx = len(vals)
        for src in step[2:] if step[0] == "mod" else step[1:]:
            users[src].add(idx)
        program.append(step)
        vals.append(value)
        producer.append(conv)
        users.append(set())
        lines.append(f"v{idx} = {text}")
        return idx

    def pick(pred=lambda v: True) -> int | None:
        ok = [i for i, v in enumerate(vals) if pred(v)]
        if not ok:
            return None
        return ok[-1] if rng.random() < 0.6 else rng.choice(ok)

    def add_conv(src: int) -> int | None:
        c_in = vals[src].shape[1]
        reuse = [n for n, m in convs.items() if m.in_channels == c_in]
        if reuse and rng.random() < 0.2:
            name = rng.choice(reuse)
            try:
                out = convs[name](vals[src])
            except RuntimeError:   # too small an input for this conv's kernel
                out = None
            if out is not None and _fits(out):
                case.conv_calls[name] += 1
                return emit(("mod", name, src), out, f"{name}(v{src})  # reused", conv=name)
        for _ in range(10):
            conv = _random_conv(rng, dims, c_in)
            try:
                out = conv(vals[src])
            except RuntimeError:
                continue
            if _fits(out):
                break
        else:
            conv = CONV[False][dims](c_in, rng.randint(1, MAX_C), 1)
            out = conv(vals[src])
        name = f"conv{len(convs)}"
        net.add_module(name, conv)
        convs[name] = conv
        case.conv_calls[name] += 1
        return emit(("mod", name, src), out, f"{name}(v{src})  # {conv!r}", conv=name)

    def add_bn(src: int) -> int:
        c = vals[src].shape[1]
        reuse = [n for n, m in bns.items() if _channels(m) == c]
        if reuse and rng.random() < 0.25:
            name, text = rng.choice(reuse), "reused"
        else:
            name = f"bn{len(bns)}"
            bn = _random_bn(rng, dims, c)
            net.add_module(name, bn)
            bns[name] = bn
            text = repr(bn)
        idx = emit(("mod", name, src), bns[name](vals[src]), f"{name}(v{src})  # {text}")
        case.bn_calls[name] += 1
        if producer[src] is not None:
            sites.append((producer[src], name, src))
        return idx

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # 'same' padding with even kernels warns
        for _ in range(rng.randint(2, 7)):
            r = rng.random()
            if r < 0.45:                                  # conv→BN, maybe ReLU
                out = add_bn(add_conv(pick()))
                if rng.random() < 0.4:
                    emit(("relu", out), F.relu(vals[out]), f"relu(v{out})")
            elif r < 0.55:                                # nested conv→BN→ReLU Sequential
                src = pick()
                for _ in range(10):
                    conv = _random_conv(rng, dims, vals[src].shape[1])
                    try:
                        mid = conv(vals[src])
                    except RuntimeError:
                        continue
                    if _fits(mid):
                        break
                else:
                    continue
                seq = nn.Sequential(conv, _random_bn(rng, dims, mid.shape[1]), nn.ReLU())
                name = f"seq{len(program)}"
                net.add_module(name, seq)
                case.conv_calls[f"{name}.0"] += 1
                case.bn_calls[f"{name}.1"] += 1
                case.blocks[(f"{name}.0", f"{name}.1", seq[1].running_var is not None
                             or isinstance(seq[1], FrozenBatchNorm2d))] += 1
                emit(("mod", name, src), seq(vals[src]), f"{name}(v{src})  # {seq!r}")
            elif r < 0.65:                                # a conv alone (output maybe reused)
                add_conv(pick())
            elif r < 0.75:                                # BN on any value (maybe a conv's)
                add_bn(pick(lambda v: v.dim() == dims + 2))
            elif r < 0.85:                                # residual add of two same-shape values
                a = pick()
                same = [i for i, v in enumerate(vals) if i != a and v.shape == vals[a].shape]
                if same:
                    b = rng.choice(same)
                    emit(("add", a, b), vals[a] + vals[b], f"v{a} + v{b}")
            else:                                         # a conv output with two users
                convs_out = [i for i, p in enumerate(producer) if p is not None]
                if convs_out:
                    src = rng.choice(convs_out)
                    add_bn(src)
                    emit(("relu", src), F.relu(vals[src]), f"relu(v{src})")

    # Outputs: the last value and a few others (a tap makes a conv output's extra user).
    outs = {len(vals) - 1} | {i for i in range(1, len(vals)) if rng.random() < 0.2}
    net.outputs.extend(sorted(outs))
    lines.append(f"return {', '.join(f'v{i}' for i in net.outputs)}")
    for conv, bn, src in sites:
        n_users = len(users[src]) + (src in outs)
        bn_mod = bns[bn]
        stats = isinstance(bn_mod, FrozenBatchNorm2d) or bn_mod.running_var is not None
        case.blocks[(conv, bn, n_users == 1 and stats)] += 1
    randomize_bn(net, seed)
    return case


def _bns(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm,
                                                          FrozenBatchNorm2d))]


def _mixed(model: nn.Module, rng: random.Random) -> None:
    model.train()
    for bn in _bns(model):
        bn.train(rng.random() < 0.5)
    for p in model.parameters():
        p.requires_grad_(rng.random() < 0.7)


def _perturb(model: nn.Module, rng: random.Random) -> None:
    # What an optimizer step or load_state_dict does: new values in the same tensors.
    randomize_bn(model, rng.randrange(1 << 30))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "conv" in name or name.endswith(".0.weight") or name.endswith(".0.bias"):
                p.add_(torch.randn_like(p) * 0.05)


def _load(model: nn.Module, rng: random.Random) -> None:
    state = {k: (v.clone() if not v.is_floating_point()
                 else v + 0.05 * torch.randn_like(v).abs()) for k, v in model.state_dict().items()}
    model.load_state_dict(state)


STATES = {
    "train": lambda m, rng: m.train(),
    "eval": lambda m, rng: m.eval(),
    "finetune": lambda m, rng: finetune_state(m),
    "frozen": lambda m, rng: frozen_state(m),
    "unfreeze": lambda m, rng: m.requires_grad_(True),
    "mixed": _mixed,
    "perturb": _perturb,
    "load_state_dict": _load,
}


def apply_state(name: str, model: nn.Module, rng: random.Random) -> None:
    STATES[name](model, rng)
