"""Tune at Deploy's memory: bytes saved for backward by one fine-tuning step of resnet50.

Eval keeps every conv output for BN's backward; Deploy keeps only what a conv keeps; Tune, which
recomputes `W·s` in backward (`folding.conv_scaled`), must keep no more than Deploy (issue 3:
≤ 1.02× Deploy, ≤ 0.56× Eval at batch 8, 224²). Bytes are deterministic, so they are asserted.
`auto`'s real per-call rule runs here (issue 20): at this size the few blocks that take Eval's
path (layer4's 3x3 and reducing 1x1 convs, 200,704 outputs each) keep their small outputs.
"""

import pytest
import torch
import torchvision

import convbn_fx
from convbn_fx import Mode
from convbn_fx.tools.testing import finetune_state, randomize_bn, saved_tensor_bytes

MiB = 2 ** 20
pytestmark = pytest.mark.per_call


@pytest.fixture(scope="module")
def saved():
    torch.manual_seed(0)
    model = finetune_state(randomize_bn(torchvision.models.resnet50(weights=None)))
    x = torch.randn(8, 3, 224, 224)
    deploy = convbn_fx.deploy_mode(model).train().requires_grad_(True)
    variants = {
        "tune": convbn_fx.tune_mode(model),
        "eval": convbn_fx.tune_mode(model, mode="eval"),
        "deploy": deploy,
    }
    assert {i.lowering for i in convbn_fx.describe(variants["tune"])} == {Mode.TUNE}
    assert {i.lowering for i in convbn_fx.describe(variants["eval"])} == {Mode.EVAL}
    assert not [m for m in deploy.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return {name: saved_tensor_bytes(lambda m=m: m(x).sum()) for name, m in variants.items()}


def test_tune_saves_what_deploy_saves(saved):
    assert saved["tune"] <= 1.02 * saved["deploy"], \
        f"Tune {saved['tune'] / MiB:.1f} MiB vs Deploy {saved['deploy'] / MiB:.1f} MiB"


def test_tune_saves_much_less_than_eval(saved):
    assert saved["tune"] <= 0.56 * saved["eval"], \
        f"Tune {saved['tune'] / MiB:.1f} MiB vs Eval {saved['eval'] / MiB:.1f} MiB"
