"""Small models for tests/test_cli.py and test_measure.py, importable as `cli_models:NAME`.

`skippy` has one block of each kind the report must list as skipped, next to two that fold;
`tiny` is what `convbn-fx measure` is tested on, `partly_frozen` the same with its first block
frozen (Deploy-lowered, MemTracker's frozen-parameter case); `oom_from_batch_4` runs out of
memory (on purpose) in training steps from batch 4; `data_dependent` cannot run on fake
tensors; the other callables are bad input for the CLI's exit-status tests.
"""

import torch
import torch.nn as nn


class _LoggingConv(nn.Conv2d):
    # Overrides forward with Python torch.fx cannot trace, without declare_safe: kept as one
    # call, the matcher must refuse to fold it.
    def forward(self, x):
        if x.sum() == 0:
            print("all zeros")
        return super().forward(x)


class Skippy(nn.Module):
    """Five conv→BN blocks: two fold, three are skipped for three different reasons."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.shared, self.bn_shared = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.custom, self.bn_custom = _LoggingConv(8, 8, 1), nn.BatchNorm2d(8)
        self.conv_nostats = nn.Conv2d(8, 8, 1)
        self.bn_nostats = nn.BatchNorm2d(8, track_running_stats=False)
        self.conv_last, self.bn_last = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        y = self.shared(x)
        x = self.bn_shared(y) + y          # conv output reused: not foldable
        x = self.bn_custom(self.custom(x))
        x = self.bn_nostats(self.conv_nostats(x))
        return self.bn_last(self.conv_last(x))


def skippy() -> nn.Module:
    return Skippy()


def tiny() -> nn.Module:
    """Two conv→BN blocks and a dropout (the same masks must reach every mode)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def partly_frozen() -> nn.Module:
    """`tiny` with its first conv→BN block frozen: tune_mode lowers it to Deploy (a folded
    weight cached between calls) and the second to Tune."""
    model = tiny()
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    return model


class _KeepPositive(nn.Module):
    def forward(self, x):
        return x[x > 0]    # boolean indexing: nonzero, whose output size depends on the data


def data_dependent() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), _KeepPositive())


class _AllocationLimit(nn.Module):
    # Stands in for a GPU that is too small: a training step from batch 4 up cannot allocate.
    def forward(self, x):
        if torch.is_grad_enabled() and x.shape[0] >= 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return x


def oom_from_batch_4() -> nn.Module:
    # _AllocationLimit does not trace (it branches on the batch size): the model is
    # rewritten in parts, the conv→BN block on its own.
    return nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)),
                         _AllocationLimit(), nn.Flatten())


def no_blocks() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU())


def not_a_module():
    return {"conv": nn.Conv2d(3, 3, 1)}


def broken():
    raise RuntimeError("the checkpoint path is not configured")


def frozen_bn_fasterrcnn() -> nn.Module:
    """Faster R-CNN as torchvision builds it for fine-tuning a pretrained backbone.

    `fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)` uses BatchNorm2d with every
    layer trainable; with a pretrained backbone it uses FrozenBatchNorm2d and freezes conv1 and
    layer1 (3 trainable layers). This builds that structure with random weights.
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                   norm_layer=FrozenBatchNorm2d, trainable_layers=3)
    return FasterRCNN(backbone, num_classes=91)

broken_import_error = None  # not callable: `cli_models:broken_import_error` is bad input
