"""Module hooks and module surgery around the rewrite: run, or refused in one sentence.

`tune_mode` returns a new module, and its graph reads the tensors of the modules whose forward
the tracer went through (inlined) without calling them. So hooks on the input's root, and hooks
or wrappers put on an inlined module after the rewrite, would silently not run; they are
refused with a ConvBNError naming the order that works. Hooks on inlined modules registered
before the rewrite are traced into the graph, and hooks on the result run as on any module.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import convbn_fx
from tiny_resnet import Untraced, build


def _zero(module, args, output):
    return output * 0


def _input() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7),
                       dtype=torch.float64)


def test_hook_on_the_input_root_is_refused_and_runs_on_the_result():
    model = build()
    model.register_forward_hook(_zero)
    with pytest.raises(convbn_fx.ConvBNError, match="call tune_mode first and add them"):
        convbn_fx.tune_mode(model)
    tuned = convbn_fx.tune_mode(build())
    tuned.register_forward_hook(_zero)
    assert not tuned(_input()).any()


def test_hook_on_an_inlined_module_before_the_rewrite_is_traced_in():
    model = build()
    model.layer2.register_forward_hook(lambda m, a, out: out * 2)
    tuned = convbn_fx.tune_mode(copy.deepcopy(model))
    x = _input()
    torch.testing.assert_close(tuned(x), model(x), rtol=1e-9, atol=1e-12)


def test_hook_changed_on_an_inlined_module_after_the_rewrite_is_refused_until_undone():
    tuned = convbn_fx.tune_mode(build())
    x = _input()
    before = tuned(x)
    handle = tuned.layer1[1].register_forward_hook(_zero)
    with pytest.raises(convbn_fx.ConvBNError,
                       match=r"^layer1\.1 had its hooks changed after tune_mode.*before tune_mode"):
        tuned(x)
    with pytest.raises(convbn_fx.ConvBNError):
        convbn_fx.describe(tuned)  # every entry point, not only the first call
    handle.remove()
    torch.testing.assert_close(tuned(x), before, rtol=0, atol=0)


def test_inlined_module_replaced_after_the_rewrite_is_refused():
    tuned = convbn_fx.tune_mode(build())
    tuned.layer1[0] = nn.Identity()
    with pytest.raises(convbn_fx.ConvBNError, match=r"^layer1\.0 was replaced by a Identity"):
        tuned(_input())


def test_hook_on_a_part_is_refused_and_runs_when_added_to_the_result():
    model = build(Untraced)
    model.net.register_forward_hook(_zero)
    with pytest.raises(convbn_fx.ConvBNError, match=r"^net has hooks"):
        convbn_fx.tune_mode(model)
    tuned = convbn_fx.tune_mode(build(Untraced))
    assert isinstance(tuned.net, convbn_fx.TunedGraphModule)
    tuned.net.register_forward_hook(_zero)
    assert not tuned(_input()).any()
