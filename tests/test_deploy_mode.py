"""deploy_mode: BN folded into new conv parameters and removed, equal outputs in eval.

Numerics follow the project's float64 standard (outputs only: the export is for inference),
with randomised BN statistics so a wrong fold cannot hide behind an identity BN.
"""

import logging

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

import convbn_fx
from convbn_fx.model.tracer import trace
from convbn_fx.tools.testing import assert_close_to_float64, randomize_bn

BN_KINDS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, FrozenBatchNorm2d)


class Kinds(nn.Module):
    """Conv kinds × bias × affine, including grouped transposed convs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=True)
        self.b2 = nn.BatchNorm2d(8, affine=False)
        self.t3 = nn.ConvTranspose2d(8, 12, 3, stride=2, padding=1, output_padding=1, groups=4)
        self.b3 = nn.BatchNorm2d(12)
        self.t4 = nn.ConvTranspose2d(12, 6, 3, padding=1, groups=2, bias=False)
        self.b4 = FrozenBatchNorm2d(6)
        self.c5 = nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect")
        self.b5 = nn.BatchNorm2d(6)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.t3(x)))
        x = self.b4(self.t4(x))
        return self.b5(self.c5(x))


class OneD(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(4, 6, 3, padding=1)
        self.b = nn.BatchNorm1d(6)
        self.t = nn.ConvTranspose1d(6, 6, 3, groups=3, bias=False)
        self.tb = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.tb(self.t(self.b(self.c(x))))


class ThreeD(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv3d(2, 4, 3, padding=1, bias=False)
        self.b = nn.BatchNorm3d(4)

    def forward(self, x):
        return self.b(self.c(x))


def _frozen_resnet():
    return torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)


MODELS = {
    # name: (builder, input shape, number of blocks)
    "kinds": (Kinds, (2, 3, 16, 16), 5),
    "conv1d": (OneD, (2, 4, 20), 2),
    "conv3d": (ThreeD, (2, 2, 6, 6, 6), 1),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (2, 3, 32, 32), 20),
    "resnet18-frozenbn": (_frozen_resnet, (2, 3, 32, 32), 20),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None),
                           (2, 3, 32, 32), 34),
}


def _bns(model):
    return [n for n, m in model.named_modules() if isinstance(m, BN_KINDS)]


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: id(m) for n, m in model.named_modules()},
            {n: m.training for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def case(request):
    build, shape, blocks = MODELS[request.param]
    torch.manual_seed(0)
    model = randomize_bn(build()).eval()
    return model, torch.randn(shape), blocks


def test_equal_in_eval(case):
    model, x, _ = case
    deployed = convbn_fx.deploy_mode(model)
    assert_close_to_float64(model, deployed.eval(), [x], grads=False)


def _conv_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), nn.modules.conv._ConvNd)]


def test_bn_gone_and_convs_kept(case):
    model, _, blocks = case
    infos = convbn_fx.describe(model)
    assert len(infos) == blocks and all(i.reason is None for i in infos)
    deployed = convbn_fx.deploy_mode(model)
    assert isinstance(deployed, torch.fx.GraphModule)
    assert _bns(deployed) == []
    assert not [n for n in deployed.graph.nodes if n.op == "call_module"
                and isinstance(deployed.get_submodule(n.target), BN_KINDS)]
    assert len(_conv_calls(deployed)) == len(_conv_calls(trace(model)))
    # the state_dict lost exactly the BN entries and gained a bias for bias-free convs
    bn_names = {i.bn for i in infos}
    expected = {k for k in model.state_dict() if k.rsplit(".", 1)[0] not in bn_names}
    expected |= {f"{i.conv}.bias" for i in infos}
    assert set(deployed.state_dict()) == expected


def test_input_not_modified(case):
    model, x, _ = case
    before = _snapshot(model)
    out = model(x)
    convbn_fx.deploy_mode(model)
    after = _snapshot(model)
    assert before[1:] == after[1:]
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert torch.equal(model(x), out)


def test_grouped_conv_transpose_fold():
    """Output channel g·C_out/groups + j of a grouped transposed weight is not dim 1 alone."""
    torch.manual_seed(1)
    model = randomize_bn(nn.Sequential(
        nn.ConvTranspose2d(8, 12, 3, stride=2, groups=4, bias=False), nn.BatchNorm2d(12)))
    model.eval()
    deployed = convbn_fx.deploy_mode(model)
    conv = deployed.get_submodule("0")
    assert isinstance(conv, nn.ConvTranspose2d) and conv.groups == 4
    assert conv.bias is not None and conv.bias.shape == (12,)
    assert _bns(deployed) == []
    assert_close_to_float64(model, deployed, [torch.randn(2, 8, 7, 7)], grads=False)


def test_training_bn_left_and_logged(caplog):
    torch.manual_seed(0)
    model = randomize_bn(Kinds()).eval()
    model.b3.train()
    with caplog.at_level(logging.WARNING, logger="convbn_fx"):
        deployed = convbn_fx.deploy_mode(model)
    assert _bns(deployed) == ["b3"]
    assert any("b3" in r.getMessage() and "training mode" in r.getMessage()
               for r in caplog.records)
    x = torch.randn(2, 3, 16, 16)
    model.b3.eval()  # compare the other four folds in eval with b3 evaluated the same way
    deployed.b3.eval()
    assert_close_to_float64(model, deployed, [x], grads=False)


class Unfoldable(nn.Module):
    """Blocks that must not fold: conv output used twice, BN without running statistics."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.b2 = nn.BatchNorm2d(4, track_running_stats=False)
        self.c3 = nn.Conv2d(4, 4, 1)
        self.b3 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.c1(x)
        x = self.b1(y) + y
        x = self.b2(self.c2(x))
        return self.b3(self.c3(x))


def test_unfoldable_blocks_left():
    torch.manual_seed(0)
    model = randomize_bn(Unfoldable()).eval()
    deployed = convbn_fx.deploy_mode(model)
    assert _bns(deployed) == ["b1", "b2"]
    assert_close_to_float64(model, deployed, [torch.randn(2, 4, 8, 8)], grads=False)


class SharedConv(nn.Module):
    """One conv called twice: once into a BN, once not. The unfolded call keeps the original."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


def test_shared_conv_gets_its_own_folded_copy():
    torch.manual_seed(0)
    model = randomize_bn(SharedConv()).eval()
    deployed = convbn_fx.deploy_mode(model)
    targets = [n.target for n in deployed.graph.nodes if n.op == "call_module"]
    assert sorted(targets) == ["conv", "conv_folded"]
    assert torch.equal(deployed.conv.weight, model.conv.weight)
    assert_close_to_float64(model, deployed, [torch.randn(2, 4, 8, 8)], grads=False)


class Branchy(nn.Module):
    """Data-dependent Python at the top: only the children trace."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x):
        x = self.body(x)
        if x.sum() > 0:
            x = -x
        return self.head(x)


def test_partial_trace():
    torch.manual_seed(0)
    model = randomize_bn(Branchy()).eval()
    deployed = convbn_fx.deploy_mode(model)
    assert type(deployed) is Branchy and deployed is not model
    assert _bns(deployed) == [] and len(_bns(model)) == 2
    assert isinstance(deployed.body, torch.fx.GraphModule)
    assert_close_to_float64(model, deployed, [torch.randn(2, 3, 8, 8)], grads=False)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.conv(x)
        return self.bn(x) if x.sum() > 0 else x


def test_untraceable_raises_trace_error():
    with pytest.raises(convbn_fx.TraceError, match="could not trace Untraceable"):
        convbn_fx.deploy_mode(Untraceable().eval())


def test_not_a_module_raises():
    with pytest.raises(convbn_fx.ConvBNError, match="expects a torch.nn.Module"):
        convbn_fx.deploy_mode(lambda x: x)


def test_from_graph_module_and_tuned():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    x = torch.randn(2, 3, 32, 32)
    tuned = convbn_fx.tune_mode(model)
    codes = tuned.code
    for source in (torch.fx.symbolic_trace(model), tuned):
        deployed = convbn_fx.deploy_mode(source)
        assert _bns(deployed) == []
        assert_close_to_float64(model, deployed, [x], grads=False)
    assert tuned.code == codes and {b.lowering for b in convbn_fx.describe(tuned)} == {
        convbn_fx.Mode.TUNE}


def test_idempotent():
    torch.manual_seed(0)
    model = randomize_bn(Kinds()).eval()
    once = convbn_fx.deploy_mode(model)
    twice = convbn_fx.deploy_mode(once)
    assert twice.code == once.code
    assert once.state_dict().keys() == twice.state_dict().keys()


def test_folded_params_are_fresh_and_trainable_like_the_conv():
    torch.manual_seed(0)
    model = randomize_bn(Kinds()).eval()
    model.c1.requires_grad_(False)
    deployed = convbn_fx.deploy_mode(model)
    ours = {id(p) for p in deployed.parameters()}
    assert not ours & {id(p) for p in model.parameters()}
    assert not deployed.c1.weight.requires_grad and not deployed.c1.bias.requires_grad
    assert deployed.c2.weight.requires_grad and deployed.c2.bias.requires_grad
