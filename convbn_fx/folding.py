"""The arithmetic of folding BN into a convolution, as functions the rewritten graph calls.

Tune mode (You et al., arXiv 2305.11624, eq. 4) runs `conv(x, W·s, b')` with
`s = γ·rsqrt(var+ε)` and `b' = β + s·(b − μ)`. Written naively, autograd keeps the folded weight
`W·s` of every block alive until backward; `conv_scaled` recomputes it in backward instead, so
a Tune step saves what a Deploy step saves (the input and one weight-sized tensor). Deploy
folds under no_grad and caches the result until one of its inputs changes.

Linear→BatchNorm1d folds the same way (`linear_scaled`), but only when BN normalises the
Linear's output features, i.e. for a rank-2 input. On a rank-3 input `(N, L, in)` BatchNorm1d
normalises dim 1 (L), not the features, so folding would be wrong; a symbolic graph has no
shapes, so `linear_bn_tune` / `linear_bn_deploy` decide per call and otherwise run the block
unfolded, exactly as the modules would.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["scale_weight", "channel_sum", "conv_scaled", "frozen_fold", "linear_scaled",
           "linear_bn_tune", "linear_bn_deploy"]


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


def conv_function(dims: int, transposed: bool):
    """The torch.nn.functional conv for a rank and direction (autocast knows these by name)."""
    name = f"conv_transpose{dims}d" if transposed else f"conv{dims}d"
    return getattr(F, name)


def convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """`torch.convolution`'s arguments, run through F.convNd / F.conv_transposeNd.

    torch.convolution itself is not on autocast's list, so under autocast it would run in
    float32 and return a dtype the unrewritten model does not.
    """
    fn = conv_function(weight.dim() - 2, transposed)
    if transposed:
        return fn(x, weight, bias, stride, padding, output_padding, groups, dilation)
    return fn(x, weight, bias, stride, padding, dilation, groups)


class _ConvScaledWeight(torch.autograd.Function):
    """conv(x, W·s, bias) that keeps x, W and s for backward, not W·s."""

    @staticmethod
    def forward(x, weight, scale, bias, stride, padding, dilation, transposed, output_padding,
                groups):
        w = scale_weight(weight, scale, transposed, groups)
        return convolution(x, w, bias, stride, padding, dilation, transposed, output_padding,
                           groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, scale, bias, *config = inputs
        ctx.save_for_backward(x, weight, scale)
        ctx.config = config
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.compute_dtype = output.dtype  # differs from x's under autocast
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation, transposed, output_padding, groups = ctx.config
        need_x, need_w, need_s, need_b = ctx.needs_input_grad[:4]
        w = scale_weight(weight, scale, transposed, groups)  # recomputed, never stored
        dtype = ctx.compute_dtype  # backward of autocast's casts: compute as forward did
        # A transposed conv's bias gradient sums naively on CPU (~100x float32's eps off);
        # torch.sum is as accurate as BN's own backward. Plain convs get it from the kernel.
        bias_here = need_b and ctx.bias_sizes is not None and not transposed
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out.to(dtype), x.to(dtype), w.to(dtype), ctx.bias_sizes, stride, padding,
            dilation, transposed, output_padding, groups, [need_x, need_w or need_s, bias_here],
        )
        grad_x = grad_x.to(x.dtype) if grad_x is not None else None
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        if need_b and ctx.bias_sizes is not None and transposed:
            grad_b = grad_out.sum([0] + list(range(2, grad_out.dim())))
        grad_b = grad_b.to(ctx.bias_dtype) if grad_b is not None else None
        grad_weight = scale_weight(grad_w, scale, transposed, groups) if need_w else None
        grad_scale = channel_sum(grad_w * weight, transposed, groups) if need_s else None
        return (grad_x, grad_weight, grad_scale, grad_b) + (None,) * 6


def _opaque(x: torch.Tensor) -> bool:
    """Use the custom op (`scaled_ops`) rather than the autograd.Function for this call.

    Under torch.compile AOTAutograd traces through an autograd.Function and saves the W·s
    that its backward recomputes; the opaque op hides it. Not under autocast: a custom op is
    not on autocast's lists, so it would compute in float32 where the model computes in the
    autocast dtype; the autograd.Function casts as the unrewritten conv does.
    """
    return torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type)


def conv_scaled(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], transposed: bool, output_padding: Sequence[int],
                groups: int) -> torch.Tensor:
    """`torch.convolution(x, W·s, bias, ...)` with `W·s` recomputed in backward.

    Differentiable to x, W, s and bias. Without autograd (inference, or nothing requires grad)
    it is the plain expression, so compilers and exporters see ordinary aten ops. Under
    torch.compile it is the opaque `convbn_fx::conv_scaled` op (see `scaled_ops`).
    """
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (x, weight, scale, bias))
    if not needs_grad or not isinstance(x, torch.Tensor) or torch.compiler.is_exporting():
        w = scale_weight(weight, scale, transposed, groups)
        return convolution(x, w, bias, stride, padding, dilation, transposed, output_padding,
                           groups)
    if _opaque(x):
        op = torch.ops.convbn_fx.conv_scaled.default
        return op(x, weight, scale, bias, list(stride), list(padding), list(dilation),
                  transposed, list(output_padding), groups)
    return _ConvScaledWeight.apply(x, weight, scale, bias, list(stride), list(padding),
                                   list(dilation), transposed, list(output_padding), groups)


def scale_and_shift(bias, mean, var, gamma, beta, eps):
    """`s = γ·rsqrt(var+ε)` and `b' = β + s·(b − μ)`, with absent b, γ, β left out."""
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = gamma * scale
    shift = scale * (-mean if bias is None else bias - mean)
    return scale, shift if beta is None else beta + shift


def _fold(weight, bias, mean, var, gamma, beta, eps, transposed, groups):
    scale, shift = scale_and_shift(bias, mean, var, gamma, beta, eps)
    return scale_weight(weight, scale, transposed, groups), shift


# Folded Deploy weights, per conv weight, keyed by which BN tensors they were folded with.
# Weak keys: the cache lives exactly as long as the conv weight does.
# Keyed by identity: weakref.WeakKeyDictionary compares tensor keys with ==, which is
# elementwise and raises on every cache hit.
_FROZEN: "WeakIdKeyDictionary[torch.Tensor, dict]" = WeakIdKeyDictionary()


def _stamp(tensors) -> tuple:
    # Identity, storage and in-place version: any optimizer step, copy_, load_state_dict,
    # .to() or reassignment changes one of them.
    return tuple((None if t is None else (id(t), t.data_ptr(), t._version, t.dtype))
                 for t in tensors)


def frozen_fold(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor,
                var: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                eps: float, transposed: bool = False, groups: int = 1,
                watch: torch.Tensor | None = None,
                cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Deploy's constant (W·s, b'): folded once, refolded whenever an input tensor changes.

    The result carries no gradient to the block's parameters (Deploy is chosen only when none
    requires one); gradients still flow to the conv's input through the conv that uses it.
    `watch` is BN's `num_batches_tracked`: a training-mode BN forward updates the running
    statistics inside the kernel without bumping their version, but it does bump that counter.
    `cache=False` when an input is computed on every call (a standardised weight): a fresh
    tensor may reuse a dead one's id, storage and version, so its stamp proves nothing.
    """
    tensors = (weight, bias, mean, var, gamma, beta)
    if (not cache or torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.is_inference_mode_enabled()):
        # Compilers constant-fold this themselves; inference tensors must not be cached, as
        # they cannot be used later outside inference mode.
        with torch.no_grad():
            return _fold(*tensors, eps, transposed, groups)
    per_weight = _FROZEN.setdefault(weight, {})
    key = (id(mean), id(var), eps, transposed, groups)
    stamp = _stamp(tensors + (watch,))
    hit = per_weight.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1], hit[2]
    with torch.no_grad():
        folded_w, folded_b = _fold(*tensors, eps, transposed, groups)
    per_weight[key] = (stamp, folded_w, folded_b)
    return folded_w, folded_b


class _LinearScaledWeight(torch.autograd.Function):
    """linear(x, W·s, bias) that keeps x, W and s for backward, not W·s (as `conv_scaled`)."""

    @staticmethod
    def forward(x, weight, scale, bias):
        return F.linear(x, scale_weight(weight, scale), bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, scale, bias = inputs
        ctx.save_for_backward(x, weight, scale)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, scale = ctx.saved_tensors
        need_x, need_w, need_s, need_b = ctx.needs_input_grad
        grad_x = grad_w = grad_s = grad_b = None
        if need_x:
            grad_x = grad_out @ scale_weight(weight, scale)  # recomputed, never stored
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if need_w or need_s:
            grad_ws = grad_2d.t() @ x.reshape(-1, x.shape[-1])  # gradient of W·s
            grad_w = scale_weight(grad_ws, scale) if need_w else None
            grad_s = (grad_ws * weight).sum(1) if need_s else None
        if need_b and ctx.has_bias:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_s, grad_b


def linear_scaled(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, W·s, bias)` with `W·s` recomputed in backward; plain ops without autograd."""
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (x, weight, scale, bias))
    if not needs_grad or torch.compiler.is_exporting():
        return F.linear(x, scale_weight(weight, scale), bias)
    if _opaque(x):
        return torch.ops.convbn_fx.linear_scaled.default(x, weight, scale, bias)
    return _LinearScaledWeight.apply(x, weight, scale, bias)


def _linear_bn_unfolded(x, weight, bias, mean, var, gamma, beta, eps, bn_ranks):
    # What Linear then BatchNorm1d (eval, running statistics) compute, check included.
    y = F.linear(x, weight, bias)
    if bn_ranks is not None and y.dim() not in bn_ranks:
        raise ValueError(f"expected 2D or 3D input (got {y.dim()}D input)")
    return F.batch_norm(y, mean, var, gamma, beta, False, 0.0, eps)


def linear_bn_tune(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   mean: torch.Tensor, var: torch.Tensor, gamma: torch.Tensor | None,
                   beta: torch.Tensor | None, eps: float,
                   bn_ranks: Sequence[int] | None = (2, 3)) -> torch.Tensor:
    """Tune for Linear→BN: `linear(x, W·s, b')` on rank-2 input, else the unfolded block.

    `bn_ranks`: the output ranks the BN module accepts (BatchNorm1d: 2 and 3; None: any).
    """
    if x.dim() != 2:
        return _linear_bn_unfolded(x, weight, bias, mean, var, gamma, beta, eps, bn_ranks)
    return linear_scaled(x, weight, *scale_and_shift(bias, mean, var, gamma, beta, eps))


def linear_bn_deploy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     mean: torch.Tensor, var: torch.Tensor, gamma: torch.Tensor | None,
                     beta: torch.Tensor | None, eps: float,
                     bn_ranks: Sequence[int] | None = (2, 3),
                     watch: torch.Tensor | None = None, cache: bool = True) -> torch.Tensor:
    """Deploy for Linear→BN: the cached `frozen_fold` on rank-2 input, else the unfolded block."""
    if x.dim() != 2:
        return _linear_bn_unfolded(x, weight, bias, mean, var, gamma, beta, eps, bn_ranks)
    folded_w, folded_b = frozen_fold(weight, bias, mean, var, gamma, beta, eps, watch=watch,
                                     cache=cache)
    return F.linear(x, folded_w, folded_b)
