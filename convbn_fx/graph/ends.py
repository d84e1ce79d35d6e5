"""The two ends of a block, the conv and the norm, as found in any graph flavour.

An end is a stock module called whole (`call_module`, read from its attributes) or a
functional call (read with the normaliser). In a module graph (one with a root module) a
functional end comes from a subclass that was traced through (timm's BatchNormAct2d,
Conv2dSame, StdConv2d): its tensors are `get_attr`s of a module, which owns them and whose
state decides the lowering, so the real forward decides, not the class name. In a compiled
or exported graph there is no root: tensors are graph nodes and names come from
`nn_module_stack`. Both fill the same `End`, and the guards read only that.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import torch.fx
import torch.nn as nn

from ..vocabulary.blocks import ConvConfig, Source, same_padding
from ..vocabulary.kinds import bn_base, conv_base, frozen_norm, is_frozen_bn, is_linear
from .affine import Affine, match_affine
from .normalize import conv_config, match_conv, match_norm, module_input, module_path, op_name

__all__ = ["End", "conv_end", "norm_end", "affine_end", "as_source"]


@dataclass
class End:
    """One end of a block (the conv, or the norm) as found in the graph."""

    name: str                       # qualified name of the module, or the node's name
    kind: str                       # class name of the module, or the op's name
    module: nn.Module | None        # the module owning the tensors (None: no root module)
    node: torch.fx.Node             # holds the conv output / the BN output
    call: torch.fx.Node             # computes it (differs for tuple-returning aten BNs)
    input: Any = None               # what the call convolves or normalises
    tensors: dict[str, Source] = field(default_factory=dict)
    extra_args: int = 0             # a module call's arguments after the input
    reason: str | None = None       # why this end alone cannot be folded
    # conv end only
    config: ConvConfig | None = None
    linear: bool = False
    # norm end only
    eps: float = 1e-5
    training: Any = None            # the call's own `training` flag (functional ends)
    epilogue: tuple[str, ...] = ()
    affine: Affine | None = None    # an affine epilogue (`conv·S + B`), not a BN call
    view: torch.fx.Node | None = None       # `linear(x).flatten(s, e)`, the norm's input
    flatten: tuple[int, int] | None = None  # that view's (start_dim, end_dim)


def as_source(value: Any) -> Source:
    """A functional call's tensor argument as a Source: the qualified name it was read from."""
    if isinstance(value, torch.fx.Node) and value.op == "get_attr":
        return value.target
    return value


def _owner(source: Source) -> str | None:
    return source.rsplit(".", 1)[0] if isinstance(source, str) and "." in source else None


def _called_module(node: torch.fx.Node, modules: dict[str, nn.Module], kind) -> nn.Module | None:
    if node.op != "call_module":
        return None
    module = modules.get(node.target)
    return module if module is not None and kind(module) else None


def _module_conv_config(conv: nn.Module) -> ConvConfig:
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    dims = len(conv.kernel_size)
    padding, pre_pad, pad_mode = conv.padding, None, "constant"
    if padding == "valid":
        padding = (0,) * dims
    elif padding == "same":  # may pad one more on one side
        padding, pre_pad = same_padding(conv.kernel_size, conv.dilation)
    if conv.padding_mode != "zeros":
        pre_pad, pad_mode = tuple(conv._reversed_padding_repeated_twice), conv.padding_mode
        padding = (0,) * dims
    return ConvConfig(
        stride=tuple(conv.stride), padding=tuple(padding), dilation=tuple(conv.dilation),
        transposed=transposed,
        output_padding=tuple(conv.output_padding) if transposed else (0,) * dims,
        groups=conv.groups, pre_pad=pre_pad, pad_mode=pad_mode)


def _named(node: torch.fx.Node, fallback: str) -> tuple[str, str]:
    """(name, kind) of a functional call in a graph without modules: from nn_module_stack."""
    found = module_path(node)
    return found if found is not None else (fallback, op_name(node.target))


def conv_end(node: torch.fx.Node, modules: dict[str, nn.Module]) -> End | None:
    """The conv (or linear) end whose output `node` is, or None."""
    conv = _called_module(node, modules, conv_base)
    if conv is not None:
        value, extra = module_input(conv, node)
        t = node.target
        end = _module_end(conv, node, value, extra, {
            "weight": f"{t}.weight", "bias": f"{t}.bias" if conv.bias is not None else None})
        end.linear = is_linear(conv)
        if not end.linear:
            end.config = _module_conv_config(conv)
        return end
    call = match_conv(node)
    if call is None:
        return None
    if modules:
        weight = as_source(call.weight)
        # The conv's module: the owner of its weight, or (a computed weight, as weight
        # standardisation makes) the module whose forward made the call.
        name = _owner(weight) or (module_path(node) or (None,))[0]
        module = modules.get(name)
        end = End(name or node.name, type(module).__name__ if module is not None else
                  name or node.name, module, node, node, call.input,
                  {"weight": weight, "bias": as_source(call.bias)})
    else:
        name, kind = _named(node, node.name)
        end = End(name, kind, None, node, node, call.input,
                  {"weight": call.weight, "bias": call.bias})
    end.linear = call.linear
    if not call.linear:
        end.config, end.reason = conv_config(call)
    return end


def _module_end(module: nn.Module, node: torch.fx.Node, value, extra: int,
                tensors: dict[str, Source]) -> End:
    return End(node.target, type(module).__name__, module, node, node, value, tensors,
               extra_args=extra)


def _constant_reasons(end: End, training: Any, eps: Any) -> None:
    if not isinstance(training, bool):
        end.reason = "BN's `training` flag is only known at run time"
    elif not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        end.reason = "BN's eps is only known at run time"
    else:
        end.eps, end.training = float(eps), training


def norm_end(node: torch.fx.Node, modules: dict[str, nn.Module]) -> End | None:
    """The norm end whose output `node` holds, or None."""
    bn = _called_module(node, modules, bn_base)
    if bn is not None:
        value, extra = module_input(bn, node)
        t = node.target
        end = _module_end(bn, node, value, extra, {
            "running_mean": f"{t}.running_mean", "running_var": f"{t}.running_var",
            "bn_weight": f"{t}.weight" if bn.weight is not None else None,
            "bn_bias": f"{t}.bias" if bn.bias is not None else None,
            "num_batches_tracked": (f"{t}.num_batches_tracked" if getattr(
                bn, "num_batches_tracked", None) is not None else None)})
        norm = frozen_norm(bn)
        eps = norm.eps if norm is not None and norm.eps is not None else getattr(bn, "eps", None)
        if not isinstance(eps, numbers.Real):
            end.reason = (f"{type(bn).__name__} has no eps attribute; declare it with "
                          "convbn_fx.declare_frozen_norm(cls, eps=...)")
            return end
        end.eps = float(eps)
        end.epilogue = tuple(f"{t}.{e}" for e in norm.epilogue) if norm else ()
        if not is_frozen_bn(bn) and (bn.running_mean is None or bn.running_var is None):
            end.reason = ("BN has no running statistics (track_running_stats=False), so it "
                          "always normalises with batch statistics")
        return end
    call = match_norm(node)
    if call is None:
        return None
    if not modules:
        name, kind = _named(call.call, call.call.name)
        end = End(name, kind, None, node, call.call, call.input, {
            "running_mean": call.running_mean, "running_var": call.running_var,
            "bn_weight": call.weight, "bn_bias": call.bias})
        if call.running_mean is None or call.running_var is None:
            end.reason = ("BN has no running statistics, so it always normalises with batch "
                          "statistics")
        else:
            _constant_reasons(end, call.training, call.eps)
        return end
    if call.call is not node:  # module graphs hold no tuple-returning BN ops
        return None
    mean, var = as_source(call.running_mean), as_source(call.running_var)
    name = _owner(mean)
    if name is None or name != _owner(var) or name not in modules:
        return None  # statistics not read from a module: nothing whose state we could follow
    module = modules[name]
    end = End(name, type(module).__name__, module, node, node, call.input, {
        "running_mean": mean, "running_var": var,
        "bn_weight": as_source(call.weight), "bn_bias": as_source(call.bias)})
    if getattr(module, "num_batches_tracked", None) is not None:
        end.tensors["num_batches_tracked"] = f"{name}.num_batches_tracked"
    _constant_reasons(end, call.training, call.eps)
    return end


def _get_attrs(node: torch.fx.Node) -> list[str]:
    """The qualified names a parameter-only value is computed from."""
    found, pending, seen = [], [node], set()
    while pending:
        n = pending.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            found.append(n.target)
        pending.extend(n.all_input_nodes)
    return found


def affine_end(node: torch.fx.Node, modules: dict[str, nn.Module],
               root: nn.Module | None) -> End | None:
    """The norm end when `node` is an affine epilogue `conv·S + B` (graph/affine.py)."""
    affine = match_affine(node, root)
    if affine is None:
        return None
    names = _get_attrs(affine.scale) + _get_attrs(affine.shift)
    owners = [n.rsplit(".", 1)[0] if "." in n else "" for n in names]
    owner = owners[0] if owners and all(o == owners[0] for o in owners) else None
    if not owner or (modules and owner not in modules):
        return None  # not one submodule's tensors: nothing whose state we could follow
    module = modules.get(owner)
    kind = type(module).__name__ if module is not None else op_name(node.target)
    return End(owner or node.name, kind, module, node, affine.mul, affine.conv_out,
               {"scale": affine.scale, "shift": affine.shift}, affine=affine)
