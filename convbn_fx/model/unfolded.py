"""A call that folds no block runs the module's own forward, not the rewritten graph.

Where every block is lowered to compute what its modules compute (Eval, Train, or Tune that
chose Eval for the sizes at hand), the rewritten graph gives the same values and saves the
same tensors as the module's forward; it only adds dispatch: a Python call per block that
decides its path, and the generated code's attribute lookups. For a small model at a small
input that is the whole difference (about 1 ms of a 30 ms efficientnet_b0 step at 1×3×64²).
So a call signature whose last run of the graph folded nothing runs the forward itself.

The signature is the trace check's (shapes, dtypes, devices, plain arguments; verify.py)
with the autograd flag, which is all the per-call choice reads (kernels/choice.py). The
record is dropped whenever the lowerings change, so a state change is seen at once.
"""

from __future__ import annotations

from ..graph.tune_graph import TuneResult
from ..vocabulary.modes import Mode

__all__ = ["graph_may_be_plain", "folded_nothing"]

# Lowerings that compute the block as its modules do (the per-call Tune is checked per call).
_UNFOLDED = (None, Mode.EVAL, Mode.TRAIN)


def graph_may_be_plain(result: TuneResult) -> bool:
    """Every block's lowering computes what its modules do, or chooses per call."""
    return all(mode in _UNFOLDED or per_call
               for mode, per_call in zip(result.lowerings, result.per_call, strict=True))


def folded_nothing(choices: dict) -> bool:
    """No per-call block folded in the call that recorded `choices` (kernels/choice.py)."""
    return not any(choice[0] for choice in choices.values())
