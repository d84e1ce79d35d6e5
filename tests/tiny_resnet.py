"""A resnet small enough for float64 checks and two-process runs: torchvision BasicBlocks.

Same structure as torchvision's ResNet (a conv-BN stem, `layer1`, `layer2` of BasicBlocks,
a downsample conv-BN, a Linear head), so sharding and checkpointing plans written for resnets
(`fully_shard` per layer, `apply_activation_checkpointing` per BasicBlock) apply unchanged.
Eight conv→BN blocks. Activations dominate the weights at 32×32, so dropped checkpointing
shows in the saved bytes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.resnet import BasicBlock

from convbn_fx.tools.testing import finetune_state, randomize_bn

__all__ = ["TinyResNet", "CheckpointedLayers", "Untraced", "BLOCKS", "build", "BasicBlock"]

BLOCKS = 8  # conv→BN pairs: stem, 2 + 2 in layer1, 2 + downsample in layer2


class TinyResNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 4):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, padding=1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(w), nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(w, w), BasicBlock(w, w))
        down = nn.Sequential(nn.Conv2d(w, 2 * w, 1, stride=2, bias=False), nn.BatchNorm2d(2 * w))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, stride=2, downsample=down))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(2 * w, classes)

    def stem(self, x):
        return self.relu(self.bn1(self.conv1(x)))

    def head(self, x):
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x):
        return self.head(self.layer2(self.layer1(self.stem(x))))


class CheckpointedLayers(TinyResNet):
    """`torch.utils.checkpoint.checkpoint` around each layer, inside the model's forward."""

    def __init__(self, use_reentrant: bool = False):
        super().__init__()
        self.use_reentrant = use_reentrant

    def forward(self, x):
        x = checkpoint(self.layer1, self.stem(x), use_reentrant=self.use_reentrant)
        return self.head(checkpoint(self.layer2, x, use_reentrant=self.use_reentrant))


class Untraced(nn.Module):
    """`net` behind a forward torch.fx cannot trace, so tune_mode rewrites `net` as a part."""

    def __init__(self, net: nn.Module | None = None):
        super().__init__()
        self.net = TinyResNet() if net is None else net

    def forward(self, x):
        if x.shape[0] > 0:  # a branch on a traced value: torch.fx cannot trace it
            return self.net(x)
        return x


def build(cls=TinyResNet, dtype=torch.float64, seed: int = 0, **kwargs) -> nn.Module:
    """The fine-tuning state (train mode, BN frozen), randomised BN statistics."""
    torch.manual_seed(seed)
    return finetune_state(randomize_bn(cls(**kwargs), seed)).to(dtype)
