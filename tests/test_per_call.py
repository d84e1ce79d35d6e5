"""auto's Tune chooses per call: Tune where the conv output is large next to the weight, else
Eval (kernels/choice.py). Both paths compute what Eval computes, so a model switches between
them with the input size, without relowering, and stays exact; `mode="tune"` always folds.

Counts and numerics only: float64 algebra (tests/float64.py), which path each block took
(describe()), how often the graph was lowered, and bytes saved for backward.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convbn_fx
from convbn_fx import Mode
from convbn_fx.kernels import choice
from convbn_fx.kernels.blocks import conv_bn_tune
from convbn_fx.tools.testing import finetune_state, randomize_bn, saved_tensor_bytes
from float64 import assert_algebra, outputs_and_grads

pytestmark = pytest.mark.per_call

# 3x3 convs of 16 channels: 2,304 weight elements, Tune's cost 3·2,304 + 2^17 = 137,984 BN
# output elements (choice.py); the conv output has 16·N·H·W.
SMALL, LARGE = (1, 3, 4, 4), (2, 3, 68, 68)     # 256 output elements per block; 147,968


class Net(nn.Module):
    """Two conv→BN blocks and a Linear→BatchNorm1d, every kind of parameter trainable."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc, self.bn3 = nn.Linear(16, 64), nn.BatchNorm1d(64)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.bn3(self.fc(x.mean((2, 3))))


def _model(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return finetune_state(randomize_bn(Net())).to(dtype)


def _input(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _paths(model) -> list:
    return [(i.bn, i.lowering, i.path) for i in convbn_fx.describe(model)]


@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["small", "large"])
def test_each_path_is_exact_in_float64(shape):
    model = _model()
    tuned = convbn_fx.tune_mode(model)
    assert_algebra(model, tuned, tuned, _input(shape))
    path = Mode.EVAL if shape == SMALL else Mode.TUNE
    assert _paths(tuned)[:2] == [("bn1", Mode.TUNE, path), ("bn2", Mode.TUNE, path)]
    assert _paths(tuned)[2] == ("bn3", Mode.TUNE, Mode.EVAL)  # 2·64 outputs < 16·64 weights


def test_switching_sizes_needs_no_relowering_and_stays_exact():
    model = _model()
    tuned = convbn_fx.tune_mode(model)
    code, lowered = tuned.code, tuned.convbn_tuning.result
    for shape in (LARGE, SMALL, LARGE, SMALL):
        assert_algebra(model, tuned, tuned, _input(shape))
        want = Mode.TUNE if shape == LARGE else Mode.EVAL
        assert [p for _, _, p in _paths(tuned)[:2]] == [want, want]
    assert tuned.code == code and tuned.convbn_tuning.result is lowered


def test_gradients_agree_across_the_switch():
    """At one input size, the per-call choice (Eval here) and forced Tune give the same
    gradient for every parameter; at the other, the same (Tune both)."""
    model = _model()
    auto, forced = convbn_fx.tune_mode(model), convbn_fx.tune_mode(model, "tune")
    for shape in (SMALL, LARGE):
        assert_algebra(forced, auto, auto, _input(shape))
    assert all(i.path is None for i in convbn_fx.describe(forced))


def test_forced_tune_folds_every_call():
    model = _model()
    forced = convbn_fx.tune_mode(model, "tune")
    assert "choose" not in forced.code
    x = _input(SMALL).requires_grad_()  # weights much larger than this input's activations
    eval_bytes = saved_tensor_bytes(lambda: model(x).sum())
    auto = convbn_fx.tune_mode(model)
    assert saved_tensor_bytes(lambda: auto(x).sum()) == eval_bytes  # Eval per call: the same
    assert saved_tensor_bytes(lambda: forced(x).sum()) < eval_bytes  # no conv output kept


def test_describe_says_which_path_and_why():
    tuned = convbn_fx.tune_mode(_model())
    assert all(i.path is None and i.path_reason is None for i in convbn_fx.describe(tuned))
    tuned(_input(LARGE))
    info = convbn_fx.describe(tuned)[1]
    assert (info.bn, info.lowering, info.path) == ("bn2", Mode.TUNE, Mode.TUNE)
    assert "147,968 elements" in info.path_reason and "2,304" in info.path_reason
    with torch.no_grad():
        tuned(_input(SMALL))
    info = convbn_fx.describe(tuned)[1]
    assert info.path is Mode.EVAL and "256 elements" in info.path_reason


def test_the_rule_counts_output_against_weight_elements(monkeypatch):
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)  # 2,304 weight elements
    x = torch.randn(1, 16, 12, 12)                       # 2,304 output elements
    assert choice.conv_output_numel(x, conv.weight, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                    1) == conv(x).numel()
    t = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1, output_padding=1, groups=2)
    assert choice.conv_output_numel(x, t.weight, [2, 2], [1, 1], [1, 1], True, [1, 1],
                                    2) == t(x).numel()
    assert choice.conv_output_numel(x, conv.weight, [2, 2], [0, 0], [1, 1], False, [0, 0], 1,
                                    pre_pad=[1, 2, 0, 1]) == \
        F.conv2d(F.pad(x, [1, 2, 0, 1]), conv.weight, stride=2).numel()
    bn = nn.BatchNorm2d(16).eval()
    args = (x, conv.weight, None, bn.running_mean, bn.running_var, bn.weight, bn.bias, 1e-5,
            [1, 1], [1, 1])
    store: dict = {}
    big = 10 ** 9
    for weight_cost, call_cost, keep, grad, tuned in (
            (1.0, 0, big, True, True), (1.01, 0, big, True, False), (1.0, 1, big, True, False),
            (0.0, 2304, big, False, True), (9.0, big, 2304, True, True),   # Eval keeps too much
            (9.0, big, 2304, False, False)):                               # nothing is kept
        monkeypatch.setattr(choice, "WEIGHT_COST", weight_cost)
        monkeypatch.setattr(choice, "CALL_COST", call_cost)
        monkeypatch.setattr(choice, "KEEP_LIMIT", keep)
        with choice.recording(store), torch.set_grad_enabled(grad):
            conv_bn_tune(*args, choose="b")
        assert store["b"] == (tuned, 2304, 2304, grad)


@pytest.mark.parametrize("frozen", ["conv", "bn"])
def test_a_frozen_half_is_exact_on_both_paths(frozen):
    """Tune's backward skips what a frozen conv weight or BN affine does not need."""
    model = _model()
    for name, p in model.named_parameters():
        if name.startswith(frozen):
            p.requires_grad_(False)
    tuned = convbn_fx.tune_mode(model)
    for shape in (SMALL, LARGE):
        x = _input(shape)
        weight = torch.randn(shape[0], 64, dtype=x.dtype)
        want_out, want = outputs_and_grads(model, model, x, weight)
        got_out, got = outputs_and_grads(tuned, tuned, x, weight)
        assert set(got) == set(want) and not any(n.startswith(frozen) for n in got)
        torch.testing.assert_close(got_out, want_out, rtol=1e-9, atol=1e-9)
        for name, g in want.items():
            torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-9 * g.abs().max())


def test_copies_and_pickles_carry_no_recorded_paths():
    tuned = convbn_fx.tune_mode(_model())
    tuned(_input(LARGE))
    assert convbn_fx.describe(tuned)[0].path is Mode.TUNE
    again = copy.deepcopy(tuned)
    assert all(i.path is None for i in convbn_fx.describe(again))
    assert set(tuned.state_dict()) == set(_model().state_dict())


def test_torch_compile_specialises_each_size_and_stays_exact():
    """Under torch.compile the choice is a branch on static shapes: one graph per path."""
    model = _model()
    tuned = convbn_fx.tune_mode(copy.deepcopy(model))
    compiled = torch.compile(tuned, backend="eager")
    for shape in (SMALL, LARGE, SMALL):
        assert_algebra(model, compiled, tuned, _input(shape))
    assert all(i.path is None for i in convbn_fx.describe(tuned))  # nothing recorded there


def _graph_runs(monkeypatch) -> list:
    """Each per-call block's decision, as the kernels record it: empty while a call runs the
    module's own forward rather than the rewritten graph."""
    from convbn_fx.kernels import blocks

    seen: list = []
    real = blocks.record
    monkeypatch.setattr(blocks, "record", lambda name, *a: (seen.append(name), real(name, *a)))
    return seen


def test_a_call_that_folds_nothing_runs_the_forward_itself(monkeypatch):
    """Once a signature ran the graph without folding, it runs the module's forward: the same
    values, none of the graph's per-block dispatch. Sizes, the autograd flag and state are
    part of the signature, and describe() still reports the paths."""
    model = _model()
    tuned = convbn_fx.tune_mode(model)
    seen = _graph_runs(monkeypatch)
    small, large = _input(SMALL), _input(LARGE)
    torch.testing.assert_close(tuned(small), model(small), rtol=0, atol=0)
    assert seen == ["bn1", "bn2", "bn3"]          # the graph ran, every block chose Eval
    seen.clear()
    torch.testing.assert_close(tuned(small), model(small), rtol=0, atol=0)
    assert seen == []                              # the forward itself
    assert [p for _, _, p in _paths(tuned)] == [Mode.EVAL] * 3
    tuned(large)
    assert seen == ["bn1", "bn2", "bn3"] and _paths(tuned)[0][2] is Mode.TUNE
    seen.clear()
    tuned(large)                                   # it folds: the graph, every call
    assert seen == ["bn1", "bn2", "bn3"]
    seen.clear()
    tuned(small)
    assert seen == [] and _paths(tuned)[0][2] is Mode.EVAL
    with torch.no_grad():
        tuned(small)                               # another signature: the graph once
    assert seen == ["bn1", "bn2", "bn3"]
    seen.clear()
    model.bn1.train()                              # new lowerings: the record is dropped
    tuned(small)
    assert seen == ["bn2", "bn3"]                  # bn1 normalises by batch statistics
    seen.clear()
    tuned(small)
    assert seen == []
    assert_algebra(model, tuned, tuned, small)


def test_the_forward_itself_is_not_taken_where_a_block_always_folds():
    class Calls(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    model = _model()
    forced = convbn_fx.tune_mode(model, lambda info: Mode.TUNE if info.bn == "bn2" else None)
    x = _input(SMALL)
    for _ in range(2):
        with Calls() as calls:
            forced(x)
        assert calls.names.count("rsqrt") == 1      # bn2's fold: the graph, on every call
    assert_algebra(model, forced, forced, x)


def test_checkpointing_recomputes_across_the_switch_to_the_forward():
    """Non-reentrant checkpointing recomputes in backward: the first forward ran the graph,
    the recomputation runs the module's forward; it checks they saved the same tensors."""
    model = _model()
    tuned = convbn_fx.tune_mode(model)
    x = _input(SMALL)
    loss = torch.utils.checkpoint.checkpoint(tuned, x, use_reentrant=False).sum()
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-12, atol=1e-12)
