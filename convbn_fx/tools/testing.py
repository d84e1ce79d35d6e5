"""Checks for rewritten models: float64 references, randomised BN, saved-for-backward bytes.

The project's standard: a rewritten model is compared with a float64 copy of the unrewritten
one, on outputs and on the gradient of every parameter, and its error must stay within 2x the
plain float32 model's own error (plus a tiny absolute floor, 1e-6 of the largest reference
norm among outputs, or among gradients). Error is the L2 norm of the
difference from float64: the max-abs of a single element is too noisy a statistic over the
hundreds of tensors of a real network (measured on mobilenet_v2: median ratio to float32's
error 1.08 either way, but single-element maxima reach 2.5x while norms stay under 2x). BN statistics are randomised
first: an identity BN hides a wrong fold. These helpers are public so users can check their
own models the same way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ..vocabulary.kinds import all_bn_types, holds_statistics

__all__ = ["output_tensors", "randomize_bn", "finetune_state", "frozen_state", "compare_to_float64",
           "assert_close_to_float64", "saved_tensor_bytes", "Deviation"]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN, and every module holding running statistics (frozen norms), random,
    non-trivial statistics and affine."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, all_bn_types()) and not holds_statistics(m):
                continue
            n = m.running_var.shape[0] if getattr(m, "running_var", None) is not None else None
            if n is not None:
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 1.0 + 0.5)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
    return model


def finetune_state(model: nn.Module) -> nn.Module:
    """The transfer-learning state: `model.train()`, then every BN `.eval()` (frozen BN)."""
    model.train()
    for m in model.modules():
        if isinstance(m, all_bn_types()):
            m.eval()
    return model


def frozen_state(model: nn.Module) -> nn.Module:
    """Inference with no parameter requiring grad (where `auto` picks Deploy)."""
    model.eval()
    model.requires_grad_(False)
    return model


def output_tensors(out) -> list[torch.Tensor]:
    """Every tensor in a model output (nested tuples, lists and dicts), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in output_tensors(v)]
    return []


def _run(model: nn.Module, inputs: tuple, weights: list[torch.Tensor] | None, grads: bool):
    """Outputs and parameter gradients of `sum(out * w)` (random weights, not a plain sum)."""
    for p in model.parameters():
        p.grad = None
    with torch.random.fork_rng():
        torch.manual_seed(0)  # same dropout / stochastic-depth masks in every run
        outs = output_tensors(model(*inputs))
    if weights is None:
        gen = torch.Generator().manual_seed(1234)
        weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    result = {f"output{i}": o.detach().double() for i, o in enumerate(outs)}
    if grads:
        loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights) if o.is_floating_point())
        if loss.requires_grad:
            loss.backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                result[f"grad {name}"] = p.grad.detach().double()
    return result, weights


@dataclass
class Deviation:
    name: str
    error: float        # ||rewritten - float64||
    baseline: float     # ||plain float32 - float64||
    bound: float        # 2 * baseline + floor * ||float64||

    @property
    def ok(self) -> bool:
        return self.error <= self.bound


def compare_to_float64(original: nn.Module, rewritten: nn.Module, inputs: Iterable,
                       grads: bool = True, floor: float = 1e-6,
                       reference: nn.Module | None = None) -> list[Deviation]:
    """Compare `rewritten` and plain float32 `original` against a float64 copy of `original`.

    `original` must be the unrewritten model in the state to check; its float64 copy is made
    here (or pass `reference`, an already float64 model with the same state). Returns one
    `Deviation` per output and per parameter gradient; the bound is 2x the float32 model's
    error plus `floor` (about 8 float32 ulps) times the largest reference norm of its kind.
    """
    inputs = tuple(inputs)
    ref = reference if reference is not None else copy.deepcopy(original).double()
    ref_out, weights = _run(ref, tuple(t.double() if t.is_floating_point() else t
                                       for t in inputs), None, grads)
    plain_out, _ = _run(original, inputs, weights, grads)
    new_out, _ = _run(rewritten, inputs, weights, grads)
    # The floor is absolute: a fraction of the largest reference norm among the outputs (for
    # outputs) or among the gradients (for gradients). A vanishing gradient, orders of
    # magnitude below the rest, is float32 rounding noise for both models alike.
    scale = {kind: max((r.norm().item() for n, r in ref_out.items() if n.startswith(kind)),
                       default=0.0) for kind in ("output", "grad")}
    devs = []
    for name, r in ref_out.items():
        if name not in new_out or name not in plain_out:
            missing = "rewritten" if name not in new_out else "plain"
            devs.append(Deviation(f"{name} (missing in {missing})", float("inf"), 0.0, 0.0))
            continue
        base = (plain_out[name] - r).norm().item()
        err = (new_out[name] - r).norm().item()
        kind = "output" if name.startswith("output") else "grad"
        devs.append(Deviation(name, err, base, 2 * base + floor * scale[kind]))
    extra = set(new_out) - set(ref_out)
    devs += [Deviation(f"{n} (only in rewritten)", float("inf"), 0.0, 0.0) for n in extra]
    return devs


def assert_close_to_float64(original: nn.Module, rewritten: nn.Module, inputs: Iterable,
                            **kwargs) -> None:
    """Raise AssertionError naming every output or gradient outside the 2x-float32 bound."""
    bad = [d for d in compare_to_float64(original, rewritten, inputs, **kwargs) if not d.ok]
    if bad:
        lines = [f"{d.name}: error {d.error:.3g} > bound {d.bound:.3g} "
                 f"(float32 error {d.baseline:.3g})" for d in bad[:10]]
        raise AssertionError(f"{len(bad)} tensors off against float64:\n" + "\n".join(lines))


def saved_tensor_bytes(step: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd keeps for backward during `step()`, counting each storage once.

    `step` runs a forward and returns the loss; backward is run here so the graph is freed.
    """
    storages: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        storages[(st.data_ptr(), t.device)] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(storages.values())
