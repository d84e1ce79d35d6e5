"""The command line's argument types and help texts (cli.py builds the parsers from them).

Each type turns a bad value into one argparse sentence, which the parser prints as the whole
error (exit status 2).
"""

from __future__ import annotations

import argparse

from .fit import parse_size
from .measure import MODES as MEASURED_MODES

__all__ = ["SPEC_HELP", "REPORT_EPILOG", "MEASURE_EPILOG", "non_negative", "positive", "shape",
           "batches", "size", "modes"]

SPEC_HELP = """\
SPEC is a torchvision model name (resnet50, fasterrcnn_resnet50_fpn), timm/NAME for a timm model
(timm/efficientnet_b0, built with pretrained=False), hf/MODEL_TYPE for a Hugging Face
transformers model from its default config (hf/resnet, hf/rt_detr, or a config class:
hf/DetrConfig), or package.module:callable returning an nn.Module (torchvision.models:resnet18,
monai.networks.nets:BasicUNet, myproj.models:build); the current directory is on the import
path. Models are built with random weights: a callable that takes `weights` or
`weights_backbone` gets None for them.
"""

REPORT_EPILOG = SPEC_HELP + """

states:
  finetune  model.train(), then every BN .eval(): transfer learning with frozen BN (default)
  train     model.train(): BN uses batch statistics, nothing folds
  eval      model.eval(), parameters still require grad
  frozen    model.eval() and requires_grad_(False): inference, Deploy folds

exit status: 0 ok, 1 an --expect/--fail-on-skip check failed, 2 bad input, 3 internal error.

example: a CI step that fails when a ResNet-50 block stops folding
  $ convbn-fx report resnet50 --expect 53 --fail-on-skip
  convbn-fx report: resnet50 (ResNet)

  state finetune, mode auto, traced whole: 53 blocks, 53 folded, 0 skipped.
  (a table of blocks per lowering follows; skipped blocks are listed with their reasons)
  $ echo $?
  0

more:
  convbn-fx report fasterrcnn_resnet50_fpn --state frozen --blocks
  convbn-fx report myproj.models:build --format github >> "$GITHUB_STEP_SUMMARY"
  convbn-fx report myproj.models:build --format json > convbn-report.json
"""

MEASURE_EPILOG = SPEC_HELP + """
For each mode, training steps (--state finetune: model.train() with BN frozen; each step is
zero_grad(set_to_none=True), forward, backward, SGD with lr=0) or inference steps (--state
frozen): saved-for-backward MiB; the peak, the tensor memory alive at the highest point of
the step by category (parameters, gradients, activations, ...; torch's MemTracker, the same
bytes every run; the input batch is counted); every step's time over interleaved steps
(median and min-max); each also as a ratio to eval; the rewrite counts; the largest output
difference to the unrewritten model. Modes: eval (the unrewritten computation, the
reference), tune (tune_mode(model): what you would write), deploy (deploy_mode: BN folded into
new weights; for inference, unstable to train).

--estimate runs the same steps on fake tensors: the peak at any batch and input size in
seconds, without the memory or the compute. It counts tensor memory only: not the CUDA
caching allocator's reserve or fragmentation, cuDNN workspaces or the CUDA context.
--fit SIZE searches, on estimates, the largest batch per mode whose peak fits in SIZE.

exit status: 0 ok, 2 bad input or a mode that ran out of memory (the other figures are still
printed), 3 internal error.

examples:
  convbn-fx measure resnet50 --batch 8
  convbn-fx measure resnet50 --batch 64 --estimate
  convbn-fx measure resnet50 --fit 24GiB --estimate
  convbn-fx measure timm/efficientnet_b0 --input 8x3x224x224 --modes tune
  convbn-fx measure resnet50 --sweep-batch 4,8,16,32 --estimate --plot memory.png
  convbn-fx measure myproj.models:build --state frozen --format json > measure.json
"""



def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a block count (0 or more), got {text!r}")
    return value


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number, 1 or more, got {text!r}")
    return value


def shape(text: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    if len(parts) < 2 or not all(p.isdecimal() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected sizes joined by x, like 8x3x224x224, got "
                                         f"{text!r}")
    return tuple(int(p) for p in parts)


def batches(text: str) -> list[int]:
    parts = text.split(",")
    if not all(p.strip().isdecimal() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected batch sizes joined by commas, like "
                                         f"4,8,16,32, got {text!r}")
    return [int(p) for p in parts]


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",")]
    bad = [m for m in modes if m not in MEASURED_MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown mode {bad[0]!r}, expected a comma-separated "
                                         f"list of {', '.join(MEASURED_MODES)}")
    return modes
