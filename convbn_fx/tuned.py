"""TunedGraphModule: a GraphModule whose conv→BN blocks follow the model's current state.

The lowering that is right for a block depends on module state that users change freely
after the rewrite: `model.train()`, `bn.eval()` on one submodule, `requires_grad_()`, a model
traced while a `self.training` branch went one way, hooks (or `fully_shard`) added to a module
the graph went through, a submodule replaced. Before every call, a cheap check compares that
state with the state the current code was generated for; when it differs, the blocks are
lowered again from the untouched template graph (or from a new trace, when the graph itself
must change) and the module recompiled. So `code` always shows plain torch ops for the
lowerings in effect, and the result is never stale.
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
from typing import Callable, NamedTuple

import torch
import torch.fx
import torch.nn as nn

from .blocks import Block, BlockInfo
from .errors import ModeError
from .kinds import is_frozen_bn
from .matching import find_blocks
from .modes import Mode, auto_mode
from .passes import registry_version
from .rewrite import copy_graph, lower_graph
from .tracing import check_input, reads_training_flag, trace_graph

__all__ = ["TunedGraphModule"]

log = logging.getLogger(__name__)


# Shown by Dynamo when torch.compile(model, fullgraph=True) meets a state change.
_RELOWER_UNDER_DYNAMO = (
    "convbn_fx lowers the blocks again in Python when module state changes (train/eval, "
    "requires_grad, hooks), which one graph cannot hold; for fullgraph=True compile in place "
    "with model.compile(fullgraph=True), which runs that check before the compiled forward")


def _eager_only(fn):
    """Keep torch.compile from tracing `fn` (it edits and recompiles the graph module).

    Unlike `torch.compiler.disable`, importing this module does not import torch._dynamo
    (seconds of start-up for every user); when Dynamo is not loaded, nothing is compiling.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        disabled = run.__dict__.get("disabled")
        if disabled is None:
            disabled = run.__dict__["disabled"] = sys.modules["torch._dynamo"].disable(
                fn, reason=_RELOWER_UNDER_DYNAMO)
        return disabled(*args, **kwargs)

    return run


def _call_checked(self, *args, **kwargs):
    # Installed as the class's __call__ by recompile(): the per-call state check.
    if self._convbn_state() != self._convbn_key:
        self._convbn_relower()
    # Not torch.fx's _WrappedCall (it only formats errors): Dynamo does not trace into it,
    # and its `super(type(self), obj)` recurses into this function once another wrapper
    # (FSDP's fully_shard) has swapped the class for a subclass.
    return nn.Module.__call__(self, *args, **kwargs)


def _traced_through(gm: torch.fx.GraphModule, template: torch.fx.Graph) -> list[tuple]:
    """(parent, name, module) for each submodule the tracer went through (not a call, nor
    inside one): the graph reads its tensors without calling it."""
    # Modules the graph calls, or passes as values (`checkpoint(self.layer1, x)`; not the BN
    # handed to its own input check, whose forward was traced through).
    called = {n.target for n in template.nodes if n.op == "call_module" or (
        n.op == "get_attr" and any(u.target is not check_input for u in n.users))}
    found = []
    for parent_name, parent in gm.named_modules():
        for name, m in parent.named_children():
            path = f"{parent_name}.{name}" if parent_name else name
            parts = path.split(".")
            if not any(".".join(parts[:i]) in called for i in range(1, len(parts) + 1)):
                found.append((parent, name, m))
    return found


class _State(NamedTuple):
    """What the chosen lowerings depend on, read before every call."""

    bn_training: list[bool]         # each frozen-or-not BN of a foldable block
    requires_grad: list[bool]       # each parameter of a foldable block's conv and BN
    branch_training: list[bool]     # traced-through modules whose forward reads `training`
    registry: int                   # the lowering registry's version
    hooks: list[bool]               # hooks on block modules and traced-through modules
    replaced: list[bool]            # a traced-through module swapped for another (surgery)


class TunedGraphModule(torch.fx.GraphModule):
    """A rewritten model; build it with `convbn_fx.tune_mode`, not directly."""

    def __init__(self, root: nn.Module, graph: torch.fx.Graph, mode,
                 source: nn.Module | None = None, prefix: str = "",
                 opaque: frozenset[str] = frozenset()):
        # Start from an empty graph: generating code for the traced graph only to replace it
        # at once would cost a third of tune_mode's time. The lowered graph is compiled once.
        stub = torch.fx.Graph()
        stub.output(None)
        super().__init__(root, stub, type(root).__name__)
        # Hold the root's whole module tree, not just the modules the graph calls, so the
        # state_dict keys (and unused submodules) are exactly the input's.
        for name, child in root.named_children():
            setattr(self, name, child)
        for name, p in root.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in root.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in root._non_persistent_buffers_set)
        for node in graph.nodes:  # other root attributes the graph reads (traced constants)
            if node.op == "get_attr" and "." not in node.target \
                    and not hasattr(self, node.target):
                setattr(self, node.target, getattr(root, node.target))
        self.training = root.training
        self._convbn_mode = mode
        self._convbn_prefix = prefix  # where this part sits in the model, for policies
        # The traced model, retraced when a `self.training` branch flips. Kept out of
        # _modules: it is not a submodule (it would duplicate every state_dict key).
        self.__dict__["_convbn_source"] = source
        self._convbn_opaque = opaque  # submodules kept as calls because they did not trace
        self._convbn_key = None
        self._convbn_lowerings: list[Mode | None] = []
        self._convbn_set_template(graph)
        self._convbn_relower(strict=True)

    # -- state -----------------------------------------------------------------------------

    def _convbn_set_template(self, template: torch.fx.Graph) -> None:
        self._convbn_template = template
        self._convbn_blocks: list[Block] = find_blocks(template, self)
        foldable = [b for b in self._convbn_blocks if b.foldable]
        mods = {id(m): m for b in foldable
                for m in (self.get_submodule(b.conv), self.get_submodule(b.bn))}
        self._convbn_bns = [self.get_submodule(b.bn) for b in foldable
                            if not is_frozen_bn(self.get_submodule(b.bn))]
        self._convbn_owners = list(mods.values())  # parameters are read through these
        modules = dict(self.named_modules())
        self._convbn_through = _traced_through(self, template)
        through = [m for _, _, m in self._convbn_through]
        # A hook on a block module skips the fold; one on a traced-through module would not
        # run at all, so it makes that module a call (see _convbn_retrace).
        self._convbn_hooked = list({id(m): m for m in [
            m for b in self._convbn_blocks for m in (modules.get(b.conv), modules.get(b.bn))
            if m is not None] + through}.values())
        self._convbn_branchy = [] if self._convbn_source is None else (
            [self] * reads_training_flag(self._convbn_source)
            + [m for m in through if reads_training_flag(m)])

    def _convbn_state(self) -> _State:
        """Everything the chosen lowerings depend on; cheap enough to compute every call."""
        return _State(
            [bn.training for bn in self._convbn_bns],
            [p.requires_grad for m in self._convbn_owners for p in m._parameters.values()
             if p is not None],
            [m.training for m in self._convbn_branchy],
            registry_version(),
            [bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                  or m._backward_pre_hooks) for m in self._convbn_hooked],
            [parent._modules.get(name) is not m for parent, name, m in self._convbn_through],
        )

    def _convbn_uses_batch_stats(self, bn: nn.Module) -> bool:
        return not is_frozen_bn(bn) and (bn.training or bn.running_mean is None)

    def _convbn_requires_grad(self, block: Block) -> bool:
        return any(p.requires_grad for name in (block.conv, block.bn)
                   for p in self.get_submodule(name)._parameters.values() if p is not None)

    # -- lowering --------------------------------------------------------------------------

    def _convbn_choose(self, block: Block, strict: bool) -> Mode | None:
        if not block.foldable:
            return None
        batch_stats = self._convbn_uses_batch_stats(self.get_submodule(block.bn))
        requires_grad = self._convbn_requires_grad(block)
        auto = auto_mode(batch_stats, requires_grad)
        mode = self._convbn_mode
        if mode == "auto":
            return auto
        if isinstance(mode, Mode):
            wanted = mode
        else:
            pre = f"{self._convbn_prefix}." if self._convbn_prefix else ""
            wanted = mode(BlockInfo(pre + block.conv, pre + block.bn, block.kind, auto, None))
            if wanted is None:
                return None
            try:
                wanted = Mode(wanted)
            except ValueError:
                raise ModeError(f"the mode policy returned {wanted!r} for block {block.bn}; "
                                "it must return a convbn_fx.Mode or None.") from None
        problem = None
        if batch_stats and wanted is not Mode.TRAIN:
            problem = (f"{wanted} needs running statistics but BN {block.bn} normalises with "
                       f"batch statistics; call .eval() on it first, or use mode='auto'")
        elif wanted is Mode.DEPLOY and requires_grad:
            problem = (f"DEPLOY folds {block.bn} into constant weights, so its trainable "
                       f"parameters would get no gradient; freeze them with requires_grad_(False), "
                       f"or use mode='tune'")
        if problem is None:
            return wanted
        if strict:
            raise ModeError(problem + ".")
        log.warning("%s; using %s for this block instead", problem, auto)
        return auto

    @_eager_only
    def _convbn_relower(self, strict: bool = False) -> None:
        """Lower every block for the current state and recompile (only when state changed)."""
        old, now = self._convbn_key, self._convbn_state()
        if old is not None and self._convbn_source is not None and (
                old.branch_training != now.branch_training or old.hooks != now.hooks
                or old.replaced != now.replaced):
            self._convbn_set_template(self._convbn_retrace())
        elif old is not None and old.hooks != now.hooks:
            self._convbn_set_template(self._convbn_template)  # match again: reasons changed
        lowerings = [self._convbn_choose(b, strict) for b in self._convbn_blocks]
        key = self._convbn_state()  # the blocks may have changed above
        structure = (key.branch_training, key.registry, key.hooks, key.replaced)
        if old is None or lowerings != self._convbn_lowerings \
                or structure != (old.branch_training, old.registry, old.hooks, old.replaced):
            self.graph = lower_graph(self._convbn_template, self._convbn_blocks, lowerings)
            log.debug("%s relowered: %s", type(self).__name__, lowerings)
        self._convbn_lowerings = lowerings
        self._convbn_key = key

    def _convbn_retrace(self) -> torch.fx.Graph:
        """Trace the source again (a `self.training` branch flipped, or hooks came or went).

        A module that gained hooks after the rewrite (`register_forward_hook`, FSDP's
        `fully_shard` on a block) becomes a call, so the hooks run, and is rewritten in place
        as a part: hooks and FSDP's state belong to that module object, so a copy would not do.
        """
        from .api import rewrite_kept_calls  # api builds on this module

        # The source's class and plain attributes, over this module's current children (a
        # child replaced on the result after the rewrite is not on the source).
        view = object.__new__(type(self._convbn_source))
        view.__dict__.update(self._convbn_source.__dict__)
        for key in ("_modules", "_parameters", "_buffers"):
            view.__dict__[key] = self.__dict__[key]
        view.training = self.training  # the root's flag lives on self
        traced = trace_graph(view, self._convbn_opaque)
        rewrite_kept_calls(view, traced, self._convbn_mode, self._convbn_prefix)
        return traced.graph

    def recompile(self):
        code = super().recompile()
        type(self).__call__ = _call_checked
        return code

    # -- copying ---------------------------------------------------------------------------

    def _deepcopy_init(self):
        def init(res, fake_mod, graph):
            torch.fx.GraphModule.__init__(res, fake_mod, graph, type(self).__name__)
            body = fake_mod.__dict__  # the deep-copied __dict__: restore the whole tree
            for name, child in body["_modules"].items():
                setattr(res, name, child)
            res._parameters.update(body["_parameters"])
            res._buffers.update(body["_buffers"])
            res._non_persistent_buffers_set = set(body["_non_persistent_buffers_set"])
            res.training = body["training"]
        return init

    def __deepcopy__(self, memo):
        # Blocks hold graph nodes, which deepcopy cannot map; copy the rest, then re-derive.
        extra = {k: self.__dict__.pop(k) for k in list(self.__dict__) if k.startswith("_convbn_")}
        try:
            res = super().__deepcopy__(memo)
        finally:
            self.__dict__.update(extra)
        res._convbn_mode = extra["_convbn_mode"]
        res._convbn_prefix = extra["_convbn_prefix"]
        res.__dict__["_convbn_source"] = copy.deepcopy(extra["_convbn_source"], memo)
        res._convbn_opaque = extra["_convbn_opaque"]
        res._convbn_key, res._convbn_lowerings = None, []
        res._convbn_set_template(copy_graph(extra["_convbn_template"])[0])
        res._convbn_relower()
        return res

    # -- public ----------------------------------------------------------------------------

    def block_infos(self, prefix: str = "") -> list[BlockInfo]:
        """BlockInfo for each block, for the state the model is in now."""
        if self._convbn_state() != self._convbn_key:
            self._convbn_relower()
        pre = f"{prefix}." if prefix else ""
        return [BlockInfo(pre + b.conv, pre + b.bn, b.kind, lowering, b.reason)
                for b, lowering in zip(self._convbn_blocks, self._convbn_lowerings)]

    def with_mode(self, mode) -> "TunedGraphModule":
        """A new TunedGraphModule over the same modules, lowered by another mode rule."""
        return TunedGraphModule(self, copy_graph(self._convbn_template)[0], mode,
                                source=self._convbn_source, prefix=self._convbn_prefix,
                                opaque=self._convbn_opaque)

    def set_mode(self, mode) -> None:
        """Change the mode rule ("auto", a Mode, or a policy) and relower now."""
        self._convbn_mode = mode
        self._convbn_key = None
        self._convbn_lowerings = []
        self._convbn_relower(strict=True)

    @property
    def convbn_mode(self) -> Mode | str | Callable:
        return self._convbn_mode
