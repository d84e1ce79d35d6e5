"""The lowering registry, forced modes and per-block policies.

Every test that registers a lowering restores the original afterwards (the `restore` fixture),
so the rest of the suite sees the stock registry.
"""

import logging

import pytest
import torch
import torch.nn as nn

import convbn_fx
from convbn_fx import Mode
from convbn_fx.passes import eval as eval_pass
from convbn_fx.passes import registry
from convbn_fx.tools.testing import assert_close_to_float64, finetune_state, frozen_state, randomize_bn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 4, 1)
        self.b3 = nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.b3(self.c3(x))


BNS = ["b1", "b2", "b3"]


def _net(state=finetune_state):
    torch.manual_seed(0)
    return state(randomize_bn(Net()))


def _x():
    return torch.randn(2, 3, 12, 12)


def _lowerings(model):
    return {i.bn: i.lowering for i in convbn_fx.describe(model)}


def _ops(model):
    return {str(n.target) for n in model.graph.nodes if n.op == "call_function"}


@pytest.fixture
def restore():
    saved = convbn_fx.get_lowerings()
    yield
    for mode, fn in saved.items():
        convbn_fx.register_lowering(mode)(fn)
    for mode in set(registry._LOWERINGS) - set(saved):
        del registry._LOWERINGS[mode]
    assert convbn_fx.get_lowerings() == saved


# -- the registry -----------------------------------------------------------------------------


def test_stock_registry_has_every_mode():
    assert set(convbn_fx.get_lowerings()) == set(Mode)


def test_get_lowerings_returns_a_copy():
    table = convbn_fx.get_lowerings()
    table[Mode.TUNE] = table[Mode.EVAL]
    del table[Mode.DEPLOY]
    fresh = convbn_fx.get_lowerings()
    assert fresh[Mode.TUNE] is not fresh[Mode.EVAL] and Mode.DEPLOY in fresh
    assert set(_lowerings(convbn_fx.tune_mode(_net())).values()) == {Mode.TUNE}


def _marked_eval(calls):
    """A lowering that runs EVAL and counts, at run time, how often it ran."""

    def mark(x):
        calls.append(1)
        return x

    def lower(graph, block):
        out = eval_pass.lower_eval(graph, block)
        return graph.call_function(mark, (out,))

    return lower


@pytest.mark.parametrize("key", [Mode.TUNE, "tune"], ids=["Mode", "value"])
def test_register_replaces(restore, key):
    calls = []
    fn = _marked_eval(calls)
    assert convbn_fx.register_lowering(key)(fn) is fn
    assert convbn_fx.get_lowerings()[Mode.TUNE] is fn
    model = _net()
    tuned = convbn_fx.tune_mode(model)
    assert_close_to_float64(model, tuned, [_x()])
    assert len(calls) >= 3 and len(calls) % 3 == 0
    assert "conv_bn_tune" not in " ".join(_ops(tuned))


def test_reregistered_lowering_reaches_a_rewritten_model(restore):
    model = _net()
    tuned = convbn_fx.tune_mode(model)
    x = _x()
    tuned(x)
    assert any("conv_bn_tune" in op for op in _ops(tuned))
    calls = []
    convbn_fx.register_lowering(Mode.TUNE)(_marked_eval(calls))
    assert_close_to_float64(model, tuned, [x])  # the next call relowers: registry version
    assert calls and not any("conv_bn_tune" in op for op in _ops(tuned))
    assert set(_lowerings(tuned).values()) == {Mode.TUNE}


def test_missing_lowering_then_added(restore, monkeypatch):
    original = registry._LOWERINGS[Mode.EVAL]
    monkeypatch.delitem(registry._LOWERINGS, Mode.EVAL)
    with pytest.raises(convbn_fx.LoweringError, match="no lowering is registered for eval; "
                                                      "register one with"):
        registry.get_lowering(Mode.EVAL)
    with pytest.raises(convbn_fx.LoweringError, match="register_lowering"):
        convbn_fx.tune_mode(_net(), mode="eval")
    convbn_fx.register_lowering(Mode.EVAL)(original)  # adds it back
    model = _net()
    tuned = convbn_fx.tune_mode(model, mode="eval")
    assert set(_lowerings(tuned).values()) == {Mode.EVAL}
    assert_close_to_float64(model, tuned, [_x()])


@pytest.mark.parametrize("bad", ["fold", "auto", 3, None], ids=str)
def test_register_unknown_mode(bad):
    before = registry.registry_version()
    with pytest.raises(convbn_fx.ModeError, match="cannot register a lowering for .*: use one of"):
        convbn_fx.register_lowering(bad)
    assert registry.registry_version() == before


@pytest.mark.parametrize("bad", ["fold", "", 3, 2.5], ids=repr)
def test_unknown_mode_argument(bad):
    with pytest.raises(convbn_fx.ModeError, match="is not a mode: pass 'auto'"):
        convbn_fx.tune_mode(_net(), mode=bad)


# -- forced modes -----------------------------------------------------------------------------


@pytest.mark.parametrize("state", [finetune_state, frozen_state], ids=["finetune", "frozen"])
@pytest.mark.parametrize("mode", [Mode.EVAL, "eval", "EVAL", Mode.TUNE, "tune", Mode.TRAIN],
                         ids=str)
def test_forced_mode(state, mode):
    model = _net(state)
    tuned = convbn_fx.tune_mode(model, mode=mode)
    assert set(_lowerings(tuned).values()) == {Mode(str(mode).lower())}
    assert_close_to_float64(model, tuned, [_x()])


def test_forced_deploy_when_frozen():
    model = _net(frozen_state)
    tuned = convbn_fx.tune_mode(model, mode="deploy")
    assert set(_lowerings(tuned).values()) == {Mode.DEPLOY}
    assert_close_to_float64(model, tuned, [_x()])


@pytest.mark.parametrize("mode", [Mode.TUNE, Mode.DEPLOY, Mode.EVAL, "tune"], ids=str)
def test_forcing_a_folding_mode_on_training_bn_raises(mode):
    model = _net(frozen_state)
    model.b2.train()
    with pytest.raises(convbn_fx.ModeError, match=r"BN b2 normalises with batch statistics; "
                                                  r"call \.eval\(\) on it first"):
        convbn_fx.tune_mode(model, mode=mode)


def test_forcing_train_on_training_bn_is_fine():
    model = _net()
    model.train()
    tuned = convbn_fx.tune_mode(model, mode=Mode.TRAIN)
    assert set(_lowerings(tuned).values()) == {Mode.TRAIN}
    assert_close_to_float64(model, tuned, [_x()])


def test_forcing_deploy_with_trainable_params_raises():
    model = _net(frozen_state)
    model.c3.weight.requires_grad_(True)
    with pytest.raises(convbn_fx.ModeError, match=r"DEPLOY folds b3 .*requires_grad_\(False\)"):
        convbn_fx.tune_mode(model, mode=Mode.DEPLOY)


def test_forced_mode_that_becomes_wrong_falls_back_to_auto(caplog):
    model = _net(frozen_state)
    tuned = convbn_fx.tune_mode(model, mode="deploy")
    tuned(_x())
    model.c1.requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="convbn_fx"):
        assert _lowerings(tuned) == {"b1": Mode.TUNE, "b2": Mode.DEPLOY, "b3": Mode.DEPLOY}
    assert any("b1" in r.getMessage() for r in caplog.records)
    assert_close_to_float64(model, tuned, [_x()])


def test_set_mode_to_a_wrong_mode_raises():
    tuned = convbn_fx.tune_mode(_net())
    with pytest.raises(convbn_fx.ModeError, match="DEPLOY folds b1"):
        convbn_fx.tune_mode(tuned, mode="deploy")
    with pytest.raises(convbn_fx.ModeError, match="DEPLOY folds b1"):
        convbn_fx.tune_mode(tuned, mode="deploy", inplace=True)


# -- policies ---------------------------------------------------------------------------------


def test_policy_per_block():
    seen = []

    def policy(info):
        seen.append(info)
        return {"b1": Mode.EVAL, "b2": "tune"}.get(info.bn)  # b3: None, left as is

    model = _net()
    tuned = convbn_fx.tune_mode(model, mode=policy)
    assert _lowerings(tuned) == {"b1": Mode.EVAL, "b2": Mode.TUNE, "b3": None}
    assert all(isinstance(i, convbn_fx.BlockInfo) and i.lowering is Mode.TUNE for i in seen)
    assert {i.bn for i in seen} == set(BNS)
    assert_close_to_float64(model, tuned, [_x()])
    # the policy is asked again when state changes: b3 stays unrewritten, in batch-stat mode
    model.train()
    assert _lowerings(tuned) == {"b1": Mode.TRAIN, "b2": Mode.TRAIN, "b3": None}
    assert_close_to_float64(model, tuned, [_x()])


def test_policy_sees_deploy_when_frozen():
    seen = {}
    model = _net(frozen_state)
    tuned = convbn_fx.tune_mode(model, mode=lambda info: seen.setdefault(info.bn, info.lowering))
    assert seen == {b: Mode.DEPLOY for b in BNS}
    assert set(_lowerings(tuned).values()) == {Mode.DEPLOY}


@pytest.mark.parametrize("bad", ["fold", 7], ids=repr)
def test_policy_returning_garbage_raises(bad):
    with pytest.raises(convbn_fx.ModeError, match="the mode policy returned .* for block b1"):
        convbn_fx.tune_mode(_net(), mode=lambda info: bad)


def test_policy_forcing_tune_on_training_bn_raises():
    model = _net()
    model.b3.train()
    with pytest.raises(convbn_fx.ModeError, match="BN b3 normalises with batch statistics"):
        convbn_fx.tune_mode(model, mode=lambda info: Mode.TUNE)
