"""A whole folded block per call: the fold where it is what the block computes, else the block.

A fold replaces `norm(conv(x))` by one conv only where BN normalises the conv's output
channels, which holds for a batched input (rank = spatial dims + 2; for a Linear, rank 2).
On any other input the original does something else: BatchNorm2d rejects an unbatched
conv output, BatchNorm1d normalises a Conv1d's (C, L) output along L, a frozen norm
broadcasts it to (1, C, H, W), a BatchNorm1d after a Linear on (N, L, F) normalises L. A
symbolic graph has no shapes, so these functions decide per call: the folded block on a
batched input, and otherwise the block exactly as the modules compute it (the same calls,
the same input checks, the same exceptions). The norm's input checks run in both paths, so
what the original rejects the rewrite rejects.

`conv` and `norm` are the block's modules when the graph called them whole (their call is
the reference), else None (a traced-through subclass: its functional calls are).

`choose` is set where `auto` picked Tune: the block's name, under which the Tune kernels
record the path each call takes. Then a batched call folds only where Tune pays for the
sizes at hand (choice.py) and otherwise runs the block unfolded, exactly as Eval does;
without it (`mode="tune"`) every batched call folds.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .choice import conv_output_numel, record, tune_pays
from .conv import conv_scaled, convolution
from .fold import scale_and_shift, scale_weight
from .frozen import frozen_fold
from .linear import linear_scaled

__all__ = ["conv_bn_tune", "conv_bn_deploy", "linear_bn_tune", "linear_bn_deploy",
           "conv_affine_tune", "conv_affine_deploy"]

Checks = Sequence[tuple[nn.Module, str]]


def _run_checks(checks: Checks, value: torch.Tensor) -> None:
    for module, name in checks:
        getattr(module, name)(value)


def _padded(x, pre_pad, pad_mode):
    return x if pre_pad is None else F.pad(x, list(pre_pad), mode=pad_mode)


def _then(out, checks: Checks, epilogue: Sequence[nn.Module]):
    _run_checks(checks, out)
    for module in epilogue:  # what a frozen norm applies after normalising (timm: drop, act)
        out = module(out)
    return out


def _unfolded(z, mean, var, gamma, beta, eps, checks: Checks, norm: nn.Module | None,
              epilogue: Sequence[nn.Module]):
    """The block's norm as the original runs it: the module call (its checks and epilogue
    included), or its checks, functional call and epilogue."""
    if norm is not None:
        return norm(z)
    _run_checks(checks, z)
    return _then(F.batch_norm(z, mean, var, gamma, beta, False, 0.0, eps), (), epilogue)


def _conv(x, weight, bias, cfg: dict, conv: nn.Module | None):
    if conv is not None:
        return conv(x)
    return convolution(_padded(x, cfg["pre_pad"], cfg["pad_mode"]), weight, bias,
                       cfg["stride"], cfg["padding"], cfg["dilation"], cfg["transposed"],
                       cfg["output_padding"], cfg["groups"])


def _batched(x: torch.Tensor, spatial: int) -> bool:
    return x.dim() == spatial + 2


def _folds(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, transposed,
           output_padding, groups, pre_pad, choose: str | None) -> bool:
    """Fold this call: a batched input, and Tune pays for its sizes where `auto` chose."""
    if not _batched(x, len(stride)) or choose is None:
        return _unchosen(_batched(x, len(stride)), weight, choose)
    out = conv_output_numel(x, weight, stride, padding, dilation, transposed, output_padding,
                            groups, pre_pad)
    return _chosen(choose, out, weight)


def _linear_folds(x: torch.Tensor, weight: torch.Tensor, choose: str | None,
                  flatten: Sequence[int] | None = None) -> bool:
    """`_folds` for a Linear: where the norm sees (N, out_features), see linear_bn_tune."""
    batched = _features_normalised(x, flatten)
    if not batched or choose is None:
        return _unchosen(batched, weight, choose)
    return _chosen(choose, math.prod(x.shape[:-1]) * weight.shape[0], weight)


def _unchosen(batched: bool, weight: torch.Tensor, choose: str | None) -> bool:
    if not batched and choose is not None:
        record(choose, False, -1, weight.numel(), torch.is_grad_enabled())
    return batched


def _chosen(choose: str, out_numel: int, weight: torch.Tensor) -> bool:
    grad = torch.is_grad_enabled()
    tuned = tune_pays(out_numel, weight.numel(), grad)
    record(choose, tuned, out_numel, weight.numel(), grad)
    return tuned


def _config(stride, padding, dilation, transposed, output_padding, groups, pre_pad,
            pad_mode) -> dict:
    """The conv's configuration, per-dimension defaults (`(1,)`) widened to its rank."""
    dims = len(stride)

    def wide(v):
        return list(v) * dims if len(v) == 1 and dims > 1 else list(v)

    return dict(stride=list(stride), padding=list(padding), dilation=wide(dilation),
                transposed=transposed, output_padding=wide(output_padding), groups=groups,
                pre_pad=pre_pad, pad_mode=pad_mode)


def conv_bn_tune(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 mean: torch.Tensor, var: torch.Tensor, gamma: torch.Tensor | None,
                 beta: torch.Tensor | None, eps: float, stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int] = (1,),
                 transposed: bool = False, output_padding: Sequence[int] = (0,),
                 groups: int = 1, pre_pad=None,
                 pad_mode: str = "constant", checks: Checks = (), conv=None, norm=None,
                 epilogue: Sequence[nn.Module] = (), choose: str | None = None) -> torch.Tensor:
    """Tune (You et al., arXiv 2305.11624, eq. 4): `conv(x, W·s, b')`, folded on every call.

    `s = γ·rsqrt(var+ε)`, `b' = β + s·(b − μ)`; gradients reach W, b, γ, β as in Eval, and
    `conv_scaled` keeps x, W and s for backward, not the conv output (see kernels/conv.py).
    """
    if not _folds(x, weight, stride, padding, dilation, transposed, output_padding, groups,
                  pre_pad, choose):
        cfg = None if conv is not None else _config(stride, padding, dilation, transposed,
                                                    output_padding, groups, pre_pad, pad_mode)
        z = _conv(x, weight, bias, cfg, conv)
        return _unfolded(z, mean, var, gamma, beta, eps, checks, norm, epilogue)
    cfg = _config(stride, padding, dilation, transposed, output_padding, groups, pre_pad,
                  pad_mode)
    scale, shift = scale_and_shift(bias, mean, var, gamma, beta, eps)
    out = conv_scaled(_padded(x, pre_pad, pad_mode), weight, scale, shift, cfg["stride"],
                      cfg["padding"], cfg["dilation"], transposed, cfg["output_padding"], groups)
    return _then(out, checks, epilogue)


def conv_bn_deploy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   mean: torch.Tensor, var: torch.Tensor, gamma: torch.Tensor | None,
                   beta: torch.Tensor | None, eps: float, stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int] = (1,),
                   transposed: bool = False, output_padding: Sequence[int] = (0,),
                   groups: int = 1, pre_pad=None,
                   pad_mode: str = "constant", checks: Checks = (), conv=None, norm=None,
                   epilogue: Sequence[nn.Module] = (), watch: torch.Tensor | None = None,
                   cache: bool = True) -> torch.Tensor:
    """Deploy: one conv with the constant fold `frozen_fold` caches (kernels/frozen.py)."""
    cfg = _config(stride, padding, dilation, transposed, output_padding, groups, pre_pad,
                  pad_mode)
    if not _batched(x, len(stride)):
        z = _conv(x, weight, bias, cfg, conv)
        return _unfolded(z, mean, var, gamma, beta, eps, checks, norm, epilogue)
    folded_w, folded_b = frozen_fold(weight, bias, mean, var, gamma, beta, eps, transposed,
                                     groups, watch=watch, cache=cache)
    out = convolution(_padded(x, pre_pad, pad_mode), folded_w, folded_b, cfg["stride"],
                      cfg["padding"], cfg["dilation"], transposed, cfg["output_padding"], groups)
    return _then(out, checks, epilogue)


def _features_normalised(x: torch.Tensor, flatten: Sequence[int] | None) -> bool:
    """BatchNorm1d normalises the Linear's output features: it sees them as (N, F), either
    directly (a rank-2 input) or after a flatten of all the leading dims."""
    if flatten is None:
        return x.dim() == 2
    if x.dim() < 2:
        return False
    start, end = (d % x.dim() for d in flatten)
    return start == 0 and end == x.dim() - 2


def _linear_unfolded(x, weight, bias, mean, var, gamma, beta, eps, checks, conv, norm,
                     epilogue, flatten):
    """The Linear and its norm as the original runs them, in the Linear output's shape."""
    z = conv(x) if conv is not None else F.linear(x, weight, bias)
    if flatten is None:
        return _unfolded(z, mean, var, gamma, beta, eps, checks, norm, epilogue)
    y = _unfolded(z.flatten(*flatten), mean, var, gamma, beta, eps, checks, norm, epilogue)
    return y.reshape(z.shape)  # the graph flattens it again, as the original did


def _linear_then(out, checks: Checks, epilogue, flatten):
    _run_checks(checks, out if flatten is None else out.flatten(*flatten))
    return _then(out, (), epilogue)


def linear_bn_tune(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   mean: torch.Tensor, var: torch.Tensor, gamma: torch.Tensor | None,
                   beta: torch.Tensor | None, eps: float, checks: Checks = (), conv=None,
                   norm=None, epilogue: Sequence[nn.Module] = (),
                   flatten: Sequence[int] | None = None,
                   choose: str | None = None) -> torch.Tensor:
    """Tune for Linear→BatchNorm1d: `linear(x, W·s, b')` where the norm sees (N, F).

    With `flatten`, the norm read `linear(x).flatten(*flatten)`: the result keeps the Linear
    output's shape and the graph flattens it after this call.
    """
    if not _linear_folds(x, weight, choose, flatten):
        return _linear_unfolded(x, weight, bias, mean, var, gamma, beta, eps, checks, conv,
                                norm, epilogue, flatten)
    out = linear_scaled(x, weight, *scale_and_shift(bias, mean, var, gamma, beta, eps))
    return _linear_then(out, checks, epilogue, flatten)


def linear_bn_deploy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     mean: torch.Tensor, var: torch.Tensor, gamma: torch.Tensor | None,
                     beta: torch.Tensor | None, eps: float, checks: Checks = (), conv=None,
                     norm=None, epilogue: Sequence[nn.Module] = (),
                     watch: torch.Tensor | None = None, cache: bool = True,
                     flatten: Sequence[int] | None = None) -> torch.Tensor:
    """Deploy for Linear→BatchNorm1d: the cached `frozen_fold` where the norm sees (N, F)."""
    if not _features_normalised(x, flatten):
        return _linear_unfolded(x, weight, bias, mean, var, gamma, beta, eps, checks, conv,
                                norm, epilogue, flatten)
    folded_w, folded_b = frozen_fold(weight, bias, mean, var, gamma, beta, eps, watch=watch,
                                     cache=cache)
    return _linear_then(F.linear(x, folded_w, folded_b), checks, epilogue, flatten)


def conv_affine_tune(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     scale: torch.Tensor, shift: torch.Tensor, stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int] = (1,),
                     transposed: bool = False, output_padding: Sequence[int] = (0,),
                     groups: int = 1, pre_pad=None, pad_mode: str = "constant",
                     negate_shift: bool = False, conv=None,
                     choose: str | None = None) -> torch.Tensor:
    """Tune for a conv and an affine epilogue `conv(x)·S + B` (a frozen norm written as
    arithmetic): `conv(x, W·s, s·b + B)`, S and B one value per output channel."""
    cfg = _config(stride, padding, dilation, transposed, output_padding, groups, pre_pad,
                  pad_mode)
    if not _folds(x, weight, stride, padding, dilation, transposed, output_padding, groups,
                  pre_pad, choose):
        return _affine_unfolded(_conv(x, weight, bias, cfg, conv), scale, shift, negate_shift)
    s, b = _affine_fold(bias, scale, shift, negate_shift)
    return conv_scaled(_padded(x, pre_pad, pad_mode), weight, s, b, cfg["stride"],
                       cfg["padding"], cfg["dilation"], transposed, cfg["output_padding"], groups)


def conv_affine_deploy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       scale: torch.Tensor, shift: torch.Tensor, stride: Sequence[int],
                       padding: Sequence[int], dilation: Sequence[int] = (1,),
                       transposed: bool = False, output_padding: Sequence[int] = (0,),
                       groups: int = 1, pre_pad=None, pad_mode: str = "constant",
                       negate_shift: bool = False, conv=None) -> torch.Tensor:
    """Deploy for an affine epilogue: S and B are computed on every call, so the constant
    fold is too (without autograd)."""
    cfg = _config(stride, padding, dilation, transposed, output_padding, groups, pre_pad,
                  pad_mode)
    if not _batched(x, len(stride)):
        return _affine_unfolded(_conv(x, weight, bias, cfg, conv), scale, shift, negate_shift)
    with torch.no_grad():
        s, b = _affine_fold(bias, scale, shift, negate_shift)
        folded_w = scale_weight(weight, s, transposed, groups)
    return convolution(_padded(x, pre_pad, pad_mode), folded_w, b, cfg["stride"],
                       cfg["padding"], cfg["dilation"], transposed, cfg["output_padding"], groups)


def _affine_fold(bias, scale, shift, negate_shift):
    s = scale.reshape(-1)
    b = -shift.reshape(-1) if negate_shift else shift.reshape(-1)
    return s, b if bias is None else b + s * bias


def _affine_unfolded(z, scale, shift, negate_shift):
    """The epilogue as written, on an input the fold does not cover (it broadcasts)."""
    return z * scale - shift if negate_shift else z * scale + shift
