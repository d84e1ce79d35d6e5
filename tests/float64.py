"""The float64 algebra check: a rewritten float64 model against the float64 original.

Both run in float64, so any difference beyond ~1e-9 (relative) is a wrong fold, not rounding:
outputs, and the gradient of `sum(out * weight)` (random weights) for every parameter. For
compiled or wrapped models, `call` runs the model and `params` names the parameters, since
torch.compile and DDP prefix the names.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["outputs_and_grads", "assert_algebra"]


def outputs_and_grads(call, params: nn.Module, x: torch.Tensor, weight: torch.Tensor):
    """`call(x)` and the gradient of `sum(out * weight)` for each named parameter of `params`."""
    for p in params.parameters():
        p.grad = None
    out = call(x)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad for n, p in params.named_parameters() if p.grad is not None}


def assert_algebra(reference: nn.Module, call, params: nn.Module, x: torch.Tensor,
                   rtol: float = 1e-9) -> None:
    """Outputs and every parameter gradient of `call` equal `reference`'s to `rtol`."""
    weight = torch.randn(reference(x).shape, generator=torch.Generator().manual_seed(3),
                         dtype=x.dtype)
    want_out, want = outputs_and_grads(reference, reference, x, weight)
    got_out, got = outputs_and_grads(call, params, x, weight)
    assert set(got) == set(want), set(got) ^ set(want)
    assert len(want) == len(list(reference.parameters())), "a parameter got no gradient"
    torch.testing.assert_close(got_out, want_out, rtol=rtol, atol=rtol * want_out.abs().max())
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=rtol, atol=rtol * g.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")
