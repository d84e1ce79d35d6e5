"""Find conv→BN blocks in functional and aten graphs, and lower them in place.

What a torch.compile backend or inductor's pre-grad pass receives is a *functional* graph:
`torch.conv2d` → `F.batch_norm(..., training=False)`, with parameters and buffers as
placeholders (or `get_attr` nodes). `torch.export` gives an *aten* graph: `aten.conv2d` →
`aten.batch_norm`, or after `run_decompositions`, `aten.convolution` →
`aten._native_batch_norm_legit_no_training`, which returns a tuple whose item 0 is the BN
output. Both fill in the same `Block` record that module graphs do (tensors as graph nodes),
so the lowerings in `convbn_fx.passes` serve every flavour unchanged. Arguments are
normalised (keywords, defaults) before matching, so spelling never decides whether a block
is found.

The mode rule differs from module graphs because a compiled or exported graph has no module
state to consult on every call: BN with `training=True` stays as it is (TRAIN); every other
foldable block is lowered with TUNE's formula, whether or not its parameters require grad.
TUNE is right in both cases (it recomputes the fold from the current tensors on every call,
and without autograd it is plain ops the compiler can fuse), whereas DEPLOY's cache of folded
weights across calls cannot be kept inside a compiled graph, which would then miss an
optimizer step or a `load_state_dict`. So DEPLOY is refused here.
"""

from __future__ import annotations

import inspect
import logging
import numbers
import operator
import re
from collections import Counter
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F

from .blocks import Block, BlockInfo, ConvConfig, same_padding
from .errors import ModeError
from .modes import Mode, ModeArg, normalize_mode
from .rewrite import lower_in_place

__all__ = ["find_functional_blocks", "functional_mode", "tune_graph", "bn_call", "conv_call",
           "functional_conv_config", "module_path"]

log = logging.getLogger(__name__)

aten = torch.ops.aten


# Python signatures for the builtin conv functions (inspect cannot read builtins); the
# parameter names are those of the aten schemas, so both flavours normalise to one dict.
def _conv_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    pass


def _conv_transpose_signature(input, weight, bias=None, stride=1, padding=0, output_padding=0,
                              groups=1, dilation=1):
    pass


def _linear_signature(input, weight, bias=None):
    pass


# target -> (signature: a Python function or an aten overload, spatial dims, transposed);
# dims None: read from the stride (aten.convolution); transposed None: an argument.
_CONVS: dict[Any, tuple[Any, int | None, bool | None]] = {
    torch.conv1d: (_conv_signature, 1, False),
    torch.conv2d: (_conv_signature, 2, False),
    torch.conv3d: (_conv_signature, 3, False),
    torch.conv_transpose1d: (_conv_transpose_signature, 1, True),
    torch.conv_transpose2d: (_conv_transpose_signature, 2, True),
    torch.conv_transpose3d: (_conv_transpose_signature, 3, True),
    aten.conv1d.default: (aten.conv1d.default, 1, False),
    aten.conv2d.default: (aten.conv2d.default, 2, False),
    aten.conv3d.default: (aten.conv3d.default, 3, False),
    aten.conv1d.padding: (aten.conv1d.padding, 1, False),
    aten.conv2d.padding: (aten.conv2d.padding, 2, False),
    aten.conv3d.padding: (aten.conv3d.padding, 3, False),
    aten.conv_transpose1d.default: (aten.conv_transpose1d.default, 1, True),
    aten.conv_transpose2d.input: (aten.conv_transpose2d.input, 2, True),
    aten.conv_transpose3d.input: (aten.conv_transpose3d.input, 3, True),
    aten.convolution.default: (aten.convolution.default, None, None),
}
_LINEARS = {F.linear: _linear_signature, aten.linear.default: aten.linear.default}

# target -> (signature, returns a tuple whose item 0 is the output, training when no argument)
_BNS: dict[Any, tuple[Any, bool, bool | None]] = {
    F.batch_norm: (F.batch_norm, False, None),
    torch.batch_norm: (aten.batch_norm.default, False, None),
    aten.batch_norm.default: (aten.batch_norm.default, False, None),
    aten._native_batch_norm_legit_no_training.default:
        (aten._native_batch_norm_legit_no_training.default, True, False),
    aten.native_batch_norm.default: (aten.native_batch_norm.default, True, None),
    aten._native_batch_norm_legit.default: (aten._native_batch_norm_legit.default, True, None),
    aten._native_batch_norm_legit_functional.default:
        (aten._native_batch_norm_legit_functional.default, True, None),
}


def _bind(signature: Any, node: torch.fx.Node) -> dict[str, Any] | None:
    """The node's arguments by parameter name, defaults filled in; None if they do not bind."""
    if isinstance(signature, torch._ops.OpOverload):
        params = signature._schema.arguments
        if len(node.args) > len(params):
            return None
        bound = {p.name: a for p, a in zip(params, node.args)}
        for name, value in node.kwargs.items():
            if name in bound or all(p.name != name for p in params):
                return None
            bound[name] = value
        for p in params:
            if p.name not in bound:
                if not p.has_default_value():
                    return None
                bound[p.name] = p.default_value
        return bound
    try:
        bound = inspect.signature(signature).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _transposed_weight(node: Any) -> torch.fx.Node | None:
    """W when `node` is `aten.t(W)` or `aten.permute(W, [1, 0])`, as decomposed linears read it."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.t.default or (
            node.target is aten.permute.default and list(node.args[1]) == [1, 0]):
        return node.args[0] if isinstance(node.args[0], torch.fx.Node) else None
    return None


def _linear_args(node: torch.fx.Node) -> dict[str, Any] | None:
    """{input, weight, bias} of a linear, also decomposed: `addmm(b, x, W.t())`, `mm(x, W.t())`."""
    if node.target in _LINEARS:
        return _bind(_LINEARS[node.target], node)
    if node.target not in (aten.addmm.default, aten.mm.default):
        return None
    args = _bind(node.target, node)
    if args is None or args.get("beta", 1) != 1 or args.get("alpha", 1) != 1:
        return None
    weight = _transposed_weight(args["mat2"])
    if weight is None:
        return None
    if node.target is aten.mm.default:
        return {"input": args["self"], "weight": weight, "bias": None}
    return {"input": args["mat1"], "weight": weight, "bias": args["self"]}


def conv_call(node: torch.fx.Node) -> tuple[dict[str, Any], bool] | None:
    """(normalised arguments, is_linear) when `node` is a functional conv or linear call."""
    if node.op != "call_function":
        return None
    args = _linear_args(node)
    if args is not None:
        return args, True
    if node.target in _CONVS:
        args = _bind(_CONVS[node.target][0], node)
        return (args, False) if args is not None else None
    return None


def bn_call(node: torch.fx.Node) -> tuple[torch.fx.Node, dict[str, Any]] | None:
    """(the node computing the BN, its normalised arguments) when `node` is a BN output."""
    if node.op != "call_function":
        return None
    call = node
    if node.target is operator.getitem:
        call, index = node.args
        if index != 0 or not isinstance(call, torch.fx.Node) or call.op != "call_function":
            return None
    spec = _BNS.get(call.target)
    if spec is None or spec[1] != (call is not node):
        return None
    args = _bind(spec[0], call)
    if args is None:
        return None
    if spec[2] is not None:
        args["training"] = spec[2]
    return call, args


def _ints(value: Any, dims: int) -> tuple[int, ...] | None:
    """An int or a list of ints as a `dims`-tuple; None when any is not a constant int."""
    values = [value] * dims if isinstance(value, numbers.Integral) else value
    if not isinstance(values, (list, tuple)) or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        return None
    values = tuple(int(v) for v in values)
    return values * dims if len(values) == 1 and dims > 1 else values


def _shape(node: Any) -> tuple | None:
    """The static shape a graph value had when traced, if the graph recorded it."""
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    if value is None and node.op == "get_attr" and node.graph.owning_module is not None:
        value = node.graph.owning_module
        for part in node.target.split("."):
            value = getattr(value, part, None)
    shape = getattr(value, "shape", None)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(shape)


def _same_padding(weight: torch.fx.Node, dilation: tuple[int, ...]):
    """Padding for `padding='same'` from the kernel size: (symmetric, or F.pad amounts)."""
    shape = _shape(weight)
    if shape is None:
        return None
    return same_padding(shape[2:], dilation)


def functional_conv_config(target: Any, args: dict[str, Any]) -> tuple[ConvConfig | None, str | None]:
    """The conv's ConvConfig, or a reason it cannot be read statically."""
    _, dims, transposed = _CONVS[target]
    if transposed is None:
        transposed = args["transposed"]
        if not isinstance(transposed, bool):
            return None, "the conv's `transposed` flag is only known at run time"
    if dims is None:
        dims = len(args["stride"]) if isinstance(args["stride"], (list, tuple)) else None
        if dims is None:
            return None, "the conv's stride is only known at run time"
    stride, dilation = _ints(args["stride"], dims), _ints(args["dilation"], dims)
    output_padding = _ints(args.get("output_padding", 0), dims)
    groups = args["groups"]
    padding, pre_pad = args["padding"], None
    if padding == "valid":
        padding = (0,) * dims
    elif padding == "same":
        same = _same_padding(args["weight"], dilation or (1,) * dims)
        if same is None:
            return None, "padding='same' needs the conv weight's shape, which the graph lacks"
        padding, pre_pad = same
    else:
        padding = _ints(padding, dims)
    if None in (stride, dilation, output_padding, padding) or not isinstance(groups, int) \
            or isinstance(groups, bool):
        return None, "the conv's stride, padding, dilation or groups are only known at run time"
    return ConvConfig(stride=stride, padding=padding, dilation=dilation, transposed=transposed,
                      output_padding=output_padding, groups=groups, pre_pad=pre_pad), None


def module_path(node: torch.fx.Node) -> tuple[str, str] | None:
    """(qualified name, class name) of the module that made `node`, from nn_module_stack."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    # Dynamo writes "L['self'].layer1[0]._modules['bn1']" or "L['fn'].__self__.0" (for
    # `module.compile()`); export writes "layer1.0.bn1".
    path = re.sub(r"^L\['[^']*'\](\.__self__)?", "", path)
    path = re.sub(r"\._modules\['([^']*)'\]|\[(\d+)\]|\['([^']*)'\]",
                  lambda m: "." + next(g for g in m.groups() if g is not None), path)
    name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
    return path.lstrip(".") or node.name, name


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _skip_reason(conv_node: torch.fx.Node, bn_value: torch.fx.Node, call: torch.fx.Node,
                 bn_args: dict[str, Any]) -> str | None:
    """One guard per precondition of folding; the first that fails names the reason."""
    if len(conv_node.users) > 1:
        others = ", ".join(u.name for u in conv_node.users if u is not call)
        return f"the conv output is also used by {others}"
    if call is not bn_value and len(call.users) > 1:
        return "BN's saved statistics (outputs 1 and 2) are used too"
    if bn_args["running_mean"] is None or bn_args["running_var"] is None:
        return "BN has no running statistics, so it always normalises with batch statistics"
    if not isinstance(bn_args["training"], bool):
        return "BN's `training` flag is only known at run time"
    if not isinstance(bn_args["eps"], numbers.Real) or isinstance(bn_args["eps"], bool):
        return "BN's eps is only known at run time"
    return None


def _channel_reason(weight: Any, transposed: bool, groups: int, mean: Any) -> str | None:
    w, m = _shape(weight), _shape(mean)
    if w is None or m is None:
        return None  # unknown shapes: BN itself would reject a mismatch at run time
    out = w[1] * groups if transposed else w[0]
    if (m[0] if m else 1) != out:
        return f"conv has {out} output channels but BN has {m[0] if m else 1}"
    return None


def find_functional_blocks(graph: torch.fx.Graph) -> list[Block]:
    """Every conv→BN block in a functional (Dynamo) or aten (export) graph, in graph order.

    Args:
        graph: a graph whose convs and BNs are `call_function` nodes (torch functions or aten
            ops); their parameters may be placeholders, `get_attr` nodes or any other value.
    Returns:
        One `Block` per BN fed directly by a conv or linear; its tensors are graph nodes and
        `bn_node` is the node holding the BN output (`getitem(bn, 0)` for tuple-returning
        aten ops). Blocks that must not be folded carry a one-line `reason`.
    """
    blocks = []
    for node in list(graph.nodes):
        found = bn_call(node)
        if found is None:
            continue
        call, bn_args = found
        conv_node = bn_args["input"]
        if not isinstance(conv_node, torch.fx.Node) or conv_node.op != "call_function":
            continue
        found_conv = conv_call(conv_node)
        if found_conv is None:
            continue
        conv_args, linear = found_conv
        conv_mod, bn_mod = module_path(conv_node), module_path(call)
        kind = (f"{conv_mod[1]}+{bn_mod[1]}" if conv_mod and bn_mod else
                f"{_op_name(conv_node.target)}+{_op_name(call.target)}")
        block = Block(conv=conv_mod[0] if conv_mod else conv_node.name,
                      bn=bn_mod[0] if bn_mod else call.name, kind=kind,
                      conv_node=conv_node, bn_node=node)
        block.reason = _skip_reason(conv_node, node, call, bn_args)
        if block.reason is None and linear:
            block.op = "linear"
            block.reason = _channel_reason(conv_args["weight"], False, 1, bn_args["running_mean"])
        elif block.reason is None:
            block.config, block.reason = functional_conv_config(conv_node.target, conv_args)
            if block.reason is None:
                block.reason = _channel_reason(conv_args["weight"], block.config.transposed,
                                               block.config.groups, bn_args["running_mean"])
        if block.reason is None:
            block.input = conv_args["input"]
            block.eps = float(bn_args["eps"])
            block.tensors = {
                "weight": conv_args["weight"], "bias": conv_args["bias"],
                "running_mean": bn_args["running_mean"], "running_var": bn_args["running_var"],
                "bn_weight": bn_args["weight"], "bn_bias": bn_args["bias"],
            }
        blocks.append(block)
    return blocks


def _uses_batch_stats(block: Block) -> bool:
    return bool(bn_call(block.bn_node)[1]["training"])


def functional_mode(block: Block, mode: ModeArg = "auto") -> Mode | None:
    """The lowering for one block of a functional or aten graph (see the module docstring).

    Args:
        block: a block from `find_functional_blocks`.
        mode: "auto" (TRAIN for BN with training=True, else TUNE), a Mode to force, or a
            policy `(BlockInfo) -> Mode | None`. DEPLOY is refused: see the module docstring.
    Returns:
        The Mode to lower the block with, or None to leave it as it is.
    """
    if not block.foldable:
        return None
    batch_stats = _uses_batch_stats(block)
    auto = Mode.TRAIN if batch_stats else Mode.TUNE
    mode = normalize_mode(mode)
    if mode == "auto":
        return auto
    wanted = mode if isinstance(mode, Mode) else mode(
        BlockInfo(block.conv, block.bn, block.kind, auto, None))
    if wanted is None:
        return None
    try:
        wanted = Mode(wanted)
    except ValueError:
        raise ModeError(f"the mode policy returned {wanted!r} for block {block.bn}; it must "
                        "return a convbn_fx.Mode or None.") from None
    if wanted is Mode.DEPLOY:
        raise ModeError("DEPLOY caches folded weights across calls, which a compiled or exported "
                        "graph cannot keep up to date; use mode='tune' (folded on every call).")
    if batch_stats and wanted is not Mode.TRAIN:
        log.warning("%s needs running statistics but BN %s has training=True; leaving it as is",
                    wanted, block.bn)
        return Mode.TRAIN
    return wanted


def tune_graph(graph: torch.fx.Graph, mode: ModeArg = "auto") -> list[BlockInfo]:
    """Rewrite every conv→BN block of a functional or aten graph, in place.

    The caller recompiles the owning GraphModule (`gm.recompile()`) afterwards.

    Args:
        graph: a Dynamo graph, an inductor pre-grad graph, or an aten graph.
        mode: see `functional_mode`.
    Returns:
        One `BlockInfo` per block found, with the lowering applied (None: left as is).
    """
    blocks = find_functional_blocks(graph)
    lowerings = [functional_mode(b, mode) for b in blocks]
    if any(m not in (None, Mode.TRAIN) for m in lowerings):
        lower_in_place(graph, blocks, lowerings)
    infos = [BlockInfo(b.conv, b.bn, b.kind, m, b.reason) for b, m in zip(blocks, lowerings)]
    log.info("convbn_fx rewrote a functional graph: %s", dict(
        Counter(str(i.lowering) if i.lowering else "skipped" for i in infos)) or "no blocks")
    return infos
