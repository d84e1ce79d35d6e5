"""Module hooks and module surgery around the rewrite: they run, before or after tune_mode.

A traced graph reads the tensors of the modules the tracer went through without calling them,
so their hooks would silently not run. The tracer therefore keeps a module with hooks as a
call (rewritten on its own, as a part of its own class), a hooked root comes back as a part
whose hooks run, and a module that gains hooks, or is replaced, *after* the rewrite makes the
result trace again on its next call.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import convbn_fx
from convbn_fx import Mode
from tiny_resnet import BLOCKS, Untraced, build


def _zero(module, args, output):
    return output * 0


def _input() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7),
                       dtype=torch.float64)


def _all_tune(model) -> bool:
    infos = convbn_fx.describe(model)
    return len(infos) == BLOCKS and all(i.lowering is Mode.TUNE for i in infos)


def test_hook_on_the_input_root_runs_on_the_result():
    model = build()
    model.register_forward_hook(_zero)
    tuned = convbn_fx.tune_mode(model)
    assert isinstance(tuned, type(model)) and tuned is not model and _all_tune(tuned)
    assert not tuned(_input()).any()
    assert not isinstance(model, convbn_fx.TunedPart)  # the input is not modified


def test_hook_on_an_inlined_module_before_the_rewrite_runs():
    model = build()
    model.layer2.register_forward_hook(lambda m, a, out: out * 2)
    tuned = convbn_fx.tune_mode(copy.deepcopy(model))
    assert _all_tune(tuned)
    x = _input()
    torch.testing.assert_close(tuned(x), model(x), rtol=1e-9, atol=1e-12)


def test_hook_added_after_the_rewrite_runs_and_removing_it_restores():
    model = build()
    tuned = convbn_fx.tune_mode(model)
    x = _input()
    before = tuned(x)
    handle = tuned.layer1[1].register_forward_hook(_zero)
    torch.testing.assert_close(tuned(x), model(x), rtol=1e-9, atol=1e-12)
    assert _all_tune(tuned)
    handle.remove()
    torch.testing.assert_close(tuned(x), before, rtol=1e-9, atol=1e-12)


def test_inlined_module_replaced_after_the_rewrite_is_used():
    model = build()
    tuned = convbn_fx.tune_mode(model)
    tuned.layer1[0] = nn.Identity()  # model.layer1 is the same Sequential: replaced there too
    x = _input()
    torch.testing.assert_close(tuned(x), model(x), rtol=1e-9, atol=1e-12)
    assert len(convbn_fx.describe(tuned)) == BLOCKS - 2


def test_hook_on_a_part_runs_before_and_after_the_rewrite():
    model = build(Untraced)
    model.net.register_forward_hook(_zero)
    tuned = convbn_fx.tune_mode(model)
    assert isinstance(tuned.net, convbn_fx.TunedPart) and _all_tune(tuned)
    assert not tuned(_input()).any()
    tuned = convbn_fx.tune_mode(build(Untraced))
    tuned.net.register_forward_hook(_zero)
    assert not tuned(_input()).any()
