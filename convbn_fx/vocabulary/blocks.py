"""One record per conv→BN block, whatever kind of graph it was found in.

Matching fills in a `Block`; the lowerings read only the record, never the graph flavour it
came from. A tensor of the block is a `Source`: the qualified name of a parameter or buffer
(module graphs, read with `get_attr`), a graph `Node` (functional and aten graphs, where
parameters arrive as placeholders), or None when absent (no conv bias, `affine=False`).
`BlockInfo` is the public, graph-free summary that `describe()` returns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Union

import torch.fx

from .modes import Mode

__all__ = ["Block", "BlockInfo", "ConvConfig", "Source", "TENSORS", "same_padding"]

Source = Union[str, torch.fx.Node, None]

# The six tensors of a BN block, in the order the folding functions take them; an affine
# block's are the conv's weight and bias, then "scale" and "shift".
TENSORS = ("weight", "bias", "running_mean", "running_var", "bn_weight", "bn_bias")


@dataclass(frozen=True)
class ConvConfig:
    """How the convolution runs, normalised to `torch.convolution`'s arguments."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]        # symmetric padding handed to the conv itself
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int
    pre_pad: tuple[int, ...] | None = None  # F.pad amounts applied first (padding_mode, 'same')
    pad_mode: str = "constant"               # F.pad mode for pre_pad


def same_padding(kernel_size, dilation) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """`padding='same'` as (symmetric conv padding, F.pad amounts or None).

    An even total (dilation·(k−1)) is split evenly; an odd one puts the extra element on the
    right, as torch does, which a conv's own symmetric padding cannot express.
    """
    totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
    if all(t % 2 == 0 for t in totals):
        return tuple(t // 2 for t in totals), None
    pre_pad: list[int] = []
    for t in reversed(totals):  # F.pad takes the last dim first, left then right
        pre_pad += [t // 2, t - t // 2]
    return (0,) * len(totals), tuple(pre_pad)


@dataclass
class Block:
    """A conv→BN block in a graph; `reason` is set when it must not be folded."""

    conv: str                       # qualified name of the conv (or its node name)
    bn: str                         # qualified name of the BN (or its node name)
    kind: str                       # e.g. "Conv2d+BatchNorm2d"
    conv_node: torch.fx.Node        # produces the conv output
    bn_node: torch.fx.Node          # consumes it; its users get the lowered value
    inner: tuple[torch.fx.Node, ...] = ()   # nodes between the two, gone with the block
    input: torch.fx.Node | None = None        # the conv's input
    config: ConvConfig | None = None          # None for a linear block
    op: str = "conv"                # "conv", or "linear" for Linear→BatchNorm1d
    norm: str = "batch"             # "batch" (running statistics), "affine" (`conv·S + B`)
    negate_shift: bool = False      # an affine epilogue written `conv·S − B`
    view: torch.fx.Node | None = None         # linear: `out.flatten(s, e)` read by the norm
    flatten: tuple[int, int] | None = None    # that view's (start_dim, end_dim)
    tensors: dict[str, Source] = field(default_factory=dict)   # keys: TENSORS
    eps: float = 1e-5
    epilogue: tuple[str, ...] = ()  # modules applied after the norm (timm's drop, act)
    checks: tuple[tuple[Source, str], ...] = ()  # the norm's input checks: (module, method)
    check_nodes: tuple[torch.fx.Node, ...] = ()  # traced checks the lowering takes over
    training: bool | None = None    # the BN call's own flag (functional calls); None: a module's
    reason: str | None = None       # why it is not folded; None when foldable
    per_call: bool = False          # lowered by auto's TUNE: Tune or Eval chosen on each call

    @property
    def foldable(self) -> bool:
        return self.reason is None

    def remap(self, node_map: dict[torch.fx.Node, torch.fx.Node]) -> "Block":
        """The same block in a copy of its graph."""

        def move(src: Source) -> Source:
            return node_map[src] if isinstance(src, torch.fx.Node) else src

        return dataclasses.replace(
            self, conv_node=node_map[self.conv_node], bn_node=node_map[self.bn_node],
            input=move(self.input), view=move(self.view), tensors={k: move(v) for k, v in self.tensors.items()},
            inner=tuple(node_map[n] for n in self.inner),
            checks=tuple((move(m), name) for m, name in self.checks),
            check_nodes=tuple(node_map[n] for n in self.check_nodes))


@dataclass(frozen=True)
class BlockInfo:
    """What `describe()` reports for one block."""

    conv: str                   # qualified name of the conv module
    bn: str                     # qualified name of the BN module
    kind: str                   # e.g. "Conv2d+BatchNorm2d"
    lowering: Mode | None       # the lowering in effect now; None when not folded
    reason: str | None          # why the block is left as it is, else None
    # auto's TUNE chooses per call (kernels/choice.py): what the last call ran, TUNE or EVAL,
    # and why; None when the block does not choose or has not been called since.
    path: Mode | None = None
    path_reason: str | None = None

    @property
    def folded(self) -> bool:
        return self.lowering in (Mode.TUNE, Mode.DEPLOY)
