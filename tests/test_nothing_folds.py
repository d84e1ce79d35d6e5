"""One warning when tune_mode folds nothing (issue 19): silent zero benefit is a bug to a user.

A user who forgot `bn.eval()` gets every block as Train, which saves nothing; a model whose
pairs all have a reason not to fold saves nothing either. Each says so once, at rewrite time,
naming the fix; a model without blocks, a forced mode, a dry run of `describe` and the
relowerings that follow state changes stay quiet. The CLI shows the counts itself.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import convbn_fx
from convbn_fx.tools import cli
from convbn_fx.tools.testing import finetune_state
from tiny_resnet import TinyResNet


class Reused(nn.Module):
    """The conv output feeds BN and the residual: the block cannot fold."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.reused, self.net = Reused(), nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x):
        return self.net(self.reused(x))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("convbn_fx")]


def test_bn_in_training_mode_is_one_warning_naming_the_fix(caplog):
    model = TinyResNet().train()
    with caplog.at_level(logging.WARNING, logger="convbn_fx"):
        tuned = convbn_fx.tune_mode(model)
        x = torch.randn(2, 3, 16, 16)
        tuned(x)
        tuned.eval()
        tuned(x)
        tuned.train()  # relowered twice: still the one warning of the rewrite
        tuned(x)
    [message] = _warnings(caplog)
    assert "folded none of the 8 conv→BN blocks of TinyResNet" in message
    assert "training mode" in message and ".eval()" in message
    assert "convbn_fx.tools.testing.finetune_state(model)" in message
    assert "isinstance(m, nn.BatchNorm2d): m.eval()" in message and "\n" not in message


def test_pairs_that_cannot_fold_are_one_warning_naming_describe(caplog):
    with caplog.at_level(logging.WARNING, logger="convbn_fx"):
        convbn_fx.tune_mode(Reused().eval())
    [message] = _warnings(caplog)
    assert "could fold none of the 1 conv→BN block of Reused" in message
    assert "convbn_fx.describe(model)" in message


def test_training_bn_beside_unfoldable_pairs_names_both_fixes(caplog):
    with caplog.at_level(logging.WARNING, logger="convbn_fx"):
        convbn_fx.tune_mode(Mixed().train())
    [message] = _warnings(caplog)
    assert "1 of them have BN in training mode" in message
    assert ".eval()" in message and "convbn_fx.describe(model)" in message


@pytest.mark.parametrize("case", ["no blocks", "fine-tuning", "forced train", "describe",
                                  "frozen"])
def test_quiet_when_the_rewrite_does_what_was_asked(caplog, case):
    with caplog.at_level(logging.WARNING, logger="convbn_fx"):
        if case == "no blocks":
            convbn_fx.tune_mode(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
        elif case == "fine-tuning":
            convbn_fx.tune_mode(finetune_state(TinyResNet()))
        elif case == "forced train":
            convbn_fx.tune_mode(TinyResNet().train(), "train")
        elif case == "describe":
            assert len(convbn_fx.describe(TinyResNet().train())) == 8
        else:
            convbn_fx.tune_mode(TinyResNet().eval().requires_grad_(False))
    assert _warnings(caplog) == []


def test_the_cli_report_shows_it_in_its_own_words(capsys):
    assert cli.main(["report", "cli_models:tiny", "--state", "train"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "2 blocks, 0 folded" in out
