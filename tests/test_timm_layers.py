"""timm's conv and norm layers fold as what their forward computes, and follow state changes.

timm writes its blocks with subclasses that override forward: BatchNormAct2d (batch norm,
then drop and act), Conv2dSame (TF padding from the input size), weight-standardised convs,
SyncBatchNormAct, and frozen norms whose forward is arithmetic on buffers. Each pairing is
checked the project's way: float64 algebra (a float64 copy rewritten vs the float64 original,
outputs and every parameter gradient), float32 stability, and a sequence of state changes.
"""

import copy

import pytest
import torch
import torch.nn as nn

timm_layers = pytest.importorskip("timm.layers")
from timm.layers import (BatchNormAct2d, Conv2dSame, ScaledStdConv2d,  # noqa: E402
                         StdConv2d, StdConv2dSame)
from timm.layers.norm_act import convert_sync_batchnorm, freeze_batch_norm_2d  # noqa: E402

import convbn_fx  # noqa: E402
from convbn_fx import Mode  # noqa: E402
from convbn_fx.tools.testing import (assert_close_to_float64, finetune_state, randomize_bn,  # noqa: E402
                               saved_tensor_bytes)

T, D, U = Mode.TRAIN, Mode.DEPLOY, Mode.TUNE


def _net(conv: nn.Module, norm: nn.Module) -> nn.Module:
    return nn.Sequential(conv, norm, nn.Conv2d(6, 4, 1), BatchNormAct2d(4))


COMBOS = {
    "Conv2d+BatchNormAct2d": lambda: _net(nn.Conv2d(3, 6, 3), BatchNormAct2d(6)),
    "Conv2dSame+BatchNormAct2d": lambda: _net(Conv2dSame(3, 6, 3, stride=2), BatchNormAct2d(6)),
    "StdConv2d+BatchNorm2d": lambda: _net(StdConv2d(3, 6, 3), nn.BatchNorm2d(6)),
    "StdConv2dSame+BatchNormAct2d": lambda: _net(StdConv2dSame(3, 6, 3, stride=2),
                                                 BatchNormAct2d(6)),
    "ScaledStdConv2d+BatchNormAct2d": lambda: _net(ScaledStdConv2d(3, 6, 3), BatchNormAct2d(6)),
    "Conv2d+SyncBatchNormAct": lambda: convert_sync_batchnorm(
        _net(nn.Conv2d(3, 6, 3), BatchNormAct2d(6))),
    "Conv2d+FrozenBatchNormAct2d": lambda: freeze_batch_norm_2d(
        _net(nn.Conv2d(3, 6, 3), BatchNormAct2d(6))),
    "Conv2d+FrozenBatchNorm2d": lambda: freeze_batch_norm_2d(
        _net(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))),
}
FROZEN = {"Conv2d+FrozenBatchNormAct2d", "Conv2d+FrozenBatchNorm2d"}


def _model(name: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return finetune_state(randomize_bn(COMBOS[name]())).to(dtype)


def _x(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(2, 3, 11, 11, generator=torch.Generator().manual_seed(3), dtype=dtype)


def _same(model: nn.Module, tuned: nn.Module, x: torch.Tensor) -> None:
    """float64 algebra: outputs and every parameter gradient to 1e-9 of the original's."""
    assert_close_to_float64(model, tuned, (x,), floor=1e-10, reference=model)


@pytest.mark.parametrize("name", list(COMBOS))
def test_folds_what_the_forward_computes(name):
    model = _model(name)
    tuned = convbn_fx.tune_mode(model)
    infos = convbn_fx.describe(tuned)
    assert [i.kind for i in infos][0] == name
    assert [i.lowering for i in infos] == [U, U], infos
    # Only weight standardisation (no running statistics) may still call batch_norm.
    assert not [n for n in tuned.graph.nodes if n.target is torch.nn.functional.batch_norm
                and n.args[1] is not None]
    assert_close_to_float64(model, tuned, (_x(),))  # float32 stability
    model64 = _model(name, torch.float64)
    _same(model64, convbn_fx.tune_mode(model64), _x(torch.float64))


@pytest.mark.parametrize("name", list(COMBOS))
def test_follows_state_changes(name):
    model = _model(name, torch.float64)
    before = list(model.state_dict())
    tuned = convbn_fx.tune_mode(model)
    assert list(tuned.state_dict()) == before
    assert convbn_fx.tune_mode(tuned) is tuned
    x = _x(torch.float64)
    frozen_norm = name in FROZEN
    steps = [
        ("finetune", lambda: None, [U, U]),
        ("train", lambda: model.train(), [U, U] if frozen_norm else [T, T]),
        ("eval", lambda: model.eval(), [U, U]),
        ("frozen", lambda: model.requires_grad_(False), [D, D]),
        ("load_state_dict", lambda: model.load_state_dict(
            randomize_bn(copy.deepcopy(model), seed=5).state_dict()), [D, D]),
        ("unfrozen", lambda: model.requires_grad_(True), [U, U]),
    ]
    for label, change, expected in steps:
        change()
        assert [i.lowering for i in convbn_fx.describe(tuned)] == expected, label
        if label in ("train",):  # batch statistics: outputs only, the stats move every call
            torch.testing.assert_close(tuned(x), model(x), rtol=1e-9, atol=1e-9)
        elif label in ("frozen", "load_state_dict"):
            with torch.no_grad():
                torch.testing.assert_close(tuned(x), model(x), rtol=1e-9, atol=1e-9)
        else:
            _same(model, tuned, x)


def test_deploy_refolds_after_an_optimizer_step_on_a_standardised_weight():
    """Deploy of a computed weight folds per call: a changed weight is never stale."""
    model = _model("StdConv2dSame+BatchNormAct2d", torch.float64)
    tuned = convbn_fx.tune_mode(model)
    model.eval().requires_grad_(False)
    x = _x(torch.float64)
    with torch.no_grad():
        tuned(x)
        model[0].weight.mul_(1.5).add_(0.1)
        assert [i.lowering for i in convbn_fx.describe(tuned)] == [D, D]
        torch.testing.assert_close(tuned(x), model(x), rtol=1e-9, atol=1e-9)


def test_input_untouched_and_copies_work():
    model = _model("Conv2dSame+BatchNormAct2d")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    tuned = convbn_fx.tune_mode(model)
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    copied = copy.deepcopy(tuned)
    x = _x()
    torch.testing.assert_close(copied(x), tuned(x))
    tuned64 = copy.deepcopy(tuned).to(torch.float64)
    assert tuned64(x.double()).dtype == torch.float64


def test_efficientnet_tune_saves_what_deploy_saves():
    """Tune at Deploy's saved bytes on timm's efficientnet_b0 (BatchNormAct2d everywhere)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = finetune_state(randomize_bn(timm.create_model("efficientnet_b0", pretrained=False)))
    x = torch.randn(2, 3, 64, 64)
    deploy = convbn_fx.deploy_mode(model).train().requires_grad_(True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules()
                   if not isinstance(m, BatchNormAct2d))
    variants = {"tune": convbn_fx.tune_mode(model), "deploy": deploy,
                "eval": convbn_fx.tune_mode(model, mode="eval")}
    assert {i.lowering for i in convbn_fx.describe(variants["tune"])} == {U}
    saved = {k: saved_tensor_bytes(lambda m=m: m(x).sum()) for k, m in variants.items()}
    assert saved["tune"] <= 1.02 * saved["deploy"], saved
    # At 64² the saved weights (~20 MiB) dominate; Tune must remove what Deploy removes.
    assert saved["eval"] - saved["tune"] >= 0.9 * (saved["eval"] - saved["deploy"]) > 0, saved


@pytest.mark.parametrize("state", ["finetune", "frozen"])
def test_compile_and_export_of_the_result(state):
    model = _model("Conv2dSame+BatchNormAct2d", torch.float64)
    if state == "frozen":
        model.eval().requires_grad_(False)
    tuned = convbn_fx.tune_mode(model)
    x = _x(torch.float64)
    compiled = torch.compile(tuned, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-9, atol=1e-9)
    exported = torch.export.export(tuned, (x,)).module()
    torch.testing.assert_close(exported(x), model(x), rtol=1e-9, atol=1e-9)
