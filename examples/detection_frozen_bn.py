"""Detection with frozen BN: Faster R-CNN (ResNet-50-FPN) trained and evaluated through tune_mode.

Detectors fine-tune with FrozenBatchNorm2d in the backbone, so every backbone ConvBN block is a
Tune block while its layer trains and a Deploy block once the layer is frozen (torchvision
freezes the stem and layer1 by default). The detector's own forward does not trace with
torch.fx; `tune_mode` traces the largest parts that do (the backbone) and leaves the rest as
Python. This example builds the detector torchvision builds for a pretrained backbone (the
builder falls back to plain BatchNorm2d when weights=None, so the backbone is assembled here
with `resnet_fpn_backbone`), randomises the FrozenBN statistics, runs a few training steps on
FakeData images with random boxes in the unrewritten and the rewritten model side by side,
checks the first step's losses against a float64 copy, and compares an evaluation pass.

    python examples/detection_frozen_bn.py --steps 2
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter

import torch
import torch.nn as nn
from tabulate import tabulate
from torchvision.datasets import FakeData
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms import functional as TF

import convbn_fx
from convbn_fx.tools.testing import compare_to_float64, randomize_bn


def build_detector(num_classes: int, min_size: int, max_size: int, trainable_layers: int,
                   seed: int, calibration_images: list[torch.Tensor]) -> nn.Module:
    """Faster R-CNN as torchvision builds it for a pretrained backbone, with pretrained-like BN.

    Random BN statistics that do not match the activations blow them up over fifty layers,
    which no pretrained detector does. So the affine parameters are randomised, the running
    statistics measured on a few images (as pretraining would leave them), and each BN then
    frozen into a FrozenBatchNorm2d holding those tensors.
    """
    torch.manual_seed(seed)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                   norm_layer=nn.BatchNorm2d, trainable_layers=trainable_layers)
    model = FasterRCNN(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size,
                       box_score_thresh=0.01, box_detections_per_img=20)
    randomize_bn(model, seed)
    body = model.backbone.body
    for bn in body.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        images, _ = model.transform(calibration_images)
        body.train()(images.tensors)
    _freeze_bn(body)
    return model.train()


def _freeze_bn(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_bn(child)


def fake_detection_batch(batch_size: int, height: int, width: int, num_classes: int,
                         seed: int, boxes_per_image: int = 2):
    """FakeData images, each with random boxes (labels 1..num_classes-1; 0 is background)."""
    data = FakeData(size=batch_size, image_size=(3, height, width), transform=TF.to_tensor,
                    random_offset=seed)
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch_size, boxes_per_image, 2, generator=gen) * torch.tensor(
        [width * 0.6, height * 0.6])
    wh = (torch.rand(batch_size, boxes_per_image, 2, generator=gen) * 0.3 + 0.1) * torch.tensor(
        [width, height])
    labels = torch.randint(1, num_classes, (batch_size, boxes_per_image), generator=gen)
    images = torch.stack([data[i][0] for i in range(batch_size)])
    return images, torch.cat([xy, xy + wh], 2), labels


def as_targets(boxes: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    return [{"boxes": b, "labels": l} for b, l in zip(boxes, labels)]


class BackboneAndRPN(nn.Module):
    """The detector up to the RPN losses: FPN features and losses continuous in the weights.

    The ROI-head losses are not: which proposals survive top-k and NMS is a discrete choice
    that float32 round-off can flip, so they are compared for show, not checked.
    """

    def __init__(self, detector: nn.Module, seed: int):
        super().__init__()
        self.detector, self.seed = detector, seed

    def forward(self, images, boxes, labels):
        torch.manual_seed(self.seed)  # the RPN samples anchors at random
        det = self.detector
        image_list, targets = det.transform(list(images), as_targets(boxes, labels))
        features = det.backbone(image_list.tensors)
        _, rpn_losses = det.rpn(image_list, features, targets)
        return {**features, **rpn_losses}


def _magnitude(dev, floor: float = 1e-6) -> float:
    # compare_to_float64's bound is 2 * baseline + floor * max|float64 value|.
    return (dev.bound - 2 * dev.baseline) / floor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--min-size", type=int, default=224, help="detector resize, short side")
    parser.add_argument("--max-size", type=int, default=288, help="detector resize, long side")
    parser.add_argument("--classes", type=int, default=4, help="including background")
    parser.add_argument("--trainable-layers", type=int, default=3, choices=range(6),
                        help="backbone layers that train (torchvision's default: 3)")
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    images, boxes, labels = fake_detection_batch(args.batch_size, args.min_size, args.max_size,
                                                 args.classes, args.seed)
    base = build_detector(args.classes, args.min_size, args.max_size, args.trainable_layers,
                          args.seed, list(images))
    reference = copy.deepcopy(base)
    tuned = convbn_fx.tune_mode(base)   # shares parameters with `base`, not with `reference`
    blocks = convbn_fx.describe(tuned)
    counts = Counter(str(b.lowering) if b.lowering else "skipped" for b in blocks)
    print(f"Faster R-CNN: {len(blocks)} conv-BN blocks folded: "
          + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    by_part = Counter((".".join(b.bn.split(".")[:3]) if ".layer" in b.bn else b.bn,
                       str(b.lowering)) for b in blocks)
    print(tabulate([(part, mode, n) for (part, mode), n in by_part.items()],
                   headers=("part", "lowering", "blocks")))
    for b in blocks:
        if b.reason:
            print(f"  not folded: {b.conv} -> {b.bn}: {b.reason}")
    failed = False

    # The rewritten part against float64: FPN features, RPN losses and every gradient.
    devs = compare_to_float64(BackboneAndRPN(reference, args.seed),
                              BackboneAndRPN(tuned, args.seed), (images, boxes, labels))
    outs = [d for d in devs if not d.name.startswith("grad")]
    bad = [d for d in outs if not d.ok]
    print(f"backbone+RPN vs float64: {len(outs) - len(bad)} of {len(outs)} outputs (FPN "
          f"levels, RPN losses) within 2x the float32 model's error")
    failed |= bool(bad)
    # Gradients by the algebra check: the rewrite of a float64 copy against the float64
    # model, every parameter gradient. (Float32 gradients of a ReLU network are not judged
    # against float64: one pre-ReLU value within rounding of zero reroutes a whole upstream
    # gradient, in either model.)
    plain64 = copy.deepcopy(reference).double()
    inputs64 = (images.double(), boxes.double(), labels)
    algebra = [d for d in compare_to_float64(
        BackboneAndRPN(plain64, args.seed), BackboneAndRPN(convbn_fx.tune_mode(plain64),
                                                           args.seed),
        inputs64, floor=1e-9, reference=BackboneAndRPN(plain64, args.seed))
        if d.name.startswith("grad")]
    worst = max(d.error / max(_magnitude(d, 1e-9), 1e-300) for d in algebra)
    print(f"  {len(algebra)} parameter gradients in float64: worst relative error {worst:.1e} "
          f"({sum(d.ok for d in algebra)} within 1e-9 of the largest)")
    failed |= not all(d.ok for d in algebra)

    # Training: the rewritten detector trains; before each step the unrewritten one gets its
    # weights (the state_dict keys are the same), so every row compares the lowering alone.
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=args.lr,
                          momentum=0.9)
    rows = []
    for step in range(args.steps):
        reference.load_state_dict(tuned.state_dict())
        torch.manual_seed(args.seed + step)  # the same anchor and proposal samples
        with torch.no_grad():
            expected = reference.train()(list(images), as_targets(boxes, labels))
        torch.manual_seed(args.seed + step)
        out = tuned.train()(list(images), as_targets(boxes, labels))
        opt.zero_grad()
        sum(out.values()).backward()
        opt.step()
        for name, value in out.items():
            a, b = expected[name].item(), value.item()
            rows.append((step, name, f"{a:.6f}", f"{b:.6f}", f"{abs(a - b) / abs(a):.1e}"))
    print(tabulate(rows, disable_numparse=True,
                   headers=("step", "loss", "unrewritten", "tune_mode", "rel diff")))
    print("(RPN losses agree to round-off; ROI-head losses depend on which proposals survive "
          "top-k and NMS, a choice among near-equal scores that round-off can flip)")

    # Evaluation: the trained weights through both.
    reference.load_state_dict(tuned.state_dict())
    with torch.no_grad():
        dets = [m.eval()(list(images)) for m in (reference, tuned)]
    modes = Counter(str(b.lowering) for b in convbn_fx.describe(tuned))
    print(f"eval pass, lowerings {dict(modes)}:")
    for i, (a, b) in enumerate(zip(*dets)):
        same = len(a["boxes"]) == len(b["boxes"]) and torch.equal(a["labels"], b["labels"])
        box = (a["boxes"] - b["boxes"]).abs().max().item() if same and len(a["boxes"]) else 0.0
        score = (a["scores"] - b["scores"]).abs().max().item() if same and len(a["boxes"]) else 0.0
        print(f"  image {i}: {len(a['boxes'])} vs {len(b['boxes'])} detections, labels "
              f"{'equal' if same else 'DIFFER'}, max box diff {box:.1e} px, "
              f"max score diff {score:.1e}")
        # float32 round-off through fifty layers and the box decoding, not a fold error:
        failed |= not same or box > 1e-4 * args.max_size or score > 1e-4

    print("FAIL" if failed else "OK: tune_mode computes what the unrewritten detector computes")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
