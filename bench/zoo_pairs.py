"""The sweep's instruments: conv→norm pairs counted by hooks, and the state a model is swept in.

Pairs are counted on the plain model, independently of convbn_fx's matcher: a norm whose input
is the output of a conv (the same tensor object, not modified in place since) makes one pair;
every hooked output is kept alive while counting, so no id is reused. A Linear's output
reaching a norm directly, or through a view of the whole output (LeViT's
`bn(linear(x).flatten(0, 1))`), is a *linear* pair. A pair whose conv output is also read by
something else (a residual add) is *shared*: no fold can remove that output.

Which modules are norms is the instrument's own rule (`norm_rule`), not the library's: torch's
BN classes, convbn_fx's known frozen norms, and any module whose class name ends in
"FrozenBatchNorm2d" or that holds buffers weight/bias/running_mean/running_var and no
parameters of its own (Hugging Face's frozen BNs; both rules pick the same modules there).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from convbn_fx.vocabulary.kinds import all_bn_types

__all__ = ["Pairs", "norm_rule", "find_pairs", "count_pairs", "prepare", "calibrate"]

_FROZEN_BUFFERS = {"weight", "bias", "running_mean", "running_var"}


def norm_rule(m: nn.Module) -> str | None:
    """Why the sweep counts `m` as a norm: "bn" (torch's BN classes and convbn_fx's frozen
    norms), "name" (class name ends in FrozenBatchNorm2d), "buffers" (the four BN tensors
    as buffers, no parameters of its own); None when it is not one."""
    if isinstance(m, (_BatchNorm,) + all_bn_types()):
        return "bn"
    if type(m).__name__.endswith("FrozenBatchNorm2d"):
        return "name"
    if _FROZEN_BUFFERS <= {n for n, _ in m.named_buffers(recurse=False)} \
            and not any(True for _ in m.parameters(recurse=False)):
        return "buffers"
    return None


def _frozen_by_buffers(m: nn.Module) -> bool:
    return norm_rule(m) != "bn" and _FROZEN_BUFFERS <= {
        n for n, _ in m.named_buffers(recurse=False)} and not list(m.parameters(recurse=False))


@dataclass
class Pairs:
    """Conv/Linear→norm call pairs of one forward, as (producer, norm) qualified names."""

    conv: list = field(default_factory=list)         # the same tensor object
    conv_view: list = field(default_factory=list)    # a view of the whole conv output
    linear: list = field(default_factory=list)       # Linear output, direct or a view
    shared: list = field(default_factory=list)       # of all these, the conv (Linear) output
                                                     # has another consumer: not foldable
    views: frozenset = frozenset()                   # the pairs read through a view
    norms: int = 0
    frozen: dict = field(default_factory=dict)


_VALUE_PROPERTIES = {"T", "mT", "H", "mH", "real", "imag", "data"}
# Calls that read only the shape/dtype of a tensor argument: `y.reshape_as(x)` (LeViT's
# `bn(linear(x).flatten(0, 1)).reshape_as(linear output)`) reads only x's shape.
_SHAPE_OF_SECOND = {"reshape_as", "view_as", "expand_as", "type_as"}
_SHAPE_ONLY = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
               "new_zeros", "new_ones", "new_empty", "new_full"}


class _Uses(torch.overrides.TorchFunctionMode):
    """Counts the torch calls that read the values of the watched tensors (not their shape,
    dtype or other metadata): a conv output read by its norm and by anything else is shared."""

    def __init__(self, watched: dict):
        super().__init__()
        self.watched, self.uses, self.on = watched, Counter(), True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.on and self.watched:
            name = getattr(func, "__name__", "")
            if name == "__get__":
                name = getattr(getattr(func, "__self__", None), "__name__", "")
                if name not in _VALUE_PROPERTIES:
                    return out
            if name in _SHAPE_ONLY:
                return out
            if name in _SHAPE_OF_SECOND:
                args = args[:1]
            if _has_tensor(out):
                for a in {id(t) for t in _leaves((args, kwargs)) if id(t) in self.watched}:
                    self.uses[a] += 1
        return out


def _leaves(value) -> list:
    found = []
    torch.utils._pytree.tree_map(lambda t: found.append(t) if isinstance(t, torch.Tensor)
                                 else None, value)
    return found


def _has_tensor(value) -> bool:
    return bool(_leaves(value))


def find_pairs(model: nn.Module, *inputs) -> Pairs:
    """Hook every conv, Linear and norm of a plain model and run it once (no grad)."""
    names = {id(m): n for n, m in model.named_modules()}
    outputs: dict[int, tuple] = {}  # id -> (tensor, version, kind, name): kept alive
    seen: dict[tuple[int, int], tuple[str, int, str, str]] = {}
    uses = _Uses(outputs)
    found = Pairs()
    handles = []

    def on_producer(kind):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                outputs[id(out)] = (out, out._version, kind, names.get(id(module), "?"))
        return hook

    def on_norm(module, args, kwargs):
        uses.on = False
        try:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(x, torch.Tensor):
                return
            how, rec = "", outputs.get(id(x))
            if rec is None and x._base is not None and x.numel() == x._base.numel():
                how, rec = "view", outputs.get(id(x._base))
            if rec is None or rec[1] != x._version:  # modified in place: not a conv output
                return
            seen[(id(x), id(module))] = (rec[2] + how, id(rec[0]), rec[3],
                                         names.get(id(module), "?"))
        finally:
            uses.on = True

    for m in model.modules():
        rule = norm_rule(m)
        if rule:
            found.norms += 1
            handles.append(m.register_forward_pre_hook(on_norm, with_kwargs=True))
        elif isinstance(m, _ConvNd):
            handles.append(m.register_forward_hook(on_producer("conv")))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(on_producer("linear")))
    found.frozen = {"name": sum(type(m).__name__.endswith("FrozenBatchNorm2d")
                                for m in model.modules()),
                    "buffers": sum(_frozen_by_buffers(m) for m in model.modules())}
    try:
        with torch.no_grad(), uses:
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    lists = {"conv": found.conv, "convview": found.conv_view, "linear": found.linear,
             "linearview": found.linear}
    for kind, producer, conv, norm in seen.values():
        lists[kind].append((conv, norm))
        if kind.endswith("view"):
            found.views |= {(conv, norm)}
        if uses.uses[producer] > 1:  # the norm (or the view it reads) and something else
            found.shared.append((conv, norm))
    return found


def count_pairs(model: nn.Module, x: torch.Tensor) -> int:
    """Conv→norm pairs of a plain model: norm calls whose input is a conv call's output."""
    return len(find_pairs(model, x).conv)


# ------------------------------------------------------------------------ the model's state

def prepare(model: nn.Module, x: torch.Tensor | None = None, seed: int = 0) -> nn.Module:
    """Random, non-trivial norm statistics and affine (every counted norm kind, frozen ones
    too), then the fine-tuning state: train(), every norm eval().

    Without an input, running mean ~ 0.2·N(0, 1) and variance ~ U(0.5, 2) (as timm and
    torchvision are swept). With an input `x`, each norm's statistics are drawn around those
    of its own input on `x` instead (`calibrate`): Hugging Face initialises convs with std
    0.02, so with statistics around 0 and 1 a deep model's output does not depend on its
    input (MobileNet, EfficientNet, MobileViT, HGNetV2 gave the same logits for every image),
    and the float64 checks would compare two constants.
    """
    gen = torch.Generator().manual_seed(seed)
    model.train()
    norms = [m for m in model.modules() if norm_rule(m)]
    for m in norms:
        m.eval()
    with torch.no_grad():
        for m in norms:
            _randomize(m, gen)
    if x is not None:
        calibrate(model, x, gen)
    return model


def _randomize(m: nn.Module, gen, mean=None, var=None) -> None:
    """Running statistics around (mean, var) (default 0 and 1), weight ~ U(0.5, 1.5), bias
    ~ 0.2·N(0, 1)."""
    if getattr(m, "running_var", None) is not None:
        n = m.running_var.shape[0]
        mean = torch.zeros(n) if mean is None else mean
        var = torch.ones(n) if var is None else var
        m.running_mean.copy_(mean + torch.randn(n, generator=gen) * 0.2 * var.sqrt())
        m.running_var.copy_(var * (torch.rand(n, generator=gen) * 1.5 + 0.5))
    if getattr(m, "weight", None) is not None:
        m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 1.0 + 0.5)
    if getattr(m, "bias", None) is not None:
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)


def calibrate(model: nn.Module, x: torch.Tensor, gen) -> None:
    """One forward (no grad) in which each norm, before it runs, draws its statistics around
    those of its own input, so that every layer sees inputs of order one and nothing vanishes
    or explodes with depth."""
    handles = []

    def pre(module, args, kwargs):
        t = args[0] if args else next(iter(kwargs.values()))
        dims = [d for d in range(t.dim()) if d != 1]
        # Each channel's mean, but one variance for the layer (the channels' average): a
        # (nearly) constant channel (dead after a ReLU, or 2 samples at 1x1 resolution)
        # would get a gain of up to 1/sqrt(eps), which turns float32 rounding into signal.
        mean = t.mean(dims)
        var = t.var(dims, unbiased=False).mean().expand_as(mean) + 1e-5
        if mean.shape == module.running_mean.shape:
            _randomize(module, gen, mean, var)

    for m in model.modules():
        if norm_rule(m) and getattr(m, "running_var", None) is not None:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            model(x)
    finally:
        for h in handles:
            h.remove()
