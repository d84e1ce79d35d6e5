"""convbn_fx inside torch.compile: a Dynamo backend and an inductor pre-grad pass.

Dynamo hands a backend a functional graph (`torch.conv2d` → `F.batch_norm`, parameters as
placeholders or `get_attr` nodes). Both entry points rewrite every foldable block of that
graph with the graph pass (`graph.tune_graph`) before AOTAutograd traces it, so the fold reaches
the backward graph too: BN's elementwise pass and the saved conv output disappear from the
training step, which inductor's own `efficient_conv_bn_eval_fx_passes` leaves to the
partitioner. Blocks whose BN has `training=True` are left to run as written. When
AOTAutograd traces the rewritten graph, `kernels.conv.conv_scaled` becomes one opaque custom
op (`convbn_fx::conv_scaled`), so the partitioner keeps x, W and s for backward but never the
folded weight W·s; under autocast it stays the autograd.Function, which
casts as the unrewritten conv does.

    model = torch.compile(model, backend=convbn_fx.backend)   # or backend="convbn_fx"

    torch._inductor.config.pre_grad_custom_pass = convbn_fx.pre_grad_pass
    model = torch.compile(model)
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ..graph.tune_graph import tune_graph
from ..passes.registry import get_lowerings
from ..vocabulary.modes import Mode, ModeArg, normalize_mode

__all__ = ["backend", "make_backend", "TunePass", "pre_grad_pass"]

log = logging.getLogger(__name__)

_PACKAGE = pathlib.Path(__file__).parent.parent
# The layers whose sources decide what the rewrite does (not the model walk, nor the tools).
_REWRITE_LAYERS = ("vocabulary", "kernels", "passes", "graph")


def make_backend(mode: ModeArg = "auto", compiler: Callable | None = None) -> Callable:
    """A Dynamo backend that rewrites blocks with `mode`, then compiles with `compiler`.

    Args:
        mode: "auto" (TUNE for frozen BN, BN with training=True left as it is), a Mode, or a
            policy; see `convbn_fx.graph.choose` (DEPLOY is refused in compiled graphs).
        compiler: a Dynamo backend `(gm, example_inputs) -> callable`; default inductor.
    """
    mode = normalize_mode(mode)

    def convbn_fx_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
        result = tune_graph(gm, mode)
        log.info("convbn_fx backend rewrote a graph: %s", result.counts() or "no blocks")
        if compiler is not None:
            return compiler(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    return convbn_fx_backend


_default_backend = make_backend()


def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
    """The `torch.compile` backend: rewrite the Dynamo graph's blocks, compile with inductor.

    Also registered as `backend="convbn_fx"` (the `torch_dynamo_backends` entry point).
    """
    return _default_backend(gm, example_inputs)


class TunePass(CustomGraphPass):
    """An inductor pre-grad pass that rewrites conv→BN blocks (see `pre_grad_pass`).

    `uuid()` hashes the sources that decide the rewrite plus the mode and the registered
    lowerings, so inductor's FX graph cache misses when any of them changes. A policy
    callable cannot be hashed: with one, `uuid()` is None and inductor does not cache.
    """

    def __init__(self, mode: ModeArg = "auto"):
        self.mode = normalize_mode(mode)

    def __call__(self, graph: torch.fx.Graph) -> None:
        result = tune_graph(graph, self.mode)
        log.info("convbn_fx pre-grad pass rewrote a graph: %s", result.counts() or "no blocks")

    def uuid(self) -> bytes | None:
        if callable(self.mode) and not isinstance(self.mode, Mode):
            return None
        files = tuple(str(p) for layer in _REWRITE_LAYERS
                      for p in sorted((_PACKAGE / layer).rglob("*.py")))
        lowerings = sorted(f"{m.value}={fn.__module__}.{fn.__qualname__}"
                           for m, fn in get_lowerings().items())
        extra = f"mode={self.mode};" + ";".join(lowerings)
        return hashlib.sha256(get_hash_for_files(files) + extra.encode()).digest()

    def __repr__(self) -> str:
        return f"TunePass(mode={self.mode!r})"


pre_grad_pass = TunePass()
