"""The arithmetic of folding BN into a convolution, as functions the rewritten graph calls.

Tune mode (You et al., arXiv 2305.11624, eq. 4) runs `conv(x, W·s, b')` with
`s = γ·rsqrt(var+ε)` and `b' = β + s·(b − μ)`. Written naively, autograd keeps the folded weight
`W·s` of every block alive until backward; `conv_scaled` recomputes it in backward instead, so
a Tune step saves what a Deploy step saves (the input and one weight-sized tensor). Deploy
folds under no_grad and caches the result until one of its inputs changes.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch

__all__ = ["scale_weight", "channel_sum", "conv_scaled", "frozen_fold"]


def _group_view(weight: torch.Tensor, groups: int) -> tuple[int, ...]:
    # A transposed conv's weight is [C_in, C_out/groups, *k]: output channel g*C_out/groups + j
    # lives at [g-th block of C_in, j], so dim 1 alone is not the output channel when groups > 1.
    c_in, c_out_per_group = weight.shape[:2]
    return (groups, c_in // groups, c_out_per_group)


def scale_weight(weight: torch.Tensor, scale: torch.Tensor, transposed: bool = False,
                 groups: int = 1) -> torch.Tensor:
    """Multiply a conv (or linear) weight by `scale`, one factor per output channel."""
    if not transposed:
        return weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    spatial = (1,) * (weight.dim() - 2)
    g, cin_g, cout_g = _group_view(weight, groups)
    scaled = weight.reshape((g, cin_g, cout_g) + weight.shape[2:]) * scale.reshape(
        (g, 1, cout_g) + spatial)
    return scaled.reshape(weight.shape)


def channel_sum(t: torch.Tensor, transposed: bool = False, groups: int = 1) -> torch.Tensor:
    """Sum a weight-shaped tensor down to one value per output channel (adjoint of scaling)."""
    if not transposed:
        return t.reshape(t.shape[0], -1).sum(1)
    g, cin_g, cout_g = _group_view(t, groups)
    return t.reshape(g, cin_g, cout_g, -1).sum((1, 3)).reshape(-1)


class _ConvScaledWeight(torch.autograd.Function):
    """conv(x, W·s, bias) that keeps x, W and s for backward, not W·s."""

    @staticmethod
    def forward(x, weight, scale, bias, stride, padding, dilation, transposed, output_padding,
                groups):
        w = scale_weight(weight, scale, transposed, groups)
        return torch.convolution(x, w, bias, stride, padding, dilation, transposed,
                                 output_padding, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, scale, bias, *config = inputs
        ctx.save_for_backward(x, weight, scale)
        ctx.config = config
        ctx.bias_sizes = None if bias is None else list(bias.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation, transposed, output_padding, groups = ctx.config
        need_x, need_w, need_s, need_b = ctx.needs_input_grad[:4]
        w = scale_weight(weight, scale, transposed, groups)  # recomputed, never stored
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x, w, ctx.bias_sizes, stride, padding, dilation, transposed,
            output_padding, groups, [need_x, need_w or need_s, need_b and ctx.bias_sizes is not None],
        )
        grad_weight = scale_weight(grad_w, scale, transposed, groups) if need_w else None
        grad_scale = channel_sum(grad_w * weight, transposed, groups) if need_s else None
        return (grad_x, grad_weight, grad_scale, grad_b) + (None,) * 6


def conv_scaled(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], transposed: bool, output_padding: Sequence[int],
                groups: int) -> torch.Tensor:
    """`torch.convolution(x, W·s, bias, ...)` with `W·s` recomputed in backward.

    Differentiable to x, W, s and bias. Without autograd (inference, or nothing requires grad)
    it is the plain expression, so compilers and exporters see ordinary aten ops.
    """
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (x, weight, scale, bias))
    if not needs_grad or not isinstance(x, torch.Tensor) or torch.compiler.is_exporting():
        w = scale_weight(weight, scale, transposed, groups)
        return torch.convolution(x, w, bias, stride, padding, dilation, transposed,
                                 output_padding, groups)
    return _ConvScaledWeight.apply(x, weight, scale, bias, list(stride), list(padding),
                                   list(dilation), transposed, list(output_padding), groups)


def _fold(weight, bias, mean, var, gamma, beta, eps, transposed, groups):
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = gamma * scale
    shift = -mean if bias is None else bias - mean
    shift = scale * shift
    if beta is not None:
        shift = beta + shift
    return scale_weight(weight, scale, transposed, groups), shift


# Folded Deploy weights, per conv weight, keyed by which BN tensors they were folded with.
# Weak keys: the cache lives exactly as long as the conv weight does.
_FROZEN: "weakref.WeakKeyDictionary[torch.Tensor, dict]" = weakref.WeakKeyDictionary()


def _stamp(tensors) -> tuple:
    # Identity, storage and in-place version: any optimizer step, copy_, load_state_dict,
    # .to() or reassignment changes one of them.
    return tuple((None if t is None else (id(t), t.data_ptr(), t._version, t.dtype))
                 for t in tensors)


def frozen_fold(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor,
                var: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                eps: float, transposed: bool = False, groups: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Deploy's constant (W·s, b'): folded once, refolded whenever an input tensor changes.

    The result carries no gradient to the block's parameters (Deploy is chosen only when none
    requires one); gradients still flow to the conv's input through the conv that uses it.
    """
    tensors = (weight, bias, mean, var, gamma, beta)
    if (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.is_inference_mode_enabled()):
        # Compilers constant-fold this themselves; inference tensors must not be cached, as
        # they cannot be used later outside inference mode.
        with torch.no_grad():
            return _fold(*tensors, eps, transposed, groups)
    per_weight = _FROZEN.setdefault(weight, {})
    key = (id(mean), id(var), eps, transposed, groups)
    stamp = _stamp(tensors)
    hit = per_weight.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1], hit[2]
    with torch.no_grad():
        folded_w, folded_b = _fold(*tensors, eps, transposed, groups)
    per_weight[key] = (stamp, folded_w, folded_b)
    return folded_w, folded_b
