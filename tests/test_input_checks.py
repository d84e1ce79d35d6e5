"""What the unrewritten model rejects, the rewritten one rejects, with the same exception.

And what it accepts, the rewritten one accepts and computes alike, even where folding is not
what the block computes: a conv on an unbatched `(C, ...)` input, whose output BatchNorm2d
rejects, BatchNorm1d normalises along its length, and a frozen norm broadcasts to a batch of
one. Checked for every conv rank, every lowering, and inside a whole model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import convbn_fx
from convbn_fx import Mode
from convbn_fx.tools.testing import finetune_state, frozen_state, randomize_bn

CONVS = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d),
         3: (nn.Conv3d, nn.BatchNorm3d)}


def _outcome(fn, x):
    """(exception type, message) or the output."""
    try:
        with torch.no_grad():
            return fn(x)
    except Exception as exc:  # what the model raises is what is compared
        return type(exc), str(exc)


def _same(plain, tuned, x):
    want, got = _outcome(plain, x), _outcome(tuned, x)
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), got
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert got == want


def _block(dims: int, features: int = 6) -> nn.Module:
    conv, bn = CONVS[dims]
    return randomize_bn(nn.Sequential(conv(3, features, 3), bn(features)))


def _shapes(dims: int) -> dict[str, tuple]:
    spatial = (7,) * dims
    return {"batched": (2, 3) + spatial, "unbatched": (3,) + spatial, "too low": (3,),
            "too high": (1, 2, 3) + spatial, "wrong channels": (2, 4) + spatial}


@pytest.mark.parametrize("mode", ["auto", "tune", "eval", "deploy"])
@pytest.mark.parametrize("dims", [1, 2, 3], ids=lambda d: f"conv{d}d")
@pytest.mark.parametrize("shape", ["batched", "unbatched", "too low", "too high",
                                   "wrong channels"])
def test_input_rejected_or_accepted_alike(dims, shape, mode):
    model = _block(dims)
    (frozen_state if mode == "deploy" else finetune_state)(model)
    tuned = convbn_fx.tune_mode(model, mode)
    x = torch.randn(_shapes(dims)[shape])
    _same(model, tuned, x)


def test_bn1d_along_the_length_of_an_unbatched_conv1d_output():
    # Conv1d on (C, L) gives (6, L'); BatchNorm1d(6) takes that as 6 samples of L' features
    # and normalises along L' when L' == 6: a fold per conv channel would be wrong here.
    model = finetune_state(_block(1, features=6))
    tuned = convbn_fx.tune_mode(model)
    assert {i.lowering for i in convbn_fx.describe(tuned)} == {Mode.TUNE}
    x = torch.randn(3, 8)  # L' = 6
    assert model(x).shape == (6, 6)
    _same(model, tuned, x)
    _same(model, tuned, torch.randn(3, 10))  # L' = 8 != 6: BatchNorm1d raises


def test_frozen_norm_broadcasts_an_unbatched_input_as_the_original():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), torchvision.ops.FrozenBatchNorm2d(4))
    randomize_bn(model).train()
    tuned = convbn_fx.tune_mode(model)
    assert [i.lowering for i in convbn_fx.describe(tuned)] == [Mode.TUNE]
    x = torch.randn(3, 9, 9)
    assert model(x).shape == (1, 4, 7, 7)
    _same(model, tuned, x)


@pytest.mark.parametrize("mode", ["tune", "deploy"])
def test_linear_bn1d_on_a_sequence_runs_unfolded(mode):
    model = randomize_bn(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)))
    (frozen_state if mode == "deploy" else finetune_state)(model)
    tuned = convbn_fx.tune_mode(model, mode)
    _same(model, tuned, torch.randn(4, 5))
    _same(model, tuned, torch.randn(4, 6, 5))  # BN1d normalises dim 1 (6): runs unfolded
    _same(model, tuned, torch.randn(4, 3, 5))  # dim 1 is 3, not 6: BN raises
    _same(model, tuned, torch.randn(2, 4, 3, 5))  # BatchNorm1d rejects 4-D


def test_whole_model_rejects_an_unbatched_image_like_the_original():
    model = finetune_state(randomize_bn(torchvision.models.resnet18()))
    tuned = convbn_fx.tune_mode(model)
    want = _outcome(model, torch.randn(3, 64, 64))
    assert isinstance(want, tuple) and want[0] is ValueError  # BatchNorm2d: expected 4D input
    assert _outcome(tuned, torch.randn(3, 64, 64)) == want
