"""The arithmetic of folding BN into a convolution, written once for every caller.

Tune mode (You et al., arXiv 2305.11624, eq. 4) runs `conv(x, W·s, b')` with
`s = γ·rsqrt(var+ε)` and `b' = β + s·(b − μ)`. Tune's per-call fold, Deploy's cached fold and
`deploy_mode`'s float64 fold all compute it here, so they cannot drift apart.
"""

from __future__ import annotations

import torch

__all__ = ["scale_and_shift", "scale_weight", "channel_sum", "channel_dot", "fold"]


def scale_and_shift(bias, mean, var, gamma, beta, eps):
    """`s = γ·rsqrt(var+ε)` and `b' = β + s·(b − μ)`, with absent b, γ, β left out."""
    inv_std = torch.rsqrt(var + eps)
    scale = inv_std if gamma is None else gamma * inv_std
    shift = scale * (-mean if bias is None else bias - mean)
    return scale, shift if beta is None else beta + shift


def _group_view(weight: torch.Tensor, groups: int) -> tuple[int, ...]:
    # A transposed conv's weight is [C_in, C_out/groups, *k]: output channel g*C_out/groups + j
    # lives at [g-th block of C_in, j], so dim 1 alone is not the output channel when groups > 1.
    c_in, c_out_per_group = weight.shape[:2]
    return (groups, c_in // groups, c_out_per_group)


def scale_weight(weight: torch.Tensor, scale: torch.Tensor, transposed: bool = False,
                 groups: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """Multiply a conv (or linear) weight by `scale`, one factor per output channel.

    `out` is a contiguous weight-shaped tensor to write to (`weight` itself: in place). On a
    CPU a fresh weight-sized tensor costs more than the multiply (its pages fault in), so
    backward scales gradients it owns in place.
    """
    if not transposed:
        factor = scale.reshape((-1,) + (1,) * (weight.dim() - 1))
        return weight * factor if out is None else torch.mul(weight, factor, out=out)
    spatial = (1,) * (weight.dim() - 2)
    g, cin_g, cout_g = _group_view(weight, groups)
    view = (g, cin_g, cout_g) + weight.shape[2:]
    factor = scale.reshape((g, 1, cout_g) + spatial)
    if out is not None and out.is_contiguous():
        torch.mul(weight.reshape(view), factor, out=out.view(view))
        return out
    return (weight.reshape(view) * factor).reshape(weight.shape)


def channel_sum(t: torch.Tensor, transposed: bool = False, groups: int = 1) -> torch.Tensor:
    """Sum a weight-shaped tensor down to one value per output channel (adjoint of scaling)."""
    if not transposed:
        return t.reshape(t.shape[0], -1).sum(1)
    g, cin_g, cout_g = _group_view(t, groups)
    return t.reshape(g, cin_g, cout_g, -1).sum((1, 3)).reshape(-1)


def channel_dot(a: torch.Tensor, b: torch.Tensor, transposed: bool = False, groups: int = 1,
                scratch: torch.Tensor | None = None) -> torch.Tensor:
    """`channel_sum(a·b)`: ∂s = Σ ∂W'·W per output channel, the product written to `scratch`
    (a contiguous weight-shaped tensor no longer needed) when given, else to a new tensor."""
    product = a * b if scratch is None else torch.mul(a, b, out=scratch)
    return channel_sum(product, transposed, groups)


def fold(weight, bias, mean, var, gamma, beta, eps, transposed: bool = False,
         groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded conv parameters `(W·s, b')` of a block with frozen BN."""
    scale, shift = scale_and_shift(bias, mean, var, gamma, beta, eps)
    return scale_weight(weight, scale, transposed, groups), shift
