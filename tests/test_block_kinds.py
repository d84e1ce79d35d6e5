"""Every block kind users have (issue 4), against float64: FrozenBatchNorm2d, grouped
ConvTranspose1d/2d/3d, Linear→BatchNorm1d (rank 2 folds, rank 3 must not), conv/BN subclasses
whose forward differs, declared-safe subclasses and declared leaf modules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

import convbn_fx
from convbn_fx import Mode
from convbn_fx.kernels.fold import scale_weight
from convbn_fx.tools.testing import (assert_close_to_float64, finetune_state, frozen_state,
                               randomize_bn, saved_tensor_bytes)

STATES = {"tune": finetune_state, "deploy": frozen_state}


class Pair(nn.Module):
    """producer → norm, optionally twice in a row with nothing in between."""

    def __init__(self, first, norm, second=None, norm2=None):
        super().__init__()
        self.conv, self.bn, self.conv2, self.bn2 = first, norm, second, norm2

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if self.conv2 is None else self.bn2(self.conv2(y))


def _lowerings(model):
    return [i.lowering for i in convbn_fx.describe(model)]


def _prepare(model, state, seed=0):
    return STATES[state](randomize_bn(model, seed=seed))


# -- FrozenBatchNorm2d -------------------------------------------------------------------------

@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_frozen_bn_against_float64(state, bias):
    torch.manual_seed(0)
    model = _prepare(Pair(nn.Conv2d(3, 6, 3, bias=bias), FrozenBatchNorm2d(6),
                          nn.Conv2d(6, 4, 1), FrozenBatchNorm2d(4)), state)
    tuned = convbn_fx.tune_mode(model)
    assert _lowerings(tuned) == [Mode(state)] * 2
    assert convbn_fx.describe(tuned)[0].kind == "Conv2d+FrozenBatchNorm2d"
    assert_close_to_float64(model, tuned, (torch.randn(2, 3, 16, 16),))


@pytest.mark.parametrize("change", ["copy_", "load_state_dict"])
@pytest.mark.parametrize("state", list(STATES))
def test_frozen_bn_buffer_changes_are_honoured(state, change):
    """Checkpoint loading writes FrozenBN's buffers after the rewrite; Deploy must refold."""
    torch.manual_seed(0)
    model = _prepare(Pair(nn.Conv2d(3, 6, 3), FrozenBatchNorm2d(6)), state)
    tuned = convbn_fx.tune_mode(model)
    x = torch.randn(2, 3, 12, 12)
    before = tuned(x).detach()
    if change == "copy_":
        randomize_bn(model, seed=7)
    else:
        other = randomize_bn(copy.deepcopy(model), seed=7)
        tuned.load_state_dict(other.state_dict())
    assert not torch.allclose(model(x), before), "the change must change the output"
    assert _lowerings(tuned) == [Mode(state)]
    assert_close_to_float64(model, tuned, (x,))


# -- ConvTranspose, grouped, with output_padding and dilation ----------------------------------

TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BNS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# torch.nn.utils.fusion.fuse_conv_bn_weights(..., transpose=True) scales the weight's dim 1
# taken whole, i.e. C_out/groups values broadcast against C_out factors: for groups > 1 it
# raises or, when the shapes happen to broadcast, scales the wrong channels (pytorch #180995).
@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_grouped_transposed_conv_against_float64(dims, groups, state):
    torch.manual_seed(dims * 10 + groups)
    conv = TRANSPOSED[dims](6, 4 * groups, 3, stride=2, padding=1,
                            output_padding=1, dilation=2 if dims < 3 else 1, groups=groups)
    model = _prepare(Pair(conv, BNS[dims](conv.out_channels)), state)
    tuned = convbn_fx.tune_mode(model)
    assert _lowerings(tuned) == [Mode(state)]
    size = {1: 9, 2: 6, 3: 4}[dims]
    assert_close_to_float64(model, tuned, (torch.randn(2, 6, *[size] * dims),))


def test_scale_weight_scales_each_output_channel_of_a_grouped_transposed_conv():
    """Scaling W by s must equal scaling the conv's output channels by s."""
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False).double()
    s = torch.rand(6, dtype=torch.float64) + 0.5
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    folded = F.conv_transpose2d(x, scale_weight(conv.weight, s, transposed=True, groups=2),
                                groups=2)
    torch.testing.assert_close(folded, conv(x) * s.reshape(1, -1, 1, 1))
    # Scaling dim 1 "per output channel" as if groups were 1 is wrong here:
    naive = conv.weight * s[:3].reshape(1, -1, 1, 1)
    assert not torch.allclose(F.conv_transpose2d(x, naive, groups=2), folded)


# -- Linear → BatchNorm1d ----------------------------------------------------------------------

def _linear_pair(bias=True, affine=True, twice=False):
    return Pair(nn.Linear(5, 6, bias=bias), nn.BatchNorm1d(6, affine=affine),
                *((nn.Linear(6, 4), nn.BatchNorm1d(4)) if twice else ()))


@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_bn_rank2_folds(bias, affine, state):
    torch.manual_seed(0)
    model = _prepare(_linear_pair(bias, affine, twice=True), state)
    tuned = convbn_fx.tune_mode(model)
    infos = convbn_fx.describe(tuned)
    assert [i.kind for i in infos] == ["Linear+BatchNorm1d"] * 2
    assert [i.lowering for i in infos] == [Mode(state)] * 2
    assert "self.bn(" not in tuned.code and f"linear_bn_{state}" in tuned.code
    assert_close_to_float64(model, tuned, (torch.randn(8, 5),))


@pytest.mark.parametrize("state", list(STATES))
def test_linear_bn_rank3_is_not_folded(state):
    """On (N, L, in) input BatchNorm1d normalises dim 1 (L == 6 here), not the features."""
    torch.manual_seed(0)
    model = _prepare(_linear_pair(), state)
    tuned = convbn_fx.tune_mode(model)
    x = torch.randn(3, 6, 5, requires_grad=True)
    expected, got = model(x), tuned(x)
    assert torch.equal(got, expected)  # the unfolded path runs the very same ops
    grads = [torch.autograd.grad(out.sum(), x)[0] for out in (expected, got)]
    assert torch.equal(grads[0], grads[1])
    # What a fold would compute instead (the features normalised) is far off:
    bn = model.bn
    s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    wrong = model.conv(x) * s + (bn.bias - bn.running_mean * s)
    assert not torch.allclose(wrong, expected, atol=1e-3)
    # Rank 2 on the same rewritten module still folds, and matches.
    assert_close_to_float64(model, tuned, (torch.randn(4, 5),))


class FlattenedPair(nn.Module):
    """LeViT's MLPLayerWithBN: `bn(linear(x).flatten(0, 1)).reshape_as(linear(x))`."""

    def __init__(self, flatten=(0, 1)):
        super().__init__()
        self.linear, self.bn, self.flatten = nn.Linear(5, 6), nn.BatchNorm1d(6), flatten

    def forward(self, x):
        h = self.linear(x)
        return self.bn(h.flatten(*self.flatten)).reshape_as(h)


@pytest.mark.parametrize("state", list(STATES))
def test_linear_bn_through_a_flatten_folds(state):
    """Merging the leading dims of a Linear output commutes with the fold: (N, L, F) folds
    where BatchNorm1d sees (N·L, F); the Linear itself is no longer computed."""
    model = _prepare(FlattenedPair(), state)
    tuned = convbn_fx.tune_mode(model)
    assert [i.lowering for i in convbn_fx.describe(tuned)] == [Mode(state)]
    assert "self.linear(" not in tuned.code and "self.bn(" not in tuned.code
    assert_close_to_float64(model, tuned, (torch.randn(3, 4, 5),))


@pytest.mark.parametrize("state", list(STATES))
def test_linear_bn_through_a_flatten_runs_unfolded_where_bn_sees_other_dims(state):
    """flatten(0, 1) of a rank-4 output is (N·A, B, F): BatchNorm1d normalises B there."""
    model = _prepare(FlattenedPair(), state)
    tuned = convbn_fx.tune_mode(model)
    x = torch.randn(2, 3, 6, 5)
    assert torch.equal(tuned(x), model(x))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):  # (N·F,) from rank 2
        model(torch.randn(4, 5))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        tuned(torch.randn(4, 5))


def test_linear_bn_through_a_flatten_used_elsewhere_is_skipped():
    class Twice(FlattenedPair):
        def forward(self, x):
            flat = self.linear(x).flatten(0, 1)
            return self.bn(flat) + flat

    tuned = convbn_fx.tune_mode(finetune_state(randomize_bn(Twice())))
    reason = convbn_fx.describe(tuned)[0].reason
    assert reason is not None and "flattened Linear output is also used" in reason


def test_linear_bn_bad_rank_raises_like_the_module():
    model = frozen_state(randomize_bn(_linear_pair()))
    tuned = convbn_fx.tune_mode(model)
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        model(x)
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        tuned(x)


def test_linear_bn_tune_saves_no_output_sized_tensor():
    """Tune keeps x, W and s for backward, never the Linear's output (which Eval keeps)."""
    torch.manual_seed(0)
    model = finetune_state(randomize_bn(Pair(nn.Linear(16, 256), nn.BatchNorm1d(256))))
    x = torch.randn(64, 16)
    tuned, evaluated = convbn_fx.tune_mode(model), convbn_fx.tune_mode(model, "eval")
    tune_bytes = saved_tensor_bytes(lambda: tuned(x).square().sum())
    eval_bytes = saved_tensor_bytes(lambda: evaluated(x).square().sum())
    output_bytes = 64 * 256 * 4
    # Tune: x, W, bn weight/scale vectors, and the output for square()'s backward.
    assert tune_bytes <= x.nelement() * 4 + 256 * 16 * 4 + 6 * 256 * 4 + output_bytes
    # Eval also keeps the Linear's output; Tune keeps W instead, a parameter alive anyway.
    weight_bytes = model.conv.weight.nelement() * 4
    assert tune_bytes - weight_bytes + output_bytes <= eval_bytes


@pytest.mark.parametrize("case", ["bn-train", "output-reused", "bn2d-after-linear"])
def test_linear_bn_must_not_fold(case):
    torch.manual_seed(0)

    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Linear(5, 6), nn.BatchNorm1d(6)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    class WrongBN(nn.Module):  # never runs: it only has to be matched and refused
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Linear(5, 6), nn.BatchNorm2d(6)

        def forward(self, x):
            return self.bn(self.conv(x))

    model = {"bn-train": _linear_pair, "output-reused": Reused, "bn2d-after-linear": WrongBN}[case]()
    model = randomize_bn(model)
    if case != "bn-train":
        model.eval()
    tuned = convbn_fx.tune_mode(model)
    (info,) = convbn_fx.describe(tuned)
    assert not info.folded
    assert (info.lowering is Mode.TRAIN) if case == "bn-train" else info.reason
    if case != "bn2d-after-linear":
        x = torch.randn(4, 5)
        assert torch.equal(tuned(x), model(x))


# -- Subclasses and leaf modules ---------------------------------------------------------------

class StdConv2d(nn.Conv2d):
    """timm-style weight standardisation: the weight is renormalised in forward."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dSame(nn.Conv2d):
    """TF 'same' padding computed from the input size in forward."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class BatchNormAct2d(nn.BatchNorm2d):
    """BN with a fused activation, as in timm."""

    def forward(self, x):
        return F.relu(super().forward(x))


SUBCLASSES = {
    "StdConv2d": lambda: Pair(StdConv2d(3, 6, 3), nn.BatchNorm2d(6)),
    "Conv2dSame": lambda: Pair(Conv2dSame(3, 6, 3, stride=2), nn.BatchNorm2d(6)),
    "BatchNormAct2d": lambda: Pair(nn.Conv2d(3, 6, 3), BatchNormAct2d(6)),
}


@pytest.mark.parametrize("name", ["StdConv2d", "BatchNormAct2d"])
def test_subclass_with_own_forward_is_traced_through_and_folded(name):
    """What the forward computes is matched: the standardised weight, the BN then ReLU."""
    torch.manual_seed(0)
    model = finetune_state(randomize_bn(SUBCLASSES[name]()))
    tuned = convbn_fx.tune_mode(model)
    (info,) = convbn_fx.describe(tuned)
    kinds = {"StdConv2d": "StdConv2d+BatchNorm2d", "BatchNormAct2d": "Conv2d+BatchNormAct2d"}
    assert info.lowering is Mode.TUNE and info.kind == kinds[name]
    assert_close_to_float64(model, tuned, (torch.randn(2, 3, 9, 9),))
    model64 = copy.deepcopy(model).double()
    assert_close_to_float64(model64, convbn_fx.tune_mode(model64),
                            (torch.randn(2, 3, 9, 9, dtype=torch.float64),), floor=1e-12)


def test_untraceable_subclass_is_kept_whole_and_skipped():
    """A forward that does not trace (shape arithmetic on the input) stays one call."""
    torch.manual_seed(0)
    model = finetune_state(randomize_bn(SUBCLASSES["Conv2dSame"]()))
    tuned = convbn_fx.tune_mode(model)
    (info,) = convbn_fx.describe(tuned)
    assert info.lowering is None and "overrides forward" in info.reason
    assert "does not trace" in info.reason and "declare_safe" in info.reason
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(tuned(x), model(x))


def test_declared_safe_subclass_folds():
    calls = []

    @convbn_fx.declare_safe
    class CountingConv(nn.Conv2d):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    torch.manual_seed(0)
    model = finetune_state(randomize_bn(Pair(CountingConv(3, 6, 3), nn.BatchNorm2d(6))))
    tuned = convbn_fx.tune_mode(model)
    assert _lowerings(tuned) == [Mode.TUNE]
    assert_close_to_float64(model, tuned, (torch.randn(2, 3, 9, 9),))


@pytest.mark.parametrize("fn,bad", [("declare_safe", nn.ReLU), ("declare_leaf", int),
                                    ("declare_leaf_function", 3),
                                    ("declare_leaf_function", nn.ReLU),
                                    ("declare_frozen_norm", "FrozenBN")])
def test_declare_rejects_bad_input(fn, bad):
    with pytest.raises(convbn_fx.ConvBNError, match=fn):
        getattr(convbn_fx, fn)(bad)


def test_declare_frozen_norm_rejects_a_bad_epilogue():
    with pytest.raises(convbn_fx.ConvBNError, match="epilogue is a tuple"):
        convbn_fx.declare_frozen_norm(epilogue="act")(nn.Module)


def test_declared_leaf_lets_the_rest_trace_whole():
    class Gate(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def forward(self, x):
            return x if x.mean() > 0 else -x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.gate = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), Gate()
            self.conv2, self.bn2 = nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn2(self.conv2(self.gate(self.bn(self.conv(x)))))

    torch.manual_seed(0)
    model = finetune_state(randomize_bn(Net()))
    # The gate does not trace: it is kept as one call by itself, so the rest traces whole.
    for declared in (False, True):
        if declared:
            convbn_fx.declare_leaf(Gate)
        tuned = convbn_fx.tune_mode(model)
        assert isinstance(tuned, convbn_fx.TunedGraphModule)
        assert "self.gate(" in tuned.code
        assert _lowerings(tuned) == [Mode.TUNE, Mode.TUNE]
        assert_close_to_float64(model, tuned, (torch.randn(2, 3, 8, 8),))


def test_conv_bn_conv_bn_back_to_back():
    """A block whose input is the previous block's BN output (no op in between)."""
    torch.manual_seed(0)
    model = finetune_state(randomize_bn(Pair(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6),
                                             nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4))))
    tuned = convbn_fx.tune_mode(model)
    assert _lowerings(tuned) == [Mode.TUNE, Mode.TUNE]
    assert convbn_fx.tune_mode(tuned) is tuned  # idempotent
    assert_close_to_float64(model, tuned, (torch.randn(2, 3, 10, 10),))
