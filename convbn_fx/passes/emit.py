"""Graph-building steps the lowerings share: a block's tensors, modules, checks and epilogue.

Node names are derived from the BN's name (`layer1_0_bn1_tune`), so the rewritten
`GraphModule.code` reads like hand-written torch code: one call per folded block, naming
the tensors it folds.
"""

from __future__ import annotations

from typing import Callable

import torch.fx

from ..kernels.checks import check_input
from ..vocabulary.blocks import TENSORS, Block

__all__ = ["call", "tensors", "source", "stem", "block_call", "emit_checks", "apply_epilogue"]


def stem(block: Block) -> str:
    """The prefix of every node a lowering adds for `block`: its BN's name."""
    return block.bn.replace(".", "_")


def call(graph: torch.fx.Graph, fn: Callable, args: tuple, kwargs: dict | None = None,
         name: str | None = None) -> torch.fx.Node:
    return graph.create_node("call_function", fn, args, kwargs or {}, name=name)


def source(graph: torch.fx.Graph, src) -> torch.fx.Node | None:
    """A block tensor's Source as a node: get_attr for a qualified name, else as it is."""
    return graph.get_attr(src) if isinstance(src, str) else src


def tensors(graph: torch.fx.Graph, block: Block) -> dict[str, torch.fx.Node | None]:
    """The block's six tensors as nodes (get_attr for module graphs), None where absent."""
    return {key: source(graph, block.tensors.get(key)) for key in TENSORS}


# Conv configuration keywords the kernels default to: left out of the code where they hold.
_CONV_DEFAULTS = {"dilation": [1], "transposed": False, "output_padding": [0], "groups": 1}


def _conv_kwargs(block: Block) -> dict:
    cfg = block.config
    kwargs = {"stride": list(cfg.stride), "padding": list(cfg.padding),
              "dilation": list(cfg.dilation), "transposed": cfg.transposed,
              "output_padding": list(cfg.output_padding), "groups": cfg.groups}
    for key, default in _CONV_DEFAULTS.items():
        value = kwargs[key]
        if value == default or (isinstance(value, list) and set(value) == set(default)):
            del kwargs[key]
    if cfg.pre_pad is not None:
        kwargs.update(pre_pad=list(cfg.pre_pad), pad_mode=cfg.pad_mode)
    return kwargs


def block_call(graph: torch.fx.Graph, block: Block, fn: Callable, suffix: str,
               **extra) -> torch.fx.Node:
    """One call of a whole-block kernel (kernels/blocks.py) with everything it needs.

    The kernel folds per call where folding is what the block computes and otherwise runs
    the block as its modules would, so it gets the block's tensors, its conv configuration,
    the norm's input checks, the modules the graph called whole and the epilogue.
    """
    got: dict[str, torch.fx.Node] = {}

    def module(target: str) -> torch.fx.Node:  # one get_attr per module, however often used
        if target not in got:
            got[target] = graph.get_attr(target)
        return got[target]

    conv_kwargs = _conv_kwargs(block) if block.op == "conv" else {}
    if block.norm == "affine":  # conv·S + B: the conv's tensors, then S and B themselves
        kwargs = {**conv_kwargs, **({"negate_shift": True} if block.negate_shift else {})}
        if block.conv_node.op == "call_module":
            kwargs["conv"] = module(block.conv_node.target)
        args = (block.input, source(graph, block.tensors["weight"]),
                source(graph, block.tensors.get("bias")), block.tensors["scale"],
                block.tensors["shift"])
        return call(graph, fn, args, {**kwargs, **extra}, name=f"{stem(block)}_{suffix}")
    whole = {key: module(node.target) for key, node in (("conv", block.conv_node),
                                                        ("norm", block.bn_node))
             if node.op == "call_module"}  # called whole: the unfolded block calls it again
    t = _tensors_of(graph, block, {n.target: n for n in whole.values()})
    kwargs = {"eps": block.eps, **conv_kwargs}
    if block.checks:
        kwargs["checks"] = [(module(m) if isinstance(m, str) else m, name)
                            for m, name in block.checks]
    kwargs.update(whole)
    if block.epilogue:
        kwargs["epilogue"] = [module(name) for name in block.epilogue]
    if block.flatten is not None:
        kwargs["flatten"] = list(block.flatten)
    args = (block.input, t["weight"], t["bias"], t["running_mean"], t["running_var"],
            t["bn_weight"], t["bn_bias"])
    out = call(graph, fn, args, {**kwargs, **extra}, name=f"{stem(block)}_{suffix}")
    if block.flatten is not None:  # the kernel keeps the Linear output's shape; the norm saw
        out = graph.call_method("flatten", (out, *block.flatten))  # it flattened
    return out


def _tensors_of(graph: torch.fx.Graph, block: Block,
                modules: dict[str, torch.fx.Node]) -> dict[str, torch.fx.Node | None]:
    """`tensors`, reading a tensor of a module the graph already holds from that module
    (`bn1_running_mean = bn1_1.running_mean`): a get_attr walks the whole path from the root
    through nn.Module.__getattr__ on every call, ~1 µs a level, 9 tensors and modules a block."""
    found = {}
    for key in TENSORS:
        src = block.tensors.get(key)
        owner, _, attr = src.rpartition(".") if isinstance(src, str) else ("", "", "")
        if owner in modules:
            found[key] = call(graph, getattr, (modules[owner], attr), name=src.replace(".", "_"))
        else:
            found[key] = source(graph, src)
    return found


def emit_checks(graph: torch.fx.Graph, block: Block, value: torch.fx.Node) -> None:
    """The norm's input checks on `value`, for lowerings that run the norm unfolded."""
    for module, name in block.checks:
        call(graph, check_input, (source(graph, module), name, value))


def apply_epilogue(graph: torch.fx.Graph, block: Block, out: torch.fx.Node) -> torch.fx.Node:
    """What a frozen norm applies after normalising (timm: drop, act), as module calls."""
    for name in block.epilogue:
        out = graph.call_module(name, (out,))
    return out
