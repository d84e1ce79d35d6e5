"""Model-zoo sweep: how many conv→norm pairs of real models `tune_mode` folds, and exactly.

Pairs are counted independently of convbn_fx's matcher, on the plain model with hooks: a
norm whose input is the output of a conv (the same tensor object) makes one pair. Each model
is then rewritten in the fine-tuning state (train(), BN frozen), run, and checked twice
against float64 (see the project's numerics standard): *algebra*, a float64 copy rewritten
gives the float64 original's outputs and every parameter gradient to ~1e-9 (dropout masks
fixed by a seed); *stability*, the float32 rewritten outputs stay within 2x the plain float32
model's own error against float64.

    python -m bench.zoo                      # the timm families of the README table
    python -m bench.zoo --zoo torchvision        # torchvision's classification/segmentation
    python -m bench.zoo --models resnet18 efficientnet_b0 --format json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

import convbn_fx
from convbn_fx.tools.testing import compare_to_float64, finetune_state, randomize_bn
from convbn_fx.vocabulary.kinds import all_bn_types

__all__ = ["FAMILIES", "ZooResult", "count_pairs", "check_model", "build_timm"]

# One or two small members per timm family (timm 1.0.31), as the README table lists them.
FAMILIES: dict[str, list[str]] = {
    "EfficientNet": ["efficientnet_b0", "tf_efficientnet_b0"],
    "MobileNetV1/V2": ["mobilenetv1_100", "mobilenetv2_050"],
    "MobileNetV3/V4": ["mobilenetv3_small_050", "tf_mobilenetv3_small_minimal_100",
                       "mobilenetv4_conv_small"],
    "MNASNet/FBNet/LCNet": ["mnasnet_small", "fbnetc_100", "lcnet_050"],
    "MixNet/TinyNet/HardCoReNAS": ["mixnet_s", "tinynet_e", "hardcorenas_a"],
    "RegNet": ["regnetx_002", "regnety_002", "regnetz_b16"],
    "CSPNet/DarkNet": ["cspresnet50", "cs3darknet_focus_s", "darknet17"],
    "VoVNet/GerNet/DPN": ["ese_vovnet19b_slim_dw", "gernet_s", "dpn48b"],
    "DenseNet/Inception": ["densenet121", "inception_v3", "inception_v4"],
    "RepVGG/MobileOne": ["repvgg_a0", "mobileone_s0"],
    "ResNet(-ts)": ["resnet18", "resnet50d", "resnext26ts", "gcresnext26ts", "eca_resnext26ts"],
    "MobileViT/EfficientViT": ["mobilevit_xxs", "efficientvit_m0"],
    "GhostNet/ReXNet/HRNet": ["ghostnet_050", "rexnet_100", "hrnet_w18_small"],
}
# torchvision's classification and segmentation families, for the same table.
TORCHVISION = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2",
               "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
               "efficientnet_v2_s", "mnasnet0_5", "regnet_y_400mf", "regnet_x_400mf",
               "shufflenet_v2_x0_5", "densenet121", "googlenet", "inception_v3", "vgg11_bn",
               "squeezenet1_0", "convnext_tiny", "fcn_resnet50", "deeplabv3_mobilenet_v3_large",
               "lraspp_mobilenet_v3_large"]
# Models whose stride needs a larger input than the sweep's default.
SIZES = {"inception_v3": 96, "inception_v4": 128, "tv/inception_v3": 96,
         "inception_resnet_v2": 128, "bat_resnext26ts": 256, "botnet26t_256": 256,
         "halonet26t": 256, "levit_128s": 224}
# A representative subset that runs in well under a minute on 2 cores (tests/test_zoo.py).
QUICK = ["efficientnet_b0", "tf_efficientnet_b0", "mobilenetv2_050", "mobilenetv3_small_050",
         "tf_mobilenetv3_small_minimal_100", "mobilenetv4_conv_small", "mnasnet_small",
         "fbnetc_100", "lcnet_050", "mixnet_s", "tinynet_e", "hardcorenas_a", "regnetx_002",
         "regnety_002", "cs3darknet_focus_s", "ese_vovnet19b_slim_dw", "gernet_s", "dpn48b",
         "repvgg_a0", "mobileone_s0", "resnet18", "resnext26ts", "eca_resnext26ts",
         "mobilevit_xxs", "efficientvit_m0", "ghostnet_050"]


@dataclass
class ZooResult:
    name: str
    pairs: int = 0                  # conv→norm pairs on the plain model (hooks)
    folded: int = 0                 # blocks Tune/Deploy after tune_mode
    blocks: int = 0                 # blocks the matcher found (folded or not)
    algebra: float = float("nan")   # max relative error, float64 rewritten vs float64 plain
    stable: bool = False            # float32 outputs within 2x float32's own error
    runs: bool = False              # the rewritten model ran where the plain one did
    seconds: float = 0.0
    error: str | None = None
    skipped: dict = field(default_factory=dict)  # reason -> count


def build_timm(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False)


def build_torchvision(name: str) -> nn.Module:
    import torchvision

    kwargs = {"weights": None}
    if name in ("fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"):
        kwargs["weights_backbone"] = None
    if name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"], kwargs["init_weights"] = False, False
    return torchvision.models.get_model(name, **kwargs)


def _norm_kinds() -> tuple[type, ...]:
    return (_BatchNorm,) + all_bn_types()


def count_pairs(model: nn.Module, x: torch.Tensor) -> int:
    """Conv→norm pairs of a plain model: norm calls whose input is a conv call's output."""
    outputs: dict[int, torch.Tensor] = {}  # kept alive so an id is not reused mid-forward
    pairs: set[tuple[int, int]] = set()
    handles = []

    def on_conv(module, args, out):
        outputs[id(out)] = out

    def on_norm(module, args):
        if args and id(args[0]) in outputs:
            pairs.add((id(args[0]), id(module)))

    for m in model.modules():
        if isinstance(m, _ConvNd):
            handles.append(m.register_forward_hook(on_conv))
        elif isinstance(m, _norm_kinds()):
            handles.append(m.register_forward_pre_hook(on_norm))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return len(pairs)


def _run(model: nn.Module, x: torch.Tensor, weights=None):
    """Outputs and every parameter gradient of a weighted sum of the outputs (fixed masks)."""
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = model(x)
    if isinstance(out, dict):  # segmentation models return {"out": ..., "aux": ...}
        out = list(out.values())
    outs = [out] if isinstance(out, torch.Tensor) else [o for o in out
                                                        if isinstance(o, torch.Tensor)]
    if weights is None:
        gen = torch.Generator().manual_seed(1)
        weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    result = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    result.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    return result, weights


def algebra_error(model: nn.Module, x: torch.Tensor, floor: float = 1e-6) -> float:
    """Largest relative difference, float64 rewritten vs float64 plain, outputs and grads.

    A gradient that vanishes (an attention key's bias, which softmax cancels: 1e-29 of the
    largest gradient) is rounding noise in both models; as in `convbn_fx.tools.testing`, each
    tensor's difference is taken relative to at least `floor` times the largest norm of its
    kind (outputs, or gradients).
    """
    plain = copy.deepcopy(model).double()
    tuned = convbn_fx.tune_mode(plain)
    ref, weights = _run(plain, x.double())
    new, _ = _run(tuned, x.double(), weights)
    if set(ref) != set(new):
        return float("inf")
    top = {kind: max(r.norm().item() for k, r in ref.items() if k.startswith("out") == kind)
           for kind in {k.startswith("out") for k in ref}}
    return max((new[k] - r).norm().item()
               / max(r.norm().item(), floor * top[k.startswith("out")], 1e-300)
               for k, r in ref.items())


def check_model(name: str, build=build_timm, size: int | None = None, batch: int = 2,
                numerics: bool = True) -> ZooResult:
    """Sweep one model: pairs, folded blocks, and the two float64 checks (see module doc)."""
    result = ZooResult(name)
    size = size or SIZES.get(name if build is build_timm else f"tv/{name}", 64)
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = finetune_state(randomize_bn(build(name)))
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
        result.pairs = count_pairs(model, x)
        tuned = convbn_fx.tune_mode(model)
        infos = convbn_fx.describe(tuned)
        result.blocks = len(infos)
        result.folded = sum(i.folded for i in infos)
        for i in infos:
            if not i.folded:
                reason = i.reason or f"lowered {i.lowering}"
                result.skipped[reason] = result.skipped.get(reason, 0) + 1
        tuned(x)
        result.runs = True
        if numerics:
            result.algebra = algebra_error(model, x)
            devs = compare_to_float64(model, tuned, (x,), grads=False)
            result.stable = all(d.ok for d in devs)
    except Exception as exc:  # a sweep reports every model, whatever breaks
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    result.seconds = time.perf_counter() - start
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", help="timm model names (default: FAMILIES)")
    parser.add_argument("--quick", action="store_true", help="the QUICK subset")
    parser.add_argument("--zoo", choices=("timm", "torchvision"), default="timm")
    parser.add_argument("--size", type=int, default=None, help="input size (default 64)")
    parser.add_argument("--no-numerics", action="store_true")
    parser.add_argument("--format", choices=("plain", "github", "json"), default="github")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    build = build_timm if args.zoo == "timm" else build_torchvision
    if args.models:
        groups = {"": args.models}
    elif args.zoo == "torchvision":
        groups = {"torchvision": TORCHVISION}
    elif args.quick:
        groups = {"": QUICK}
    else:
        groups = FAMILIES
    rows, results = [], []
    for family, names in groups.items():
        for name in names:
            r = check_model(name, build, size=args.size, numerics=not args.no_numerics)
            results.append(r)
            print(f"{name}: {r.folded}/{r.pairs} folded, algebra {r.algebra:.1e}, stable "
                  f"{r.stable}, {r.seconds:.1f}s {r.error or ''}", file=sys.stderr)
            rows.append([family, name, r.folded, r.pairs, f"{r.algebra:.0e}",
                         "yes" if r.stable else "NO", r.error or ""])
    if args.format == "json":
        print(json.dumps([asdict(r) for r in results], indent=1))
    else:
        from tabulate import tabulate

        total_f, total_p = sum(r.folded for r in results), sum(r.pairs for r in results)
        print(tabulate(rows, ["family", "model", "folded", "conv→norm pairs",
                              "float64 algebra", "float32 stable", "error"],
                       tablefmt="github" if args.format == "github" else "simple"))
        print(f"\ntotal: {total_f} of {total_p} conv→norm pairs folded "
              f"({100 * total_f / max(total_p, 1):.1f} %)")
    bad = [r for r in results if r.error or not r.stable or not r.algebra <= 1e-9]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
