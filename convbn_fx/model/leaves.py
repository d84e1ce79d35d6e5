"""What to keep out of a trace that failed: the helper it stopped in, and flag arguments.

A forward often calls a plain helper that branches on its input's shape or value (HF's
`apply_tf_padding`, timm's `pad_same`): torch.fx cannot trace it, and without help the whole
module is lost. Kept as one call (a leaf function), the helper runs for real at call time on
real tensors, so that is always sound: the trace is retried with the helper a failed trace
was inside when it raised. No list of known helpers per library is needed.

A forward also takes flag arguments (`return_dict=None`, `output_hidden_states=None`) that a
symbolic trace turns into Proxies, on which `if flag:` fails. Traced with their defaults as
constants, they are guarded by torch.fx itself (`_assert_is_none`, `torch._assert`), so a call
with another value cannot run the specialised graph (and the trace check in verify.py sends
such a call to the module's own forward).
"""

from __future__ import annotations

import inspect
import os
import types
from typing import Any

import torch
import torch.nn as nn

__all__ = ["failing_helper", "flag_defaults"]

_TORCH = os.path.dirname(torch.__file__) + os.sep
_FX = os.path.join(_TORCH, "fx") + os.sep
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _is_library(code: types.CodeType) -> bool:
    path = os.path.abspath(code.co_filename)
    return path.startswith(_TORCH) or path.startswith(_PACKAGE)


def _is_module_method(frame: types.FrameType) -> bool:
    args = frame.f_code.co_varnames[:frame.f_code.co_argcount]
    return bool(args) and isinstance(frame.f_locals.get(args[0]), nn.Module)


def failing_helper(exc: BaseException):
    """The outermost plain function, called from a module's code, that the trace was inside
    when it raised; None when the failure is in a forward itself (or nothing can be wrapped).

    Only a function torch.fx can wrap qualifies: one the caller names as a global.
    """
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    # Only what ran under the tracer: the frames after torch.fx's own first one.
    start = next((i for i, f in enumerate(frames)
                  if os.path.abspath(f.f_code.co_filename).startswith(_FX)), len(frames))
    frames = frames[start:]
    for caller, frame in zip(frames, frames[1:]):
        code = frame.f_code
        if _is_library(code) or _is_library(caller.f_code) or _is_module_method(frame):
            continue
        fn = caller.f_globals.get(code.co_name)
        if isinstance(fn, types.FunctionType) and fn.__code__ is code:
            return fn
    return None


def flag_defaults(module: nn.Module) -> dict[str, Any]:
    """The forward's arguments after the first whose default is None or a bool, with it."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    flags = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is None or isinstance(p.default, bool):
            flags[p.name] = p.default
    return flags
