"""The four ways a ConvBN block can run, and what `mode=` accepts.

After You et al., "Efficient ConvBN Blocks for Transfer Learning and Beyond" (ICLR 2024,
arXiv 2305.11624), section 3: Train uses batch statistics, Eval running statistics, Deploy folds
BN into constant conv weights and Tune folds it into the conv weight on every call so that
gradients still reach the block's parameters.
"""

from __future__ import annotations

import enum
from typing import Callable, Union

from .errors import ModeError

__all__ = ["Mode", "ModeArg", "normalize_mode"]


class Mode(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"
    DEPLOY = "deploy"
    TUNE = "tune"

    def __str__(self) -> str:
        return self.value


# What `tune_mode(mode=...)` accepts: "auto", a Mode or its value, or a per-block policy.
ModeArg = Union[str, Mode, Callable[..., Union[Mode, None]]]


def normalize_mode(mode: ModeArg) -> Mode | str | Callable:
    """Return a Mode, the string "auto", or the policy callable; reject anything else."""
    # A class is callable too, but `mode=Mode` (or any class) is a mistake, not a policy.
    if isinstance(mode, Mode) or (callable(mode) and not isinstance(mode, type)):
        return mode
    if isinstance(mode, str):
        if mode == "auto":
            return "auto"
        try:
            return Mode(mode.lower())
        except ValueError:
            pass
    choices = ", ".join(repr(m.value) for m in Mode)
    raise ModeError(
        f"mode={mode!r} is not a mode: pass 'auto', one of {choices}, a convbn_fx.Mode, "
        "or a callable (BlockInfo) -> Mode | None."
    )
