"""Bugs the random-model fuzzer (test_fuzz.py) found, each reduced to a tiny named test.

A test here that is marked xfail(strict=True) is a known bug not yet fixed: when the fix lands,
the strict xfail fails, and the marker must go. (All found so far are fixed.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import convbn_fx
from convbn_fx import Mode
from convbn_fx.tools.testing import (assert_close_to_float64, finetune_state, frozen_state,
                               randomize_bn)


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return self.bn(self.conv(x))


def test_deploy_second_call_multi_element_weight():
    """fuzz seed 9: the Deploy cache was a weakref.WeakKeyDictionary keyed by tensors, whose
    lookup compares keys with `==` (elementwise), so every second Deploy call raised
    'Boolean value of Tensor with more than one value is ambiguous'."""
    model = frozen_state(randomize_bn(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    tuned = convbn_fx.tune_mode(model)
    assert [i.lowering for i in convbn_fx.describe(tuned)] == [Mode.DEPLOY]
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        assert_close_to_float64(model, tuned, [x])


STALE_DEPLOY = ("BatchNorm's training-mode forward updates running_mean/var in place without "
                "bumping their version counter, so frozen_fold's stamp does not see the change "
                "and Deploy keeps weights folded with the old statistics")


def test_deploy_after_bn_recalibration_on_tuned():
    """fuzz seeds 16 and 156: frozen model (Deploy) → train() to re-estimate BN statistics →
    eval() again. The second eval call silently reused weights folded before the update."""
    model = frozen_state(randomize_bn(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    tuned = convbn_fx.tune_mode(model)
    x = torch.randn(2, 3, 8, 8)
    tuned(x)                      # Deploy folds and caches
    tuned.train()
    tuned(x * 3 + 1)              # BN re-estimates its running statistics
    tuned.eval()
    assert [i.lowering for i in convbn_fx.describe(tuned)] == [Mode.DEPLOY]
    assert_close_to_float64(model, tuned, [x])


def test_deploy_after_original_model_updates_bn_stats():
    """The rewritten model shares buffers with its input, so running the input model in train
    mode between two calls of the (eval) rewritten one must be honoured too."""
    model = frozen_state(randomize_bn(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    tuned = convbn_fx.tune_mode(model)
    x = torch.randn(2, 3, 8, 8)
    tuned(x)
    model.train()
    model(x * 3 + 1)
    model.eval()
    assert_close_to_float64(model, tuned, [x])


def test_backward_hook_keeps_block_unfolded():
    """A full backward hook on a conv or BN was silently never called once the block was
    folded (the matcher only looked at forward hooks). Fixed in matching._skip_reason."""
    model = finetune_state(randomize_bn(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    calls = []
    model.conv.register_full_backward_hook(lambda *args: calls.append(1))
    tuned = convbn_fx.tune_mode(model)
    (info,) = convbn_fx.describe(tuned)
    assert info.lowering is None and "backward hooks" in info.reason
    tuned(torch.randn(2, 3, 8, 8, requires_grad=True)).sum().backward()
    assert calls == [1]


def test_mode_class_is_not_a_policy():
    """`mode=convbn_fx.Mode` (the class) was taken for a policy; calling it raised a ValueError
    that tune_mode then reported as 'could not trace'. Fixed in modes.normalize_mode."""
    model = finetune_state(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(convbn_fx.ModeError, match="is not a mode"):
        convbn_fx.tune_mode(model, Mode)


def test_register_lowering_rejects_non_callable():
    """register_lowering(mode)(None) registered None, and every later rewrite failed with
    "'NoneType' object is not callable". Fixed in passes/registry.py."""
    saved = convbn_fx.get_lowerings()
    with pytest.raises(convbn_fx.ConvBNError, match="decorates a function"):
        convbn_fx.register_lowering(Mode.TUNE)(None)
    assert convbn_fx.get_lowerings() == saved


def test_hook_added_after_rewrite():
    model = finetune_state(randomize_bn(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    tuned = convbn_fx.tune_mode(model)
    x = torch.randn(2, 3, 8, 8)
    tuned(x)
    model.bn.register_forward_hook(lambda module, args, out: out * 2)
    torch.testing.assert_close(tuned(x), model(x))


def test_autocast_output_dtype_matches():
    model = finetune_state(randomize_bn(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    tuned = convbn_fx.tune_mode(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tuned(x).dtype == model(x).dtype


class TwoParts(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.b = ConvBN(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.b(self.a(x))


def test_policy_error_is_not_swallowed():
    """The policy fails for a block it does not know; tune_mode returned a model anyway,
    having rewritten the parts alone with names ('bn' instead of 'b.bn') the policy accepted."""
    known = {"a.bn": Mode.TUNE, "bn": None}
    model = finetune_state(randomize_bn(TwoParts()))
    with pytest.raises(KeyError):
        convbn_fx.tune_mode(model, lambda info: known[info.bn])


def test_a_forward_the_trace_gets_wrong_follows_the_training_flag(caplog):
    """A root whose trace takes a wrong branch runs its own forward (verify.py); that forward
    reads the flag of the model as it is now, not as it was when the check failed."""
    class FlagNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x, flip=None):
            x = self.bn(self.conv(x))
            if flip is not None:       # a Proxy when traced: the wrong branch, silently
                x = x.flip(-1)
            return x * 2 if self.training else x

    model = FlagNet().eval()
    tuned = convbn_fx.tune_mode(model)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(tuned(x), model(x))
    assert "computes something else" in caplog.text
    for flag in (True, False, True):
        tuned.train(flag)
        model.train(flag)
        model.bn.eval()
        tuned.bn.eval()
        torch.testing.assert_close(tuned(x), model(x))
