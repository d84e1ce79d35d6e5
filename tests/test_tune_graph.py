"""`tune_graph`, the rewrite as one pass: what it returns, copy vs in place, reuse, guards.

Every entry point (tune_mode's TunedGraphModule, the compile backend, the pre-grad pass,
tune_exported and deploy_mode) calls this one function; these tests pin down its contract on
graphs built directly, including cases that must not fold and a second run that changes
nothing.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import convbn_fx
from convbn_fx import Mode, tune_graph
from convbn_fx.kernels.blocks import conv_bn_tune
from convbn_fx.model.tracer import trace
from convbn_fx.tools.testing import assert_close_to_float64, finetune_state, randomize_bn


def _model():
    return finetune_state(randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
        nn.BatchNorm2d(8))))


def _targets(graph: torch.fx.Graph) -> list:
    return [n.target for n in graph.nodes if n.op in ("call_function", "call_module")]


def test_module_graph_copy_leaves_the_input_alone():
    gm = trace(_model())
    before = _targets(gm.graph)
    result = tune_graph(gm.graph, "auto", gm, inplace=False)
    assert _targets(gm.graph) == before
    assert result.lowerings == [Mode.TUNE, Mode.TUNE] and result.modified
    assert _targets(result.graph).count(conv_bn_tune) == 2
    assert [(i.conv, i.bn, i.lowering) for i in result.infos("net")] == [
        ("net.0", "net.1", Mode.TUNE), ("net.3", "net.4", Mode.TUNE)]


def test_in_place_on_a_graph_module_recompiles_and_is_exact():
    model = _model()
    gm = trace(model)
    result = tune_graph(gm, "auto", gm)
    assert result.graph is gm.graph and result.modified
    assert "conv_bn_tune" in gm.code
    assert_close_to_float64(model, gm, [torch.randn(2, 3, 12, 12)])


def test_second_run_finds_nothing_and_changes_nothing():
    gm = trace(_model())
    tune_graph(gm, "auto", gm)
    code = gm.code
    again = tune_graph(gm, "auto", gm)
    assert (again.blocks, again.modified) == ([], False)
    assert gm.code == code


def test_reuse_returns_the_same_result_until_state_changes():
    model = _model()
    gm = trace(model)
    first = tune_graph(gm.graph, "auto", gm, inplace=False)
    assert tune_graph(gm.graph, "auto", gm, inplace=False, reuse=first) is first
    model[1].train()  # BN back to batch statistics: that block must be TRAIN now
    second = tune_graph(gm.graph, "auto", gm, inplace=False, reuse=first)
    assert second is not first and second.lowerings == [Mode.TRAIN, Mode.TUNE]
    assert second.blocks is first.blocks  # not matched again


def test_guards_add_reasons_and_lowerings_replace_the_registry():
    gm = trace(_model())
    calls = []

    def only_first(block):
        return None if block.conv == "0" else "not the first block"

    def mine(graph, block):
        calls.append(block.bn)
        return block.bn_node  # leave it as is

    result = tune_graph(gm.graph, Mode.TUNE, gm, inplace=False, guards=(only_first,),
                        lowerings={Mode.TUNE: mine})
    assert [b.reason for b in result.blocks] == [None, "not the first block"]
    assert result.lowerings == [Mode.TUNE, None]
    assert calls == ["1"] and not result.modified


def test_functional_graph_has_no_module_state():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.register_buffer("mean", torch.randn(4))
            self.register_buffer("var", torch.rand(4) + 0.5)

        def forward(self, x):
            y = F.conv2d(x, self.w)
            return F.batch_norm(y, self.mean, self.var, training=False)

    model = Functional()
    gm = torch.fx.symbolic_trace(model)
    result = tune_graph(gm)  # no root: a compiled/exported graph's flags decide
    assert result.lowerings == [Mode.TUNE]
    assert_close_to_float64(model, gm, [torch.randn(2, 3, 8, 8)])
    try:
        tune_graph(torch.fx.symbolic_trace(model), Mode.DEPLOY)
    except convbn_fx.ModeError as exc:
        assert "cannot keep up to date" in str(exc)
    else:
        raise AssertionError("DEPLOY must be refused in a graph without module state")


def test_unfoldable_pair_is_reported_not_lowered():
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    gm = trace(finetune_state(Reused()))
    result = tune_graph(gm.graph, "auto", gm, inplace=False)
    assert result.lowerings == [None] and not result.modified
    assert result.blocks[0].reason.startswith("the conv output is also used by")
