"""Argument types of the command line: each turns one option's text into a value, or says
in one sentence what was expected (argparse prints it with the usage line)."""

from __future__ import annotations

import argparse

from .fit import parse_size
from .steps import MODES

__all__ = ["block_count", "positive", "input_shape", "batch_sizes", "memory_size",
           "mode_list"]


def block_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a block count (0 or more), got {text!r}")
    return value


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number, 1 or more, got {text!r}")
    return value


def input_shape(text: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    if len(parts) < 2 or not all(p.isdecimal() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected sizes joined by x, like 8x3x224x224, got "
                                         f"{text!r}")
    return tuple(int(p) for p in parts)


def batch_sizes(text: str) -> list[int]:
    parts = text.split(",")
    if not all(p.strip().isdecimal() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected batch sizes joined by commas, like "
                                         f"4,8,16,32, got {text!r}")
    return [int(p) for p in parts]


def memory_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def mode_list(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",")]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown mode {bad[0]!r}, expected a comma-separated "
                                         f"list of {', '.join(MODES)}")
    return modes
