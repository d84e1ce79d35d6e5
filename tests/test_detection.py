"""Detection models (issue 4): they do not trace whole, so `tune_mode` rewrites their parts.

torchvision's detection models run data-dependent Python (image lists, NMS, proposal
sampling) around traceable backbones and heads. `tune_mode` must rewrite the largest parts
that trace, leave the rest as Python, and find every conv→BN block, FrozenBatchNorm2d included.

A detection training step is not a well-conditioned function: a ReLU input or a proposal
score within float32 roundoff of a threshold sends a whole gradient term elsewhere, so two
correct float32 implementations can differ by far more than their roundoff. The training and
eval steps are therefore compared in float64 (rewritten float64 model against the unrewritten
float64 model, which isolates the rewrite from float32 roundoff) and the losses and
backbone features, which are smooth, also in float32 against the float64 standard.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torchvision.models import detection, resnet50
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

import convbn_fx
from convbn_fx import Mode
from convbn_fx.tools.testing import assert_close_to_float64, finetune_state, randomize_bn

SMALL = {"min_size": 64, "max_size": 80, "num_classes": 5}
FEW_PROPOSALS = {"rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 40,
                 "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 40,
                 "rpn_batch_size_per_image": 32, "box_batch_size_per_image": 16,
                 "box_detections_per_img": 20}


def fasterrcnn_frozen_bn():
    """Faster R-CNN resnet50-FPN with FrozenBatchNorm2d, as torchvision builds it for
    pretrained backbones (with weights=None it would use BatchNorm2d)."""
    backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
    return detection.FasterRCNN(backbone, **SMALL, **FEW_PROPOSALS)


def ssdlite_small():
    """SSDlite resizes to a fixed 320x320; 64x64 keeps the float64 run cheap (the anchors
    follow the feature map sizes)."""
    model = detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=5, topk_candidates=50,
        detections_per_img=20)
    model.transform.fixed_size = (64, 64)
    return model


BUILDERS = {
    "fasterrcnn_resnet50_fpn-FrozenBN": fasterrcnn_frozen_bn,
    "retinanet_resnet50_fpn": lambda: detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, **SMALL, topk_candidates=50,
        detections_per_img=20),
    "maskrcnn_resnet50_fpn": lambda: detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, **SMALL, **FEW_PROPOSALS),
    "ssdlite320_mobilenet_v3_large": ssdlite_small,
}


def _build(name, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(BUILDERS[name](), seed=seed)


def _images(n=1, size=(64, 72), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *size, generator=gen) for _ in range(n)]


def _bn_count(model):
    return sum(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.modules())


def _same_detections(expected, actual):
    assert len(expected) == len(actual)
    for exp, got in zip(expected, actual):
        assert exp.keys() == got.keys()
        for key in exp:
            assert exp[key].shape == got[key].shape, key
            if exp[key].is_floating_point():
                torch.testing.assert_close(got[key], exp[key], rtol=1e-9, atol=1e-9)
            else:
                assert torch.equal(got[key], exp[key]), key


@pytest.mark.parametrize("name", list(BUILDERS))
def test_tune_mode_rewrites_the_parts_that_trace(name):
    model = _build(name).eval()
    keys = list(model.state_dict())
    tuned = convbn_fx.tune_mode(model)

    assert type(tuned) is type(model) and tuned is not model
    rewritten = (convbn_fx.TunedGraphModule, convbn_fx.TunedPart)
    assert not any(isinstance(m, rewritten) for m in model.modules()), \
        "the input model must not be modified"
    parts = [n for n, m in tuned.named_modules() if isinstance(m, rewritten)]
    assert "backbone" in parts or "backbone.body" in parts, parts
    for name in parts:  # a part stays an instance of its class, with its attributes
        part, original = tuned.get_submodule(name), model.get_submodule(name)
        assert isinstance(part, type(original)) and part is not original
        assert vars(original).keys() <= vars(part).keys()
    assert list(tuned.state_dict()) == keys
    # In these models every BN follows a conv directly: each is one block, each folded.
    infos = convbn_fx.describe(tuned)
    assert len(infos) == _bn_count(model) > 0
    assert all(i.folded for i in infos), {i.reason for i in infos}  # Tune, or Deploy if frozen
    assert [(i.conv, i.bn) for i in convbn_fx.describe(model)] == [(i.conv, i.bn) for i in infos]

    # Eval step in float64: the same detections as the unrewritten model.
    model64 = copy.deepcopy(model).double()
    tuned64 = convbn_fx.tune_mode(copy.deepcopy(model64).requires_grad_(False))
    assert {i.lowering for i in convbn_fx.describe(tuned64)} == {Mode.DEPLOY}
    images = [x.double() for x in _images()]
    with torch.no_grad():
        expected = model64(images)
    _same_detections(expected, tuned64(images))


class _Losses(nn.Module):
    """A detection training step as a module: fixed seed (proposal sampling), losses out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, boxes, labels):
        targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]
        with torch.random.fork_rng():
            torch.manual_seed(0)
            losses = self.model(list(images), targets)
        return [losses[k] for k in sorted(losses)]


def _training_batch():
    images = torch.stack(_images(2, (64, 80), seed=1))
    boxes = torch.tensor([[[8.0, 10, 40, 50], [30, 20, 70, 60]],
                          [[4.0, 4, 36, 30], [20, 34, 76, 62]]])
    labels = torch.tensor([[1, 3], [2, 4]])
    return images, boxes, labels


def test_fasterrcnn_frozen_bn_training_step():
    """Fine-tuning with frozen BN: conv1/layer1 frozen (Deploy), layer2-4 train (Tune)."""
    model = finetune_state(_build("fasterrcnn_resnet50_fpn-FrozenBN"))
    tuned = convbn_fx.tune_mode(model)
    lowerings = {i.conv: i.lowering for i in convbn_fx.describe(tuned)}
    assert lowerings["backbone.body.conv1"] is Mode.DEPLOY
    assert lowerings["backbone.body.layer1.0.conv1"] is Mode.DEPLOY
    assert lowerings["backbone.body.layer2.0.conv1"] is Mode.TUNE
    assert sum(m is Mode.TUNE for m in lowerings.values()) == 42  # layer2-4: 3x(4+6+3) + 3 downsample
    batch = _training_batch()

    # float32: the losses against float64 (gradients: see the module docstring).
    assert_close_to_float64(_Losses(model), _Losses(tuned), batch, grads=False)

    # float64: every loss and every parameter gradient equal to the unrewritten model's.
    model64 = copy.deepcopy(model).double()
    plain, rewritten = _Losses(model64), _Losses(convbn_fx.tune_mode(copy.deepcopy(model64)))
    batch64 = [t.double() if t.is_floating_point() else t for t in batch]
    results = []
    for step in (plain, rewritten):
        step.zero_grad()
        losses = step(*batch64)
        sum(losses).backward()
        grads = {n: p.grad for n, p in step.named_parameters() if p.grad is not None}
        results.append((torch.stack(losses).detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert len(loss_a) == 4 and torch.all(loss_a > 0)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-10, atol=1e-12)
    assert grads_a.keys() == grads_b.keys()
    assert any("layer2" in n for n in grads_a) and not any("layer1" in n for n in grads_a)
    for n in grads_a:
        scale = grads_a[n].abs().max().item()
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-9, atol=1e-10 * scale,
                                   msg=lambda m: f"{n}: {m}")


def test_fasterrcnn_frozen_bn_follows_buffer_changes():
    """FrozenBN's statistics changed after the rewrite (e.g. loading a checkpoint) are used."""
    model = _build("fasterrcnn_resnet50_fpn-FrozenBN").eval().double()
    tuned = convbn_fx.tune_mode(model)
    randomize_bn(model, seed=5)  # in place: the tuned parts share these buffers
    backbone_in = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(tuned.backbone(backbone_in), model.backbone(backbone_in),
                               rtol=1e-10, atol=1e-10)


def test_backbone_features_against_float64():
    """The rewritten backbone's float32 features and gradients meet the float64 standard."""
    model = finetune_state(_build("ssdlite320_mobilenet_v3_large"))
    tuned = convbn_fx.tune_mode(model)
    x = torch.rand(1, 3, 64, 64)
    assert_close_to_float64(model.backbone, tuned.backbone, (x,))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace this
            x = -x
        return self.bn(self.conv(x))


def test_nothing_traces_names_the_module():
    with pytest.raises(convbn_fx.TraceError, match="_Untraceable"):
        convbn_fx.describe(_Untraceable().eval())
    model = _Untraceable().eval()
    assert convbn_fx.tune_mode(model) is model  # it ran before, so it runs after
