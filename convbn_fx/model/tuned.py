"""TunedGraphModule: a GraphModule whose conv→BN blocks follow the model's current state.

Before every call, a cheap check compares the module state its lowerings depend on (see
watch.py) with the state the current code was generated for; when it differs, the rewrite
pass (`graph.tune_graph`) runs again on the untouched template graph, or on a new trace when
the graph itself must change, and the module is recompiled. So `code` always shows plain
torch ops for the lowerings in effect, and the result is never stale. Everything this takes
beyond a GraphModule is one state object (`Tuning`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx
import torch.nn as nn

from ..graph.lower import copy_graph
from ..kernels.choice import explain, recording
from ..graph.tune_graph import TuneResult, tune_graph
from ..vocabulary.blocks import BlockInfo
from ..vocabulary.modes import Mode, ModeArg
from .pickling import PickledTuning, PortableGraph, new_instance, reduced
from .unfolded import folded_nothing, graph_may_be_plain
from .verify import agree, call_key
from .watch import StateKey, Watch

__all__ = ["TunedGraphModule", "Tuning", "Retrace"]

log = logging.getLogger(__name__)

# Traces `view` again over its current children, rewriting what the new trace keeps as
# calls: (view, untraceable, mode rule, prefix) -> the new template graph.
Retrace = Callable[[nn.Module, frozenset, ModeArg, str], torch.fx.Graph]
# Rewrites the children of `view` (sharing the graph module's children) on their own, for a
# module whose trace does not compute its forward: (view, mode rule, prefix) -> None.
Split = Callable[[nn.Module, ModeArg, str], None]

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
    self.follow_state()
    # Not torch.fx's _WrappedCall (it only formats errors): Dynamo does not trace into it,
    # and its `super(type(self), obj)` recurses into this function once another wrapper
    # (FSDP's fully_shard) has swapped the class for a subclass.
    return nn.Module.__call__(self, *args, **kwargs)


def _checked_forward(generated):
    """The generated forward, run only for inputs whose trace was checked (verify.py), and
    only for calls that fold something (unfolded.py); else the module's own forward."""

    @functools.wraps(generated)
    def forward(self, *args, **kwargs):
        t = self.__dict__["_convbn"]
        key = call_key(args, kwargs) if t.source is not None else None
        if key is not None:
            if t.verify and key not in t.trusted:
                if key not in t.failed:
                    self._check_trace(key, args, kwargs)
                if key in t.failed:
                    return self._own_forward(args, kwargs)
            key = (key, torch.is_grad_enabled())
            choices = t.plain.get(key)
            if choices is not None:  # this signature folded nothing when it ran the graph
                t.paths.update(choices)
                return self._own_forward(args, kwargs)
        if torch.compiler.is_compiling():  # nothing is recorded there (and Dynamo sees no
            return generated(self, *args, **kwargs)  # context variable)
        choices = {}
        with recording(choices):  # each per-call block's path, for describe()
            out = generated(self, *args, **kwargs)
        t.paths.update(choices)
        if key is not None and t.may_be_plain and folded_nothing(choices):
            t.plain[key] = choices
        return out

    return forward


@dataclass
class Tuning:
    """The one object a TunedGraphModule carries beyond a GraphModule."""

    rule: ModeArg                   # "auto", a Mode, or a policy
    prefix: str                     # where this graph sits in the model, for policies
    source: nn.Module | None        # the traced model, retraced when its graph must change
    untraceable: frozenset[str]     # submodules kept as calls because they did not trace
    retrace: Retrace | None         # how to trace `source` again (None: never)
    template: torch.fx.Graph        # the traced graph, never edited
    result: TuneResult | None = None    # the last lowering of `template`
    watch: Watch | None = None          # what the per-call check reads
    key: StateKey | None = None         # the state `result` was lowered for
    verify: bool = True                 # check the trace on each new input signature
    split: Split | None = None          # how to rewrite the children alone (trace mismatch)
    trusted: set = field(default_factory=set)   # input signatures the trace computes
    failed: set = field(default_factory=set)    # input signatures it does not compute
    split_done: bool = False            # the children were rewritten on their own (`split`)
    paths: dict = field(default_factory=dict)   # block name -> its last call's Choice
    plain: dict = field(default_factory=dict)   # (signature, grad) -> Choices, folding nothing
    may_be_plain: bool = False          # graph_may_be_plain(result), kept with it


class TunedGraphModule(torch.fx.GraphModule):
    """A rewritten model; build it with `convbn_fx.tune_mode`, not directly."""

    def __init__(self, root: nn.Module, graph: torch.fx.Graph, mode: ModeArg,
                 source: nn.Module | None = None, prefix: str = "",
                 untraceable: frozenset[str] = frozenset(), retrace: Retrace | None = None,
                 verify: bool = True, split: Split | None = None):
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
        # Kept out of _modules: the source is not a submodule (it would duplicate every
        # state_dict key).
        self.__dict__["_convbn"] = Tuning(mode, prefix, source, frozenset(untraceable), retrace,
                                          graph, verify=verify, split=split)
        self._relower(strict=True)

    # -- following state --------------------------------------------------------------------

    def follow_state(self) -> None:
        """Lower again if module state changed since the code was generated (every call)."""
        t = self.__dict__["_convbn"]
        if t.watch.read() != t.key:
            self._relower()

    @_eager_only
    def _relower(self, strict: bool = False) -> None:
        """Run the pass again for the current state (only re-lowering what changed)."""
        t = self.__dict__["_convbn"]
        old = t.key
        reuse = t.result
        if old is None or t.watch is None:
            reuse = None
        else:
            now = t.watch.read()
            if t.retrace is not None and t.source is not None and now.needs_retrace(old):
                t.template, reuse = self._retrace(), None
                t.trusted, t.failed, t.plain = set(), set(), {}  # a new graph: checked again
            elif now.hooks != old.hooks or now.registry != old.registry:
                reuse = None  # match again: hooks change the reasons, lowerings changed
        if reuse is None:
            t.result = t.watch = None
        result = tune_graph(t.template, t.rule, self, inplace=False, strict=strict,
                            prefix=t.prefix, reuse=reuse)
        if t.watch is None:
            t.watch = Watch.of(self, t.template, result.blocks, t.source)
        if result is not t.result:
            t.result, t.plain, t.may_be_plain = result, {}, graph_may_be_plain(result)
            self.graph = result.graph
            log.debug("%s relowered: %s", type(self).__name__, result.lowerings)
        t.key = t.watch.read()

    def _view(self) -> nn.Module:
        """The source's class and plain attributes, over this module's current children (a
        child replaced on the result after the rewrite is not on the source)."""
        t = self.__dict__["_convbn"]
        view = object.__new__(type(t.source))
        view.__dict__.update(t.source.__dict__)
        for key in ("_modules", "_parameters", "_buffers"):
            view.__dict__[key] = self.__dict__[key]
        view.training = self.training  # the root's flag lives on self
        return view

    def _retrace(self) -> torch.fx.Graph:
        """Trace the source again over this module's current children.

        A module that gained hooks after the rewrite (`register_forward_hook`, FSDP's
        `fully_shard` on a block) becomes a call, so the hooks run; the retrace function
        rewrites it in place as a part (hooks and FSDP's state belong to that module object).
        """
        t = self.__dict__["_convbn"]
        return t.retrace(self._view(), t.untraceable, t.rule, t.prefix)

    @_eager_only
    def _check_trace(self, key: tuple, args: tuple, kwargs: dict) -> None:
        """Trust the trace for this input signature only if it computes the forward's result;
        else run the forward itself for it, with the children rewritten on their own."""
        t = self.__dict__["_convbn"]
        view = self._view()
        traced = torch.fx.GraphModule(self, t.template, type(self).__name__)
        if agree(functools.partial(type(view).forward, view), traced, self, args, kwargs):
            t.trusted.add(key)
            return
        t.failed.add(key)
        log.warning("the traced graph of %s computes something else than its forward on this "
                    "input (a branch taken on a traced value: isinstance, a flag, a shape); it "
                    "runs its own forward for such inputs, with its submodules rewritten on "
                    "their own", t.prefix or type(t.source).__name__)
        if t.split is not None and not t.split_done:
            t.split(view, t.rule, t.prefix)
            t.split_done = True
            # The graph reads the same parameters through the parts: nothing to retrace.
            t.watch = Watch.of(self, t.template, t.result.blocks, t.source)
            t.key = t.watch.read()

    def _own_forward(self, args: tuple, kwargs: dict):
        """The source's forward over this module's children (and its training flag now)."""
        view = self._view()
        return type(view).forward(view, *args, **kwargs)

    def recompile(self):
        code = super().recompile()
        cls = type(self)
        cls.forward = _checked_forward(cls.forward)
        cls.__call__ = _call_checked
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
        t = self.__dict__.pop("_convbn")
        try:
            res = super().__deepcopy__(memo)
        finally:
            self.__dict__["_convbn"] = t
        res.__dict__["_convbn"] = Tuning(t.rule, t.prefix, copy.deepcopy(t.source, memo),
                                         t.untraceable, t.retrace, copy_graph(t.template)[0],
                                         verify=t.verify, split=t.split)
        res._relower()
        return res

    # -- pickling (torch.save of the whole model; see pickling.py) --------------------------

    def __reduce__(self):
        # Not GraphModule's reduce, which traces the generated code again on load.
        return reduced(self, new_instance, (TunedGraphModule,), self.__getstate__())

    def __getstate__(self):
        """The module tree and what the rewrite was made from; nothing generated."""
        t = self.__dict__["_convbn"]
        body = {k: v for k, v in self.__dict__.items()
                if k not in ("_convbn", "_graph", "_code", "_lineno_map", "_prologue_start")}
        in_part = t.source is not None and t.source.__dict__.get("_convbn_part") is self
        return body, PickledTuning(t.rule, t.prefix, None if in_part else t.source, in_part,
                                   t.untraceable, t.retrace, PortableGraph.of(t.template),
                                   type(self).__name__, t.verify, t.split,
                                   split_done=t.split_done)

    def __setstate__(self, state):
        body, saved = state
        type(self).__name__ = saved.class_name  # as GraphModule(root, graph, class_name)
        super().__setstate__(body)
        self.__dict__["_convbn"] = Tuning(saved.rule, saved.prefix, saved.source,
                                          frozenset(saved.untraceable), saved.retrace,
                                          saved.template.build(), verify=saved.verify,
                                          split=saved.split)
        # The children are parts already when split_done: a failed check only falls back.
        self.__dict__["_convbn"].split_done = saved.split_done
        self._relower()  # for the state the model is in now, as after any state change

    def take_over(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """Make `gm` (the GraphModule this was built over) this rewritten module, in place."""
        t = self.__dict__["_convbn"]
        gm.__class__ = type(self)
        gm.__dict__["_convbn"] = t
        gm.graph = self.graph
        t.watch = Watch.of(gm, t.template, t.result.blocks, t.source)  # gm's own tree
        t.key = t.watch.read()
        return gm

    # -- public ----------------------------------------------------------------------------

    def block_infos(self, prefix: str = "") -> list[BlockInfo]:
        """BlockInfo for each block, for the state the model is in now."""
        self.follow_state()
        t = self.__dict__["_convbn"]
        if t.failed and not t.trusted:  # every input seen so far ran the forward itself
            pre = f"{prefix}." if prefix else ""
            why = (f"the trace of {prefix or type(t.source).__name__} does not compute what its "
                   "forward does, so it runs unrewritten (its submodules on their own)")
            return [BlockInfo(pre + b.conv, pre + b.bn, b.kind, None, b.reason or why)
                    for b in t.result.blocks]
        infos = t.result.infos(prefix)
        for i, (block, per_call) in enumerate(zip(t.result.blocks, t.result.per_call)):
            choice = t.paths.get(block.bn) if per_call else None
            if choice is not None:
                infos[i] = dataclasses.replace(infos[i], path=Mode.TUNE if choice[0] else
                                               Mode.EVAL, path_reason=explain(choice))
        return infos

    def with_mode(self, mode: ModeArg) -> "TunedGraphModule":
        """A new TunedGraphModule over the same modules, lowered by another mode rule."""
        t = self.__dict__["_convbn"]
        return TunedGraphModule(self, copy_graph(t.template)[0], mode, source=t.source,
                                prefix=t.prefix, untraceable=t.untraceable, retrace=t.retrace,
                                verify=t.verify, split=t.split)

    def set_mode(self, mode: ModeArg) -> None:
        """Change the mode rule ("auto", a Mode, or a policy) and relower now."""
        t = self.__dict__["_convbn"]
        t.rule, t.result, t.watch, t.key = mode, None, None, None
        self._relower(strict=True)

    @property
    def convbn_mode(self) -> Mode | str | Callable:
        return self.__dict__["_convbn"].rule

    @property
    def convbn_tuning(self) -> Tuning:
        """The rewrite's state: its rule, template graph, last result and what it watches."""
        return self.__dict__["_convbn"]
