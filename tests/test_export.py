"""torch.export: aten graphs fill the same block record, `tune_exported`, exporting tune_mode.

Every check runs the exported program (`ep.module()`) against a float64 copy of the eager
model, on outputs and parameter gradients, and counts the batch-norm ops left in the graph.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx
import torch.nn as nn
import torchvision

import convbn_fx
from convbn_fx.graph.find import find_blocks
from convbn_fx.graph.tune_graph import tune_graph
from convbn_fx.tools.testing import (assert_close_to_float64, finetune_state, frozen_state,
                               randomize_bn)

Mode = convbn_fx.Mode
aten = torch.ops.aten

BN_OPS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
          aten._native_batch_norm_legit_functional.default, aten.native_batch_norm.default,
          aten._native_batch_norm_legit.default}
CONV_OPS = {aten.conv2d.default, aten.convolution.default, aten.conv_transpose2d.input}


class Net(nn.Module):
    """Conv with and without bias, a grouped transposed conv and Linear→BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.ConvTranspose2d(8, 6, 3, groups=2), nn.BatchNorm2d(6)
        self.fc, self.bn4 = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x)).mean((2, 3))
        return self.bn4(self.fc(x))


class SkipNet(Net):
    """Net, then a conv whose output is reused and a BN left in training mode."""

    def __init__(self):
        super().__init__()
        self.skip, self.bn5 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.conv6, self.bn6 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        y = self.skip(x)
        return self.bn6(self.conv6(self.bn5(y) + y))


def _model(cls=Net) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(cls()).eval()


def _input(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))


def _count(ep_or_gm, ops) -> int:
    graph = ep_or_gm.graph
    return sum(n.op == "call_function" and n.target in ops for n in graph.nodes)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-batch"])
@pytest.mark.parametrize("decomposed", [False, True], ids=["training-ir", "decomposed"])
def test_tune_exported_folds_every_block(decomposed, dynamic):
    model = _model()
    shapes = ({0: torch.export.Dim("batch", min=2, max=32)},) if dynamic else None
    ep = torch.export.export(model, (_input(),), dynamic_shapes=shapes)
    if decomposed:
        ep = ep.run_decompositions()
    assert _count(ep, BN_OPS) == 4

    new = convbn_fx.tune_exported(ep)
    assert _count(new, BN_OPS) == 0
    assert _count(new, CONV_OPS) == 3
    assert new.dialect == ep.dialect
    assert list(new.state_dict) == list(ep.state_dict)
    assert len(new.range_constraints) == len(ep.range_constraints)
    assert _count(ep, BN_OPS) == 4  # the input program is untouched
    assert_close_to_float64(model, new.module(), (_input(),))
    if dynamic:
        assert_close_to_float64(model, new.module(), (_input(5),))


def test_aten_graph_fills_the_block_record():
    ep = torch.export.export(_model(), (_input(),))
    for flavour in (ep, ep.run_decompositions()):
        blocks = find_blocks(flavour.graph)
        assert [(b.conv, b.bn, b.kind, b.reason) for b in blocks] == [
            ("conv1", "bn1", "Conv2d+BatchNorm2d", None),
            ("conv2", "bn2", "Conv2d+BatchNorm2d", None),
            ("conv3", "bn3", "ConvTranspose2d+BatchNorm2d", None),
            ("fc", "bn4", "Linear+BatchNorm1d", None)]
        placeholders = {n for n in flavour.graph.nodes if n.op == "placeholder"}
        assert all(t in placeholders for b in blocks for t in b.tensors.values() if t is not None)
        assert blocks[1].tensors["bias"] is None
        assert blocks[1].config.stride == (2, 2) and blocks[2].config.groups == 2
        assert blocks[2].config.transposed and blocks[3].op == "linear"


def test_tune_exported_skips_unsafe_blocks():
    model = _model(SkipNet)
    model.bn6.train()
    ep = torch.export.export(model, (_input(),))
    new = convbn_fx.tune_exported(ep)
    assert _count(ep, BN_OPS) == 5
    assert _count(new, BN_OPS) == 2  # bn5 (conv output reused), bn6 (batch statistics)
    # Outputs only: gradients back through a batch-statistics BN are cancellation noise.
    assert_close_to_float64(model, new.module(), (_input(),), grads=False)


def test_tune_exported_without_foldable_blocks_returns_the_program():
    model = _model()
    model.train()
    ep = torch.export.export(model, (_input(),))
    assert convbn_fx.tune_exported(ep) is ep


def test_tune_exported_rejects_bad_input():
    with pytest.raises(convbn_fx.ConvBNError, match="use convbn_fx.tune_mode"):
        convbn_fx.tune_exported(_model())
    ep = torch.export.export(_model(), (_input(),))
    with pytest.raises(convbn_fx.ModeError, match="use mode='tune'"):
        convbn_fx.tune_exported(ep, Mode.DEPLOY)


class Owner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)


def _decomposed_graph(use_saved_stats: bool) -> torch.fx.GraphModule:
    """A hand-built decomposed aten graph: convolution → tuple BN → getitem(0) (and (1))."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    w, b = g.get_attr("conv.weight"), g.get_attr("conv.bias")
    y = g.call_function(aten.convolution.default,
                        (x, w, b, [1, 1], [1, 1], [1, 1], False, [0, 0], 1))
    stats = [g.get_attr(f"bn.{k}") for k in ("weight", "bias", "running_mean", "running_var")]
    bn = g.call_function(aten._native_batch_norm_legit_no_training.default,
                         (y, *stats), {"momentum": 0.1, "eps": 1e-5})
    out = g.call_function(operator.getitem, (bn, 0))
    extra = g.call_function(operator.getitem, (bn, 1)) if use_saved_stats else None
    g.output(out if extra is None else (out, extra))
    return torch.fx.GraphModule(randomize_bn(Owner()).eval(), g)


def test_tuple_bn_folds_through_getitem():
    gm = _decomposed_graph(use_saved_stats=False)
    original = copy.deepcopy(gm)
    infos = tune_graph(gm.graph).infos()
    gm.recompile()
    assert [(i.lowering, i.reason) for i in infos] == [(Mode.TUNE, None)]
    assert _count(gm, BN_OPS | {aten.convolution.default}) == 0
    assert not any(n.target is operator.getitem for n in gm.graph.nodes)
    assert_close_to_float64(original, gm, (torch.randn(2, 3, 8, 8),))


def test_tuple_bn_with_saved_statistics_used_is_not_folded():
    gm = _decomposed_graph(use_saved_stats=True)
    infos = tune_graph(gm.graph).infos()
    assert [i.lowering for i in infos] == [None]
    assert "saved statistics" in infos[0].reason
    assert _count(gm, BN_OPS) == 1


@pytest.mark.parametrize("state", ["finetune", "frozen"])
def test_tune_mode_graph_module_exports(state):
    model = _model()
    (finetune_state if state == "finetune" else frozen_state)(model)
    tuned = convbn_fx.tune_mode(copy.deepcopy(model))
    want = Mode.TUNE if state == "finetune" else Mode.DEPLOY
    assert [i.lowering for i in convbn_fx.describe(tuned)] == [want] * 4
    ep = torch.export.export(tuned, (_input(),))
    assert _count(ep, BN_OPS) == 0
    assert_close_to_float64(model, ep.module(), (_input(),), grads=state == "finetune")


def test_resnet18_tune_exported():
    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ep = torch.export.export(model, (x,))
    new = convbn_fx.tune_exported(ep)
    assert _count(ep, BN_OPS) == 20 and _count(new, BN_OPS) == 0
    assert _count(new, CONV_OPS) == 20
    assert_close_to_float64(model, new.module(), (x,))
