"""A rewritten model stays right while its state changes under it.

One sequence of state changes per model; after each one the rewritten model is compared with
the unrewritten model in the same state (float64 standard: outputs and every parameter
gradient) and `describe()` must report the lowering the `auto` rule gives for that state. The
two share parameters and submodules, so a change made through either is seen by both.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models.googlenet import InceptionAux
from torchvision.ops.misc import FrozenBatchNorm2d

import convbn_fx
from convbn_fx import Mode
from convbn_fx.tools.testing import assert_close_to_float64, finetune_state, randomize_bn

T, E, D, U = Mode.TRAIN, Mode.EVAL, Mode.DEPLOY, Mode.TUNE


class ConvNet(nn.Module):
    """Conv kinds, a FrozenBatchNorm2d block and a block that must not fold (output reused)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        # No conv bias before a BN that can train: its true gradient is 0, the computed one
        # pure rounding noise, which no float64 bound can judge.
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.b2 = nn.BatchNorm2d(8, affine=False)
        self.t3 = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=4, bias=False)
        self.b3 = nn.BatchNorm2d(8)
        self.c4 = nn.Conv2d(8, 8, 1)  # frozen BN never trains: the bias folds
        self.b4 = FrozenBatchNorm2d(8)
        self.c5 = nn.Conv2d(8, 8, 3, padding=1)
        self.b5 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.t3(x)))
        x = self.b4(self.c4(x))
        y = self.c5(x)
        return self.b5(y) + y  # c5's output is used twice: not foldable


MODELS = {
    # name: (builder, input shape, the BN to switch alone, number of foldable blocks)
    "convnet": (ConvNet, (2, 3, 16, 16), "b3", 4),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10),
                 (2, 3, 32, 32), "layer2.0.downsample.1", 20),
    "mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=10),
        (2, 3, 32, 32), "features.4.block.1.1", 34),
    "googlenet": (lambda: torchvision.models.googlenet(weights=None, num_classes=10,
                                                        init_weights=True),
                  (2, 3, 64, 64), "inception4a.branch2.1.bn", 57),  # 59 with the aux heads
}


def _quiet(model):
    """No randomness in train mode: dropout off (googlenet's aux heads call F.dropout)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, InceptionAux):
            m.training = False  # only its F.dropout reads this flag; its BNs keep theirs
    return model


def _avg_pools(model):
    """Max-pool routes each gradient to one argmax: where two inputs nearly tie, float32
    rounding picks either, so a gradient jumps by a whole element and no float64 bound can
    judge it. GoogLeNet pools after every stage; average pools keep its gradients smooth."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride,
                                                   child.padding, ceil_mode=child.ceil_mode))
    return model


def _build(name, seed):
    torch.manual_seed(seed)
    model = MODELS[name][0]()
    if name == "googlenet":
        _avg_pools(model)
    return _quiet(randomize_bn(model, seed=seed))


class Stage:
    """Applies one change to the original and the rewritten model, then checks both."""

    def __init__(self, name):
        build, shape, self.alone, self.foldable = MODELS[name]
        self.name = name
        self.orig = _build(name, 0)
        self.tuned = convbn_fx.tune_mode(self.orig)
        self.shape = shape

    def both(self, fn):
        for m in (self.orig, self.tuned):
            fn(m)
            _quiet(m)

    def check(self, stage, default, **overrides):
        expect = {}
        for info in convbn_fx.describe(self.tuned):
            if info.reason is not None:
                expect[info.bn] = None
                continue
            mode = overrides.get(info.bn, default)
            bn = self.tuned.get_submodule(info.bn)
            if mode is T and isinstance(bn, FrozenBatchNorm2d):  # frozen BN never trains
                conv = self.tuned.get_submodule(info.conv)
                mode = U if any(p.requires_grad for p in conv.parameters()) else D
            expect[info.bn] = mode
        got = {i.bn: i.lowering for i in convbn_fx.describe(self.tuned)}
        assert got == expect, f"stage {stage!r}: describe() reports {got}"
        assert sum(m is not None for m in got.values()) >= self.foldable
        x = torch.randn(self.shape)
        try:
            assert_close_to_float64(self.orig, self.tuned, [x])
        except AssertionError as exc:
            raise AssertionError(f"stage {stage!r}: {exc}") from None


def _block_of(tuned, bn):
    return next(i for i in convbn_fx.describe(tuned) if i.bn == bn)


@pytest.mark.parametrize("name", list(MODELS))
def test_state_sequence(name):
    s = Stage(name)
    tuned, orig = s.tuned, s.orig
    alone = s.alone
    alone_conv = _block_of(tuned, alone).conv

    s.both(lambda m: m.train())
    s.check("model.train()", T)

    s.both(finetune_state)
    s.check("fine-tune (BN eval)", U)

    s.both(lambda m: m.eval())
    s.check("model.eval()", U)

    tuned.get_submodule(alone).train()
    s.check(f"{alone}.train() alone", U, **{alone: T})
    tuned.get_submodule(alone).eval()

    s.both(lambda m: m.requires_grad_(False))
    s.check("requires_grad_(False)", D)
    # No folded weights in it, and the keys in the input's order.
    assert list(tuned.state_dict()) == list(orig.state_dict())

    tuned.get_submodule(alone_conv).requires_grad_(True)
    s.check(f"{alone_conv}.requires_grad_(True)", D, **{alone: U})

    other = _build(name, 1)
    tuned.load_state_dict(other.state_dict())
    loaded = other.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in orig.state_dict().items())
    s.check("load_state_dict (refold)", D, **{alone: U})

    deployed = [i for i in convbn_fx.describe(tuned) if i.lowering is D]
    target = tuned.get_submodule(deployed[-1].bn)
    target.running_var.mul_(2)
    if getattr(target, "weight", None) is not None:
        with torch.no_grad():
            target.weight.mul_(-0.5)
    s.check("BN buffer and weight changed in place", D, **{alone: U})

    # an optimizer step on frozen (Deploy) parameters, e.g. with gradients from elsewhere
    opt = torch.optim.SGD(tuned.parameters(), lr=1e-3)
    for p in tuned.parameters():
        p.grad = torch.randn_like(p)
    before = {n: p.clone() for n, p in orig.named_parameters()}
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in orig.named_parameters())
    s.check("SGD step in Deploy", D, **{alone: U})

    # a fine-tuning step: Tune everywhere, the step taken through the rewritten model
    s.both(lambda m: m.requires_grad_(True))
    s.both(finetune_state)
    opt.zero_grad()
    out = tuned(torch.randn(s.shape))
    out = out[0] if isinstance(out, tuple) else out
    (out * torch.randn_like(out)).mean().backward()
    opt.step()
    s.check("SGD step in Tune", U)

    s.both(lambda m: m.train())
    s.check("model.train() again", T)


def test_googlenet_retraces_on_its_training_branch():
    """GoogLeNet's forward returns aux logits only in training: the graph must follow."""
    s = Stage("googlenet")
    finetune_state(s.orig)
    finetune_state(s.tuned)
    assert isinstance(s.tuned(torch.randn(s.shape)), tuple)
    assert len(convbn_fx.describe(s.tuned)) == 59
    s.both(lambda m: m.eval())
    assert isinstance(s.tuned(torch.randn(s.shape)), torch.Tensor)
    assert len(convbn_fx.describe(s.tuned)) == 57  # the aux heads are no longer called
    s.check("eval", U)
    s.both(finetune_state)
    assert isinstance(s.tuned(torch.randn(s.shape)), tuple)
    assert len(convbn_fx.describe(s.tuned)) == 59
    s.check("fine-tune", U)


def test_deepcopy_keeps_following_state():
    s = Stage("convnet")
    finetune_state(s.orig)
    clone = copy.deepcopy(s.tuned)
    ref = copy.deepcopy(s.orig)
    clone.requires_grad_(False).eval()
    ref.requires_grad_(False).eval()
    assert {i.lowering for i in convbn_fx.describe(clone) if i.reason is None} == {D}
    assert {i.lowering for i in convbn_fx.describe(s.tuned) if i.reason is None} == {U}
    assert_close_to_float64(ref, clone, [torch.randn(s.shape)])


@pytest.mark.xfail(strict=True, reason="known limit: `.data` changes skip the version counter "
                                       "that Deploy's fold cache checks")
def test_deploy_sees_changes_through_dot_data():
    s = Stage("convnet")
    s.both(lambda m: m.eval().requires_grad_(False))
    s.tuned(torch.randn(s.shape))
    s.orig.b1.running_var.data.mul_(4)
    s.check("running_var.data.mul_", D)
