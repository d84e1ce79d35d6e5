"""Activation checkpointing with tune_mode, applied before or after the rewrite.

Three ways users checkpoint: `torch.utils.checkpoint.checkpoint` inside a forward,
`checkpoint_wrapper` modules (by hand, or `apply_activation_checkpointing` per block), and the
hook-based `torch.distributed._composable.checkpoint`. For each: the rewritten model computes
what the checkpointed float64 original computes (outputs and every gradient, ~1e-9), folds
every block whose pair lies inside one region, and saves no more for backward than
checkpointing alone. Checkpointing added after the rewrite must never be silently ignored.

Checkpointing survives the rewrite because the tracer never goes through it:
`checkpoint(submodule, x)` stays one graph call (the submodule rewritten on its own), a
`CheckpointWrapper` or a module with checkpoint hooks is kept as a call, and one added after
the rewrite makes the result trace again on its next call.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convbn_fx
from convbn_fx import Mode
from convbn_fx.tools.testing import saved_tensor_bytes
from float64 import assert_algebra
from tiny_resnet import BLOCKS, BasicBlock, CheckpointedLayers, build

if not torch.distributed.is_available():  # checkpoint_wrapper lives in torch.distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from torch.distributed._composable import checkpoint as composable_checkpoint  # noqa: E402
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (  # noqa: E402
    apply_activation_checkpointing, checkpoint_wrapper)


def _wrap_layers(model: nn.Module) -> nn.Module:
    model.layer1 = checkpoint_wrapper(model.layer1)
    model.layer2 = checkpoint_wrapper(model.layer2)
    return model


def _apply_ac(model: nn.Module) -> nn.Module:
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: isinstance(m, BasicBlock))
    return model


def _composable(model: nn.Module) -> nn.Module:
    for block in [m for m in model.modules() if isinstance(m, BasicBlock)]:
        composable_checkpoint(block)
    return model


APPLY = {"checkpoint_wrapper-layers": _wrap_layers, "apply_ac-blocks": _apply_ac,
         "composable-blocks": _composable}

# case -> (checkpointed plain model, the same rewritten)
CASES = {
    "utils.checkpoint-in-forward": (
        lambda: build(CheckpointedLayers),
        lambda: convbn_fx.tune_mode(build(CheckpointedLayers))),
    "utils.checkpoint-in-forward-reentrant": (
        lambda: build(CheckpointedLayers, use_reentrant=True),
        lambda: convbn_fx.tune_mode(build(CheckpointedLayers, use_reentrant=True))),
    **{f"{name}-before": (lambda f=f: f(build()), lambda f=f: convbn_fx.tune_mode(f(build())))
       for name, f in APPLY.items()},
    **{f"{name}-after": (lambda f=f: f(build()), lambda f=f: f(convbn_fx.tune_mode(build())))
       for name, f in APPLY.items()},
}

def _input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7),
                       dtype=torch.float64)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointed_model_matches_float64_and_folds_every_block(case):
    make_plain, make_tuned = CASES[case]
    plain, tuned = make_plain(), make_tuned()
    x = _input()
    assert_algebra(plain, tuned, tuned, x)
    assert [i.lowering for i in convbn_fx.describe(tuned)] == [Mode.TUNE] * BLOCKS


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointed_model_saves_no_more_than_checkpointing_alone(case):
    make_plain, make_tuned = CASES[case]
    plain, tuned = make_plain(), make_tuned()
    x = _input()
    checkpointed = saved_tensor_bytes(lambda: plain(x).square().sum())
    # Guard against a test that cannot fail: without checkpointing, far more is kept.
    assert 2 * checkpointed < saved_tensor_bytes(lambda: build()(x).square().sum())
    assert saved_tensor_bytes(lambda: tuned(x).square().sum()) <= checkpointed


@pytest.mark.parametrize("name", list(APPLY))
def test_checkpointing_added_after_rewrite_is_never_silently_dropped(name):
    """The result traces again with the wrapped (or hooked) modules kept as calls."""
    plain, tuned = APPLY[name](build()), APPLY[name](convbn_fx.tune_mode(build()))
    x = _input()
    kept = saved_tensor_bytes(lambda: tuned(x).square().sum())
    assert kept <= saved_tensor_bytes(lambda: plain(x).square().sum())
    assert [i.lowering for i in convbn_fx.describe(tuned)] == [Mode.TUNE] * BLOCKS


class ConvThenCheckpointedBlock(nn.Module):
    """A conv checkpointed without its BN (the pair crosses the region), then a whole block."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        y = F.relu(self.bn(torch.utils.checkpoint.checkpoint(self.conv, x, use_reentrant=False)))
        return torch.utils.checkpoint.checkpoint(self.block, y, use_reentrant=False)


def test_pair_across_a_checkpoint_boundary_is_not_folded():
    plain = build(ConvThenCheckpointedBlock)
    tuned = convbn_fx.tune_mode(copy.deepcopy(plain))
    x = _input()
    assert_algebra(plain, tuned, tuned, x)
    folded = [(i.bn, i.lowering) for i in convbn_fx.describe(tuned) if i.lowering]
    assert folded == [("block.1", Mode.TUNE)]
    assert saved_tensor_bytes(lambda: tuned(x).square().sum()) \
        <= saved_tensor_bytes(lambda: plain(x).square().sum())
