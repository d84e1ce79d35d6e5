"""The core pass (issue 2): every conv kind x BN kind on module graphs, against float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
import torch.nn as nn

import convbn_fx
from convbn_fx import Mode
from convbn_fx.tools.testing import (assert_close_to_float64, compare_to_float64, finetune_state,
                               randomize_bn)

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BNS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class ConvBN(nn.Module):
    """conv → bn → relu → conv → bn, with the BN called positionally or by keyword."""

    def __init__(self, dims, bn_cls, bias, affine, keyword, **conv_kwargs):
        super().__init__()
        self.conv1 = CONVS[dims](3, 6, 3, bias=bias, **conv_kwargs)
        self.bn1 = bn_cls(6, affine=affine)
        self.conv2 = CONVS[dims](6, 4, 1, stride=1, bias=bias)
        self.bn2 = bn_cls(4, affine=affine)
        self.keyword = keyword

    def forward(self, x):
        y = self.conv1(input=x) if self.keyword else self.conv1(x)
        y = self.bn1(input=y) if self.keyword else self.bn1(y)
        y = torch.relu(y)
        return self.bn2(self.conv2(y))


def _input(dims, batch=2, size=7):
    return torch.randn(batch, 3, *([size] * dims))


def _check_then_step(model, tuned, x, lr=0.1):
    """Float64 check, one SGD step on independent copies, then the check again."""
    assert_close_to_float64(model, tuned, (x,))
    ref64 = copy.deepcopy(model).double()
    plain = copy.deepcopy(model)
    tuned_copy = copy.deepcopy(tuned)
    for m, inp in ((ref64, x.double()), (plain, x), (tuned_copy, x)):
        m.zero_grad()
        gen = torch.Generator().manual_seed(7)
        out = m(inp)
        (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum().backward()
        torch.optim.SGD(m.parameters(), lr=lr).step()
    assert_close_to_float64(plain, tuned_copy, (x,), reference=ref64)


def _counts(model):
    counts = {}
    for info in convbn_fx.describe(model):
        key = str(info.lowering) if info.lowering else "skipped"
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("keyword", [False, True], ids=["positional", "keyword"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("bn_kind", ["BatchNormNd", "SyncBatchNorm"])
@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_conv_bn_matrix(dims, bn_kind, bias, affine, keyword):
    torch.manual_seed(dims)
    bn_cls = BNS[dims] if bn_kind == "BatchNormNd" else nn.SyncBatchNorm
    model = finetune_state(randomize_bn(ConvBN(dims, bn_cls, bias, affine, keyword)))
    tuned = convbn_fx.tune_mode(torch.fx.symbolic_trace(model))
    infos = convbn_fx.describe(tuned)
    want_mode = Mode.TUNE if affine or bias else Mode.TUNE  # conv weight always trains
    assert [i.lowering for i in infos] == [want_mode, want_mode]
    assert "conv_bn_tune" in tuned.code and "self.bn1(" not in tuned.code
    _check_then_step(model, tuned, _input(dims))


@pytest.mark.parametrize("padding,padding_mode,kernel", [
    ("same", "zeros", 3), ("same", "zeros", 4), ("valid", "zeros", 3), ("same", "reflect", 4),
    (1, "reflect", 3), (2, "replicate", 3), (1, "circular", 3), ((1, 2), "zeros", (3, 5)),
], ids=["same-odd", "same-even", "valid", "same-even-reflect", "reflect", "replicate",
        "circular", "asymmetric-kernel"])
def test_padding(padding, padding_mode, kernel):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, kernel, padding=padding, padding_mode=padding_mode,
                                    dilation=2 if padding == "same" else 1),
                          nn.BatchNorm2d(5))
    finetune_state(randomize_bn(model))
    tuned = convbn_fx.tune_mode(model)
    assert _counts(tuned) == {"tune": 1}
    _check_then_step(model, tuned, torch.randn(2, 3, 11, 12))


def test_stride_dilation_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2),
                          nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, groups=8, bias=False), nn.BatchNorm2d(8))
    finetune_state(randomize_bn(model))
    tuned = convbn_fx.tune_mode(model)
    assert _counts(tuned) == {"tune": 2}
    _check_then_step(model, tuned, torch.randn(2, 4, 13, 13))


# torchvision models and the number of conv→BN blocks each has (all folded when fine-tuning).
TORCHVISION = {
    "resnet18": (20, 64), "resnet50": (53, 64), "mobilenet_v2": (52, 64),
    "mobilenet_v3_small": (34, 64), "efficientnet_b0": (49, 64), "regnet_y_400mf": (53, 64),
    "vgg11_bn": (8, 32), "googlenet": (57, 64), "densenet121": (59, 64),
}


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    blocks, size = TORCHVISION[name]
    # googlenet's own init (std 0.01) shrinks activations until float32 gradients are noise.
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    finetune_state(randomize_bn(model))
    if name == "vgg11_bn":
        model.classifier.eval()  # dropout; vgg's 7x7 classifier also wants eval to be stable
    tuned = convbn_fx.tune_mode(torch.fx.symbolic_trace(model))
    assert _counts(tuned) == {"tune": blocks}
    assert_close_to_float64(model, tuned, (torch.randn(2, 3, size, size),))


class Shared(nn.Module):
    """One conv used twice, one BN used after two convs, a conv output with two users."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.other = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.used_twice = nn.Conv2d(4, 4, 1)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.bn(self.conv(x))           # block 1
        b = self.bn2(self.conv(a))          # block 2: conv reused
        c = self.bn(self.other(b))          # block 3: bn reused
        d = self.used_twice(c)
        return self.bn3(d) + d              # must not fold: conv output has two users


def test_reuse_is_per_call_site():
    torch.manual_seed(0)
    model = finetune_state(randomize_bn(Shared()))
    tuned = convbn_fx.tune_mode(model)
    infos = convbn_fx.describe(tuned)
    assert [(i.conv, i.bn, i.lowering) for i in infos] == [
        ("conv", "bn", Mode.TUNE), ("conv", "bn2", Mode.TUNE), ("other", "bn", Mode.TUNE),
        ("used_twice", "bn3", None)]
    assert "also used by" in infos[3].reason
    x = torch.randn(2, 4, 6, 6)
    devs = {d.name: d for d in compare_to_float64(model, tuned, (x,))}
    # The reused BN's gamma gradient is the sum of two contributions that nearly cancel here
    # (it is ~1e-7 while the float32 model's own error is ~3e-7). Tune computes it as
    # <dL/dW', W> summed over the conv's fan-in K, whose rounding bound is ~sqrt(K) times that
    # of Eval's sum over x_hat; only that tensor gets the sqrt(K) = 6 allowance.
    gamma = devs.pop("grad bn.weight")
    assert gamma.error <= 6 * gamma.bound, gamma
    assert all(d.ok for d in devs.values()), [d for d in devs.values() if not d.ok]


class StdConv(nn.Conv2d):
    """Weight standardisation in forward (timm's StdConv2d): folding into W first is wrong."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class FusedReLUBN(nn.BatchNorm2d):
    def forward(self, x):
        return torch.relu(super().forward(x))


class UntraceableConv(nn.Conv2d):
    """A forward torch.fx cannot trace: kept as one call, so its weight cannot be proven."""

    def forward(self, x):
        return super().forward(x if x.sum() != 0 else x + 1)


@pytest.mark.parametrize("subclass", ["conv", "bn"])
def test_subclass_forward_is_traced_and_folded(subclass):
    """StdConv's standardised weight, FusedReLUBN's `super().forward` then relu: both fold."""
    torch.manual_seed(0)
    conv = StdConv(3, 4, 3) if subclass == "conv" else nn.Conv2d(3, 4, 3)
    bn = FusedReLUBN(4) if subclass == "bn" else nn.BatchNorm2d(4)
    model = finetune_state(randomize_bn(nn.Sequential(conv, bn)))
    tuned = convbn_fx.tune_mode(model)
    [info] = convbn_fx.describe(tuned)
    assert info.lowering is Mode.TUNE, info
    assert_close_to_float64(model, tuned, (torch.randn(2, 3, 8, 8),))
    if subclass == "bn":  # BN's own input check still runs on the folded output
        with pytest.raises(ValueError, match="expected 4D input"):
            tuned(torch.randn(3, 8, 8))


@pytest.mark.parametrize("case", ["other-user", "no-running-stats", "channels",
                                  "untraceable-conv-subclass", "forward-hook",
                                  "bn1d-after-conv2d"])
def test_must_not_fold(case):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    runnable = True
    if case == "no-running-stats":
        bn = nn.BatchNorm2d(4, track_running_stats=False)
    elif case == "channels":
        bn, runnable = nn.BatchNorm2d(5), False
    elif case == "untraceable-conv-subclass":
        conv = UntraceableConv(3, 4, 3)
    elif case == "forward-hook":
        conv.register_forward_hook(lambda m, i, o: o * 2)
    elif case == "bn1d-after-conv2d":
        bn, runnable = nn.BatchNorm1d(4), False

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv, bn

        def forward(self, x):
            y = self.conv(x)
            out = self.bn(y)
            return out + y if case == "other-user" else out

    model = finetune_state(randomize_bn(Net()))
    tuned = convbn_fx.tune_mode(model)
    [info] = convbn_fx.describe(tuned)
    assert info.lowering is None and info.reason, info
    assert "self.bn(" in tuned.code
    if runnable:
        assert_close_to_float64(model, tuned, (torch.randn(2, 3, 8, 8),))


def test_declare_safe_folds_subclass():
    class LoggingConv(nn.Conv2d):  # untraceable, so only declare_safe can fold it
        def forward(self, x):
            if x.sum() == 0:
                print("all zeros")
            return super().forward(x)

    model = finetune_state(randomize_bn(nn.Sequential(LoggingConv(3, 4, 3), nn.BatchNorm2d(4))))
    assert convbn_fx.describe(model)[0].lowering is None
    convbn_fx.declare_safe(LoggingConv)
    tuned = convbn_fx.tune_mode(model)
    assert convbn_fx.describe(tuned)[0].lowering is Mode.TUNE
    assert_close_to_float64(model, tuned, (torch.randn(2, 3, 8, 8),))


def test_training_bn_stays_train():
    torch.manual_seed(0)
    model = randomize_bn(ConvBN(2, nn.BatchNorm2d, True, True, False)).train()
    tuned = convbn_fx.tune_mode(model)
    assert _counts(tuned) == {"train": 2}
    assert_close_to_float64(model, tuned, (_input(2),))


@pytest.fixture
def traced():
    torch.manual_seed(0)
    model = finetune_state(randomize_bn(ConvBN(2, nn.BatchNorm2d, True, True, False)))
    return model, torch.fx.symbolic_trace(model)


def test_input_untouched_and_shared(traced):
    model, gm = traced
    code = gm.code
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = convbn_fx.tune_mode(gm)
    assert gm.code == code and type(gm) is not type(tuned)
    assert tuned.state_dict().keys() == gm.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Shared, not copied: an optimizer built on the rewritten model trains the original.
    assert tuned.conv1.weight is model.conv1.weight
    assert tuned.bn1.running_var is model.bn1.running_var
    tuned(_input(2)).sum().backward()
    torch.optim.SGD(tuned.parameters(), lr=1.0).step()
    assert not torch.equal(model.conv1.weight, before["conv1.weight"])


def test_idempotent(traced):
    _, gm = traced
    tuned = convbn_fx.tune_mode(gm)
    code = tuned.code
    assert convbn_fx.tune_mode(tuned) is tuned
    assert tuned.code == code
    again = convbn_fx.tune_mode(tuned, "eval")
    assert again is not tuned and tuned.code == code and "batch_norm" in again.code


def test_inplace_rewrites_the_given_graph_module(traced):
    model, gm = traced
    out = convbn_fx.tune_mode(gm, inplace=True)
    assert out is gm and "conv_bn_tune" in gm.code
    assert_close_to_float64(model, gm, (_input(2),))


def test_deepcopy_and_state_dict_round_trip(traced, tmp_path):
    model, gm = traced
    tuned = convbn_fx.tune_mode(gm)
    clone = copy.deepcopy(tuned)
    assert clone.conv1.weight is not tuned.conv1.weight
    assert [i.lowering for i in convbn_fx.describe(clone)] == [Mode.TUNE, Mode.TUNE]
    x = _input(2)
    torch.testing.assert_close(clone(x), tuned(x))
    torch.save(tuned.state_dict(), tmp_path / "sd.pt")
    fresh = convbn_fx.tune_mode(finetune_state(ConvBN(2, nn.BatchNorm2d, True, True, False)))
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    torch.testing.assert_close(fresh(x), tuned(x))
    as_double = copy.deepcopy(tuned).to(torch.float64)
    torch.testing.assert_close(as_double(x.double()).float(), tuned(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("given", ["module", "symbolic_trace"])
def test_whole_model_torch_save_round_trip(traced, tmp_path, given):
    """The whole object, as training scripts checkpoint it (tests/test_pickle.py has more)."""
    model, gm = traced
    tuned = convbn_fx.tune_mode(model if given == "module" else gm)
    torch.save(tuned, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert isinstance(loaded, convbn_fx.TunedGraphModule) and loaded.code == tuned.code
    x = _input(2)
    torch.testing.assert_close(loaded(x), tuned(x), rtol=0, atol=0)
    loaded.bn2.train()  # the loaded model follows state: that block runs as Train now
    assert [i.lowering for i in convbn_fx.describe(loaded)] == [Mode.TUNE, Mode.TRAIN]
    model.bn2.train()
    assert_close_to_float64(model, loaded, (x,))


def test_readable_code(traced):
    _, gm = traced
    code = convbn_fx.tune_mode(gm).code
    # One call per folded block, naming the tensors it folds, no BN call left.
    for expected in ("bn1_tune = convbn_fx_kernels_blocks_conv_bn_tune(x, conv1_weight, "
                     "conv1_bias, bn1_running_mean, bn1_running_var, bn1_weight, bn1_bias, "
                     "eps = 1e-05, stride = [1, 1]",):
        assert expected in code, code
    assert "self.bn1(" not in code and "batch_norm" not in code


def test_not_a_module():
    with pytest.raises(convbn_fx.ConvBNError, match="expects a torch.nn.Module"):
        convbn_fx.tune_mode(lambda x: x)
    with pytest.raises(convbn_fx.ModeError, match="is not a mode"):
        convbn_fx.tune_mode(nn.Conv2d(1, 1, 1), mode="fast")
