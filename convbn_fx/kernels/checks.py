"""Input checks that the rewritten graph runs, so what the original rejects it rejects too.

BN's own input checks (`_check_input_dim`) branch on the input's rank, which a symbolic
trace does not know; the tracer records them as calls of `check_input`, which runs the
module's own check at run time.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["check_input", "INPUT_CHECKS"]

# The BN methods that check their input (and would otherwise stop a trace).
INPUT_CHECKS = ("_check_input_dim", "_check_non_zero_input_channels")


def check_input(module: nn.Module, check: str, x: torch.Tensor) -> None:
    """Run a BN module's own input check at run time (the traced stand-in for the call)."""
    getattr(module, check)(x)
