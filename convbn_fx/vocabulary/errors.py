"""Exceptions raised by convbn_fx.

Every error a user can cause is one of these, with one sentence that names the fix, so that a
mistake never surfaces as a traceback from deep inside torch.fx or ATen.
"""

__all__ = ["ConvBNError", "TraceError", "ModeError", "LoweringError", "exception_summary",
           "BATCH_STATISTICS", "TRAINABLE"]

# ModeError.conflict: why a forced mode does not fit a block's state.
BATCH_STATISTICS = "batch statistics"   # BN normalises with batch statistics (not frozen)
TRAINABLE = "trainable"                 # DEPLOY, while a block parameter requires grad


class ConvBNError(Exception):
    """Base class: bad input to a convbn_fx entry point."""


class TraceError(ConvBNError):
    """The model (or no part of it) could be traced by torch.fx."""


class ModeError(ConvBNError, ValueError):
    """An unknown mode, or a forced mode that is wrong for a block's current state.

    The second kind also says what is wrong in fields, so that a front end can name its own
    options instead of the sentence's Python (the CLI's `--state frozen`): `mode` (the Mode
    asked for), `block` (the BN's name) and `conflict` (BATCH_STATISTICS or TRAINABLE).
    """

    def __init__(self, message: str, *, mode=None, block: str | None = None,
                 conflict: str | None = None):
        super().__init__(message)
        self.mode, self.block, self.conflict = mode, block, conflict


class LoweringError(ConvBNError, KeyError):
    """No lowering is registered for a mode."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


def exception_summary(exc: BaseException) -> str:
    """`Type: first line of the message` (no final period), to quote inside a sentence."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].rstrip('.')}" if lines else type(exc).__name__
