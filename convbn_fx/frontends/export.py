"""convbn_fx for torch.export: rewrite the conv→BN blocks of an ExportedProgram.

Strategy: rewrite the program's *unlifted* module and export that again. `ep.module()` is a
GraphModule of aten ops whose parameters and buffers are attributes under their original
names; the graph pass (`graph.tune_graph`) lowers its blocks in place (TUNE, folded on every call), and
`torch.export.export` then retraces it, so the result's graph, signature, state_dict keys
and verifier checks are produced by export itself rather than patched by hand. Under export
the lowering is plain aten arithmetic (`kernels.conv.conv_scaled` takes its no-autograd path).
Dynamic dimensions of the original are declared again with the same names and ranges; a
program that was decomposed (`run_decompositions`) is decomposed again.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.fx
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree

from ..graph.tune_graph import tune_graph
from ..vocabulary.errors import ConvBNError
from ..vocabulary.modes import Mode, ModeArg

__all__ = ["tune_exported"]

log = logging.getLogger(__name__)


def _dim_spec(value, ranges, dims: dict) -> dict[int, Dim] | None:
    """The `dynamic_shapes` entry for one input: its symbolic dims as named `Dim`s."""
    if not isinstance(value, torch.Tensor):
        return None
    spec = {}
    for i, size in enumerate(value.shape):
        if not isinstance(size, torch.SymInt):
            continue
        expr = size.node.expr
        if not getattr(expr, "is_Symbol", False):  # derived (2*s): let export work it out
            spec[i] = Dim.DYNAMIC
            continue
        if expr not in dims:
            rng = ranges.get(expr)
            lo = int(rng.lower) if rng is not None and math.isfinite(rng.lower) else 0
            hi = int(rng.upper) if rng is not None and math.isfinite(rng.upper) else None
            dims[expr] = Dim(str(expr), min=lo, max=hi) if hi is not None \
                else Dim(str(expr), min=lo)
        spec[i] = dims[expr]
    return spec or None


def _dynamic_shapes(ep: ExportedProgram):
    """`dynamic_shapes` for re-exporting `ep` with its own example inputs, or None."""
    user = [n for n in ep.graph.nodes if n.op == "placeholder"
            and n.name in ep.graph_signature.user_inputs]
    dims: dict = {}
    flat = [_dim_spec(n.meta.get("val"), ep.range_constraints, dims) for n in user]
    if not dims and all(s is None for s in flat):
        return None
    args_spec, kwargs_spec = pytree.tree_unflatten(flat, ep.call_spec.in_spec)
    if kwargs_spec:
        raise ConvBNError("tune_exported cannot re-declare dynamic shapes of keyword inputs; "
                          "export with dynamic positional inputs only.")
    return tuple(args_spec)


def tune_exported(ep: ExportedProgram, mode: ModeArg = "auto") -> ExportedProgram:
    """An ExportedProgram computing what `ep` does, with every foldable conv→BN block folded.

    Args:
        ep: from `torch.export.export` (training IR) or after `run_decompositions`.
        mode: "auto" (TUNE for frozen BN, BN with training=True left as it is), a Mode, or
            a policy; see `convbn_fx.graph.choose` (DEPLOY is refused in exported graphs).
    Returns:
        A new ExportedProgram with the same inputs, outputs and state_dict keys (or `ep`
        itself when no block folds); `ep` is not changed. Folded blocks have no batch_norm
        op left.
    """
    if not isinstance(ep, ExportedProgram):
        raise ConvBNError(f"tune_exported expects a torch.export.ExportedProgram, got "
                          f"{type(ep).__name__}; for an nn.Module use convbn_fx.tune_mode.")
    if ep.example_inputs is None:
        raise ConvBNError("this ExportedProgram carries no example inputs, which re-exporting "
                          "needs; export it again with torch.export.export(model, args).")
    module = ep.module()
    result = tune_graph(module, mode)
    if not any(m not in (None, Mode.TRAIN) for m in result.lowerings):
        log.info("tune_exported: no block to fold")
        return ep
    args, kwargs = ep.example_inputs
    new = torch.export.export(module, args, kwargs, dynamic_shapes=_dynamic_shapes(ep),
                              strict=False)
    if ep.dialect != new.dialect:  # the input was decomposed: decompose the result alike
        new = new.run_decompositions()
    return new
