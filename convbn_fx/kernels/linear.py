"""`linear_scaled`: a Linear by `W·s` that keeps x, W and s for backward, never `W·s`.

The Linear→BatchNorm1d fold is `linear(x, W·s, b')`, with `W·s` recomputed in backward as
for convs (conv.py); it is right only for a rank-2 input, which blocks.py checks per call.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .conv import needs_grad, use_custom_op
from .fold import channel_dot, scale_weight

__all__ = ["linear_scaled", "LinearScaledWeight", "save_linear_context", "linear_scaled_op"]


def save_linear_context(ctx, inputs, output):
    """What backward needs, saved on `ctx`: the forward's and the custom op's setup_context."""
    x, weight, scale, bias = inputs
    ctx.save_for_backward(x, weight, scale)
    ctx.has_bias = bias is not None


class LinearScaledWeight(torch.autograd.Function):
    """linear(x, W·s, bias) that keeps x, W and s for backward, not W·s (as `conv_scaled`)."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):  # ctx first: see ConvScaledWeight
        out = F.linear(x, scale_weight(weight, scale), bias)
        save_linear_context(ctx, (x, weight, scale, bias), out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, scale = ctx.saved_tensors
        need_x, need_w, need_s, need_b = ctx.needs_input_grad
        grad_x = grad_w = grad_s = grad_b = None
        w = None
        if need_x:
            w = scale_weight(weight, scale)  # recomputed, never stored
            grad_x = grad_out @ w
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if need_w or need_s:  # the gradient of W·s is ours, and so is W·s's buffer now
            grad_ws = grad_2d.t() @ x.reshape(-1, x.shape[-1])
            grad_s = channel_dot(grad_ws, weight, scratch=w) if need_s else None
            grad_w = scale_weight(grad_ws, scale, out=grad_ws) if need_w else None
        if need_b and ctx.has_bias:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_s, grad_b


def _linear_scaled_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`F.linear(x, W·s, bias)`, differentiable to x, W, s and bias."""
    return F.linear(x, scale_weight(weight, scale), bias)


linear_scaled_op = torch.library.custom_op("convbn_fx::linear_scaled", _linear_scaled_op,
                                           mutates_args=())
linear_scaled_op.register_fake(_linear_scaled_op)
linear_scaled_op.register_autograd(LinearScaledWeight.backward,
                                   setup_context=save_linear_context)


def linear_scaled(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, W·s, bias)` with `W·s` recomputed in backward; plain ops without autograd."""
    if not needs_grad(x, weight, scale, bias) or torch.compiler.is_exporting():
        return F.linear(x, scale_weight(weight, scale), bias)
    if use_custom_op(x):
        return torch.ops.convbn_fx.linear_scaled.default(x, weight, scale, bias)
    return LinearScaledWeight.apply(x, weight, scale, bias)
