"""`conv_scaled`: a convolution by `W·s` that keeps x, W and s for backward, never `W·s`.

Written naively, `conv(x, W·s, b')` makes autograd keep the folded weight of every block
alive until backward; recomputing it there instead means a Tune step saves what a Deploy
step saves (the input and one weight-sized tensor). Eager code runs an autograd.Function,
which follows autocast as the unrewritten conv does. Under torch.compile the same
computation is the opaque custom op `convbn_fx::conv_scaled`: AOTAutograd would trace
through the Function, merge the backward's recomputation with the forward's `W·s` by CSE and
save it after all; as one op with the same backward registered, the partitioner never sees
it. Defining the op imports no part of Dynamo or inductor.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .fold import channel_dot, scale_weight

__all__ = ["conv_function", "convolution", "conv_scaled", "ConvScaledWeight", "save_conv_context",
           "use_custom_op",
           "needs_grad", "conv_scaled_op"]


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


def save_conv_context(ctx, inputs, output):
    """What backward needs, saved on `ctx`: the forward's and the custom op's setup_context."""
    x, weight, scale, bias, *config = inputs
    ctx.save_for_backward(x, weight, scale)
    ctx.config = config
    ctx.bias_sizes = None if bias is None else list(bias.shape)
    ctx.compute_dtype = output.dtype  # differs from x's under autocast
    ctx.bias_dtype = None if bias is None else bias.dtype


class ConvScaledWeight(torch.autograd.Function):
    """conv(x, W·s, bias) that keeps x, W and s for backward, not W·s.

    `forward` takes `ctx` (the older form): with a separate `setup_context`, every call would
    bind the arguments with `inspect.signature` first, about 100 µs, more than a small
    block's whole conv and BN. The custom op below registers `save_conv_context` as its own.
    """

    @staticmethod
    def forward(ctx, x, weight, scale, bias, stride, padding, dilation, transposed,
                output_padding, groups):
        w = scale_weight(weight, scale, transposed, groups)
        out = convolution(x, w, bias, stride, padding, dilation, transposed, output_padding,
                          groups)
        save_conv_context(ctx, (x, weight, scale, bias, stride, padding, dilation, transposed,
                                output_padding, groups), out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation, transposed, output_padding, groups = ctx.config
        need_x, need_w, need_s, need_b = ctx.needs_input_grad[:4]
        # Only the input's gradient reads W·s: the weight's reads x and grad_out alone, so a
        # network's first conv (its input needs no grad) does not recompute it.
        w = scale_weight(weight, scale, transposed, groups) if need_x else weight
        dtype = ctx.compute_dtype  # backward of autocast's casts: compute as forward did
        # A transposed conv's bias gradient sums naively on CPU (~100x float32's eps off);
        # torch.sum is as accurate as BN's own backward. Plain convs get it from the kernel.
        bias_here = need_b and ctx.bias_sizes is not None and not transposed
        grad_x, grad_ws, grad_b = torch.ops.aten.convolution_backward(
            grad_out.to(dtype), x.to(dtype), w.to(dtype), ctx.bias_sizes, stride, padding,
            dilation, transposed, output_padding, groups, [need_x, need_w or need_s, bias_here],
        )
        grad_x = grad_x.to(x.dtype) if grad_x is not None else None
        if need_b and ctx.bias_sizes is not None and transposed:
            grad_b = grad_out.sum([0] + list(range(2, grad_out.dim())))
        grad_b = grad_b.to(ctx.bias_dtype) if grad_b is not None else None
        grad_weight = grad_scale = None
        if need_w or need_s:  # ∂W' is ours: W·s's buffer (free now) and ∂W' itself are reused
            grad_ws = grad_ws.to(weight.dtype)
            if need_s:
                grad_scale = channel_dot(grad_ws, weight, transposed, groups,
                                         scratch=w if need_x else None)
            if need_w:
                grad_weight = scale_weight(grad_ws, scale, transposed, groups, out=grad_ws)
        return (grad_x, grad_weight, grad_scale, grad_b) + (None,) * 6


def _conv_scaled_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor], stride: List[int], padding: List[int],
                    dilation: List[int], transposed: bool, output_padding: List[int],
                    groups: int) -> torch.Tensor:
    """`torch.convolution(x, W·s, bias, ...)`, differentiable to x, W, s and bias."""
    return torch.convolution(x, scale_weight(weight, scale, transposed, groups), bias, stride,
                             padding, dilation, transposed, output_padding, groups)


# The fake (meta) kernel is the same code: on fake tensors it only computes shapes.
conv_scaled_op = torch.library.custom_op("convbn_fx::conv_scaled", _conv_scaled_op,
                                         mutates_args=())
conv_scaled_op.register_fake(_conv_scaled_op)
conv_scaled_op.register_autograd(ConvScaledWeight.backward,
                                 setup_context=save_conv_context)


def use_custom_op(x: torch.Tensor) -> bool:
    """Run the custom op rather than the autograd.Function for this call.

    Only while torch.compile traces, and not under autocast: a custom op is not on autocast's
    lists, so it would compute in float32 where the model computes in the autocast dtype;
    the autograd.Function casts as the unrewritten conv does.
    """
    return torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type)


def needs_grad(*tensors) -> bool:
    """Autograd is on and some input requires grad: the scaled weight must be recomputed."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def conv_scaled(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], transposed: bool, output_padding: Sequence[int],
                groups: int) -> torch.Tensor:
    """`torch.convolution(x, W·s, bias, ...)` with `W·s` recomputed in backward.

    Differentiable to x, W, s and bias. Without autograd (inference, or nothing requires grad)
    it is the plain expression, so compilers and exporters see ordinary aten ops.
    """
    if not needs_grad(x, weight, scale, bias) or not isinstance(x, torch.Tensor) \
            or torch.compiler.is_exporting():
        w = scale_weight(weight, scale, transposed, groups)
        return convolution(x, w, bias, stride, padding, dilation, transposed, output_padding,
                           groups)
    if use_custom_op(x):
        op = torch.ops.convbn_fx.conv_scaled.default
        return op(x, weight, scale, bias, list(stride), list(padding), list(dilation),
                  transposed, list(output_padding), groups)
    return ConvScaledWeight.apply(x, weight, scale, bias, list(stride), list(padding),
                                  list(dilation), transposed, list(output_padding), groups)
