"""Models that do not trace whole: what stays a call, and how its blocks are rewritten.

A submodule the tracer cannot see through (data-dependent Python, hooks, checkpointing) is
kept as a call of its parent's trace and rewritten on its own as a *part*: an instance of its
own class whose forward runs the rewritten graph. The untraced Python around it reads its
attributes, properties and methods, so those must all still be there.
"""

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint

import convbn_fx
from convbn_fx import Mode
from convbn_fx.tools.testing import (assert_close_to_float64, finetune_state, randomize_bn,
                               saved_tensor_bytes)


class Attention(nn.Module):
    """Traceable, with state the parent reads: an attribute, a property and a method."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.resolution = 8

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def set_resolution(self, r: int) -> None:
        self.resolution = r

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Parent(nn.Module):
    """Does not trace (branches on a tensor), and reads its child's attributes."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.attn = Attention()

    def forward(self, x):
        x = self.stem_bn(self.stem(x))
        assert isinstance(self.attn, Attention) and self.attn.out_channels == 4
        self.attn.set_resolution(x.shape[-1])
        y = self.attn(x) * (self.attn.resolution / 8)
        return y if y.sum() > 0 else -y


def _model(cls=Parent, dtype=torch.float32):
    torch.manual_seed(0)
    return finetune_state(randomize_bn(cls())).to(dtype)


def test_untraced_parent_reads_the_rewritten_childs_attributes():
    model = _model()
    keys = list(model.state_dict())
    tuned = convbn_fx.tune_mode(model)
    assert type(tuned) is Parent and tuned is not model
    assert isinstance(tuned.attn, Attention) and isinstance(tuned.attn, convbn_fx.TunedPart)
    assert type(model.attn) is Attention  # the input is not modified
    assert list(tuned.state_dict()) == keys
    assert tuned.attn.conv is model.attn.conv  # parameters and modules are shared
    infos = {(i.conv, i.bn): i.lowering for i in convbn_fx.describe(tuned)}
    assert infos == {("attn.conv", "attn.bn"): Mode.TUNE}  # the stem sits in untraced code
    x = torch.randn(2, 3, 8, 8)
    assert_close_to_float64(model, tuned, (x,))
    model64 = _model(dtype=torch.float64)
    assert_close_to_float64(model64, convbn_fx.tune_mode(model64), (x.double(),), floor=1e-12,
                            reference=model64)


def test_part_follows_state_and_copies():
    model = _model(dtype=torch.float64)
    tuned = convbn_fx.tune_mode(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    tuned.train()
    assert [i.lowering for i in convbn_fx.describe(tuned)] == [Mode.TRAIN]
    torch.testing.assert_close(tuned(x), model(x), rtol=1e-9, atol=1e-9)
    tuned.eval().requires_grad_(False)
    assert [i.lowering for i in convbn_fx.describe(tuned)] == [Mode.DEPLOY]
    with torch.no_grad():
        torch.testing.assert_close(tuned(x), model(x), rtol=1e-9, atol=1e-9)
    copied = copy.deepcopy(tuned)
    assert isinstance(copied.attn, Attention)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), model(x), rtol=1e-9, atol=1e-9)
    halved = copy.deepcopy(tuned).to(torch.float32)
    assert halved(x.float()).dtype == torch.float32
    assert convbn_fx.tune_mode(tuned) is tuned  # idempotent


def test_part_pickles_as_its_class():
    """A part's class is made at run time; torch.save/pickle carry it as Attention + state."""
    model = _model()
    tuned = convbn_fx.tune_mode(model)
    x = torch.randn(2, 3, 8, 8)
    tuned(x)  # the failed trace of Parent left a Proxy in attn.resolution; a call resets it
    loaded = pickle.loads(pickle.dumps(tuned))
    assert isinstance(loaded.attn, Attention) and isinstance(loaded.attn, convbn_fx.TunedPart)
    assert loaded.attn.out_channels == 4 and loaded.attn.resolution == 8
    torch.testing.assert_close(loaded(x), tuned(x), rtol=0, atol=0)
    loaded.attn.bn.train()
    assert [i.lowering for i in convbn_fx.describe(loaded)] == [Mode.TRAIN]
    assert [i.lowering for i in convbn_fx.describe(tuned)] == [Mode.TUNE]


class Gated(nn.Module):
    """Data-dependent: torch.fx cannot trace it, but its parent can trace around it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.mean() > 0 else -y


class Beside(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Gated(),
                                  nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.body(x)


def test_untraceable_child_becomes_a_call_and_blocks_beside_it_fold():
    model = _model(Beside)
    tuned = convbn_fx.tune_mode(model)
    assert isinstance(tuned, convbn_fx.TunedGraphModule)
    lowerings = {i.bn: i.lowering for i in convbn_fx.describe(tuned)}
    # The gate's own block is not folded: its Python runs as written around it.
    assert lowerings == {"body.1": Mode.TUNE, "body.4": Mode.TUNE}
    assert_close_to_float64(model, tuned, (torch.randn(2, 3, 9, 9),))


def test_densenet_memory_efficient_folds_its_stem():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = finetune_state(randomize_bn(torchvision.models.densenet121(
        weights=None, memory_efficient=True)))
    tuned = convbn_fx.tune_mode(model)
    infos = convbn_fx.describe(tuned)
    assert ("features.conv0", "features.norm0", Mode.TUNE) in \
        [(i.conv, i.bn, i.lowering) for i in infos]
    # Its dense layers checkpoint their bottleneck: kept as calls, checkpointing kept.
    layer = tuned.get_submodule("features.denseblock1.denselayer1")
    assert type(layer) is type(model.get_submodule("features.denseblock1.denselayer1"))
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    assert_close_to_float64(model, tuned, (x,), grads=False)


def test_untraceable_model_without_bn_comes_back_unchanged():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None).eval()
    assert convbn_fx.tune_mode(model) is model
    assert convbn_fx.describe(model) == []


def test_module_with_hooks_is_a_call_so_its_hooks_run():
    """A forward hook on a traced-through module would be skipped by a traced graph."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.block(x))

    model = _model(Net)
    calls = []
    model.block.register_forward_hook(lambda m, i, o: calls.append(1) or o * 2)
    tuned = convbn_fx.tune_mode(model)
    assert [i.lowering for i in convbn_fx.describe(tuned)] == [Mode.TUNE]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(tuned(x), model(x))
    assert len(calls) == 2


class Checkpointed(nn.Module):
    """Calls torch.utils.checkpoint on a block: tracing through would drop checkpointing."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def test_checkpointed_forward_keeps_checkpointing_and_folds_inside():
    model = _model(Checkpointed)
    tuned = convbn_fx.tune_mode(model)
    # checkpoint(self.block, x) stays one call in the graph; the block is rewritten as a part.
    assert "torch.utils.checkpoint.checkpoint(block" in tuned.code
    assert isinstance(tuned.block, convbn_fx.TunedPart)
    assert [i.lowering for i in convbn_fx.describe(tuned)] == [Mode.TUNE, Mode.TUNE]
    x = torch.randn(2, 3, 16, 16)
    assert_close_to_float64(model, tuned, (x,))
    saved = {name: saved_tensor_bytes(lambda m=m: m(x).sum())
             for name, m in (("plain", model), ("tuned", tuned))}
    assert saved["tuned"] <= saved["plain"], saved


def test_hook_registered_after_the_rewrite_runs():
    """A traced-through module that gains a hook becomes a call (a part, in place)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = finetune_state(randomize_bn(torchvision.models.resnet18(weights=None,
                                                                    num_classes=10)))
    tuned = convbn_fx.tune_mode(model)
    x = torch.randn(2, 3, 32, 32)
    calls = []
    handle = tuned.layer1.register_forward_hook(lambda m, i, o: calls.append(1) or o * 2)
    torch.testing.assert_close(tuned(x), model(x))
    assert len(calls) == 2 and isinstance(tuned.layer1, convbn_fx.TunedPart)
    infos = convbn_fx.describe(tuned)
    assert len(infos) == 20 and all(i.lowering is Mode.TUNE for i in infos)
    handle.remove()
    torch.testing.assert_close(tuned(x), model(x))
    assert len(calls) == 2
