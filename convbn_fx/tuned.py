"""TunedGraphModule: a GraphModule whose conv→BN blocks follow the model's current state.

The lowering that is right for a block depends on module state that users change freely
after the rewrite: `model.train()`, `bn.eval()` on one submodule, `requires_grad_()`, a model
traced while a `self.training` branch went one way. Before every call, a cheap check compares
that state with the state the current code was generated for; when it differs, the blocks are
lowered again from the untouched template graph and the module recompiled. So `code` always
shows plain torch ops for the lowerings in effect, and the result is never stale.
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
from .errors import ConvBNError, ModeError
from .kinds import is_frozen_bn
from .matching import find_blocks
from .modes import Mode, auto_mode
from .passes import registry_version
from .rewrite import copy_graph, lower_graph
from .tracing import reads_training_flag, trace_graph

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
    if torch.compiler.is_compiling():
        # Dynamo does not trace into torch.fx's _WrappedCall (it only formats errors), so
        # under torch.compile(fullgraph=True) it would stop here; nn.Module's call it traces.
        return nn.Module.__call__(self, *args, **kwargs)
    return self._wrapped_call(self, *args, **kwargs)


def _traced_through_branchy(gm: torch.fx.GraphModule, template: torch.fx.Graph) -> list:
    """Modules the tracer went through (not called as leaves) whose code reads `training`."""
    called = {n.target for n in template.nodes if n.op == "call_module"}
    found = [gm] if reads_training_flag(gm._convbn_source) else []
    for name, m in gm.named_modules():
        parts = name.split(".")
        if not name or any(".".join(parts[:i]) in called for i in range(1, len(parts) + 1)):
            continue
        if reads_training_flag(m):
            found.append(m)
    return found


def _inlined_modules(gm: torch.fx.GraphModule, template: torch.fx.Graph) -> list[tuple]:
    """(path, parent, name, module) for each submodule whose forward the trace inlined.

    The graph reads such a module's tensors without calling it, so a hook, `fully_shard` or an
    activation-checkpoint wrapper put on it after the rewrite would never run. Taken from the
    tracer's module stack, so modules the forward never entered are not included.
    """
    called = {n.target for n in template.nodes if n.op == "call_module"}
    paths = {entry[0] for n in template.nodes
             for entry in n.meta.get("nn_module_stack", {}).values()}
    found = []
    for path in sorted(paths - called - {""}):
        parent_path, _, name = path.rpartition(".")
        try:
            parent = gm.get_submodule(parent_path)
        except AttributeError:
            continue
        if parent._modules.get(name) is not None:
            found.append((path, parent, name, parent._modules[name]))
    return found


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks
                or m._backward_hooks)


def _inlined_state(parent: nn.Module, name: str, m: nn.Module) -> tuple:
    # Hook dicts are keyed by handle ids, which only grow: adding and removing both show.
    return (parent._modules.get(name) is m, tuple(m._forward_pre_hooks),
            tuple(m._forward_hooks), tuple(m._backward_pre_hooks), tuple(m._backward_hooks))


class _State(NamedTuple):
    """What the chosen lowerings depend on, read before every call."""

    bn_training: list[bool]         # each frozen-or-not BN of a foldable block
    requires_grad: list[bool]       # each parameter of a foldable block's conv and BN
    branch_training: list[bool]     # traced-through modules whose forward reads `training`
    registry: int                   # the lowering registry's version
    hooks: list[bool]               # hooks on block modules (folding would skip them)
    inlined: list[tuple]            # identity and hooks of modules whose forward was inlined


class TunedGraphModule(torch.fx.GraphModule):
    """A rewritten model; build it with `convbn_fx.tune_mode`, not directly."""

    def __init__(self, root: nn.Module, graph: torch.fx.Graph, mode,
                 source: nn.Module | None = None, prefix: str = ""):
        if _has_hooks(root):
            raise ConvBNError(
                f"{prefix or type(root).__name__} has hooks (fully_shard, activation "
                f"checkpointing or register_*_hook) that the rewritten copy tune_mode makes of it "
                f"would not run; call tune_mode first and add them to its result (fully_shard: "
                f"only to the result's root).")
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
        self._convbn_hooked = list({id(m): m for b in self._convbn_blocks for m in (
            self.get_submodule(b.conv), self.get_submodule(b.bn))}.values())
        self._convbn_branchy = _traced_through_branchy(self, template) \
            if self._convbn_source is not None else []
        self._convbn_inlined = _inlined_modules(self, template)

    def _convbn_state(self) -> _State:
        """Everything the chosen lowerings depend on; cheap enough to compute every call."""
        return _State(
            [bn.training for bn in self._convbn_bns],
            [p.requires_grad for m in self._convbn_owners for p in m._parameters.values()
             if p is not None],
            [m.training for m in self._convbn_branchy],
            registry_version(),
            [_has_hooks(m) for m in self._convbn_hooked],
            [_inlined_state(parent, name, m) for _, parent, name, m in self._convbn_inlined],
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
        if old is not None and old.inlined != now.inlined:
            raise ConvBNError(self._convbn_inlined_changed(old.inlined, now.inlined))
        if old is not None and self._convbn_source is not None \
                and old.branch_training != now.branch_training:
            self._convbn_source.training = self.training  # the root's flag lives on self
            self._convbn_set_template(trace_graph(self._convbn_source))
        elif old is not None and old.hooks != now.hooks:
            self._convbn_set_template(self._convbn_template)  # match again: reasons changed
        lowerings = [self._convbn_choose(b, strict) for b in self._convbn_blocks]
        key = self._convbn_state()  # the blocks may have changed above
        structure = (key.branch_training, key.registry, key.hooks)
        if old is None or lowerings != self._convbn_lowerings \
                or structure != (old.branch_training, old.registry, old.hooks):
            self.graph = lower_graph(self._convbn_template, self._convbn_blocks, lowerings)
            log.debug("%s relowered: %s", type(self).__name__, lowerings)
        self._convbn_lowerings = lowerings
        self._convbn_key = key

    def _convbn_inlined_changed(self, old: list[tuple], now: list[tuple]) -> str:
        """The sentence for a module whose inlined forward gained hooks or was replaced."""
        i = next(i for i, (a, b) in enumerate(zip(old, now)) if a != b)
        path, parent, name, _ = self._convbn_inlined[i]
        if now[i][0]:
            change, lost = "had its hooks changed", "they"
        else:
            change, lost = f"was replaced by a {type(parent._modules.get(name)).__name__}", "it"
        return (f"{path} {change} after tune_mode, but the rewritten graph inlines the forward "
                f"it had, so {lost} would not run; add hooks and activation checkpointing before "
                f"tune_mode, and fully_shard only the root of tune_mode's result.")

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
                                source=self._convbn_source,
                                prefix=self._convbn_prefix)

    def set_mode(self, mode) -> None:
        """Change the mode rule ("auto", a Mode, or a policy) and relower now."""
        self._convbn_mode = mode
        self._convbn_key = None
        self._convbn_lowerings = []
        self._convbn_relower(strict=True)

    @property
    def convbn_mode(self) -> Mode | str | Callable:
        return self._convbn_mode
