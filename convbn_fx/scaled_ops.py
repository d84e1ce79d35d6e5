"""The folded conv and linear as opaque custom ops, for graphs that AOTAutograd partitions.

`folding.conv_scaled` keeps x, W and s for backward and recomputes W·s there. Traced through
by AOTAutograd (Dynamo compiling a rewritten model, or the convbn_fx backend), that
recomputation is merged with the forward's W·s by CSE, and the partitioner then saves W·s
for backward: one weight-sized tensor per block, more than Eval keeps at small inputs.
As one opaque op with the same backward registered, the forward's W·s is invisible to the
partitioner and the backward recomputes it. Eager code keeps the autograd.Function (it follows
autocast); these ops are what compiled graphs call (`folding.conv_scaled` under Dynamo, and
`compile.backend`'s rewrite). Defining them imports no part of Dynamo or inductor.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from .folding import _ConvScaledWeight, _LinearScaledWeight, scale_weight

__all__ = ["conv_scaled_op", "linear_scaled_op"]


def _conv_scaled(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                 bias: Optional[torch.Tensor], stride: List[int], padding: List[int],
                 dilation: List[int], transposed: bool, output_padding: List[int],
                 groups: int) -> torch.Tensor:
    """`torch.convolution(x, W·s, bias, ...)`, differentiable to x, W, s and bias."""
    return torch.convolution(x, scale_weight(weight, scale, transposed, groups), bias, stride,
                             padding, dilation, transposed, output_padding, groups)


# The fake (meta) kernel is the same code: on fake tensors it only computes shapes.
conv_scaled_op = torch.library.custom_op("convbn_fx::conv_scaled", _conv_scaled,
                                         mutates_args=())
conv_scaled_op.register_fake(_conv_scaled)
conv_scaled_op.register_autograd(_ConvScaledWeight.backward,
                                 setup_context=_ConvScaledWeight.setup_context)


def _linear_scaled(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`F.linear(x, W·s, bias)`, differentiable to x, W, s and bias."""
    return F.linear(x, scale_weight(weight, scale), bias)


linear_scaled_op = torch.library.custom_op("convbn_fx::linear_scaled", _linear_scaled,
                                           mutates_args=())
linear_scaled_op.register_fake(_linear_scaled)
linear_scaled_op.register_autograd(_LinearScaledWeight.backward,
                                   setup_context=_LinearScaledWeight.setup_context)
