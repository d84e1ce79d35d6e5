"""`convbn-fx report SPEC` and `convbn-fx measure SPEC`: the command line.

`report` says how many conv→BN blocks a model folds, and why the rest do not (report.py):
it builds the model with random weights, puts it in the state it will train in, rewrites it
with `tune_mode` and prints `describe()` as tables; `--expect N` and `--fail-on-skip` turn
the report into a check.
`measure` answers the question a user asks before adopting Tune mode: how much memory and time
it saves on their model at their input size, and how much bigger a batch fits (measure.py and
fit.py do the measuring; this only parses and prints). Exit status: 0 ok, 1 expectation
missed, 2 bad input (one sentence on stderr, no traceback), 3 an internal error (with its
traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

import torch

from ..frontends.tune import NOTHING_FOLDS
from ..vocabulary.errors import BATCH_STATISTICS, TRAINABLE, ConvBNError, ModeError
from . import measure as measuring
from .arguments import batch_sizes, block_count, input_shape, memory_size, mode_list, positive
from .fit import fit_batches
from .measure_table import format_fit_json, format_fit_text
from .measure_table import format_json as format_measure_json
from .measure_table import format_text as format_measure_text
from .options import FORMATS, STATES
from .progress import ProgressBar
from .report import format_json, format_text, make_report
from .specs import build_model

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_MISSED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

MODES = ("auto", "tune", "deploy", "eval", "train")
PROGRESS_DELAY = 1.0  # seconds before the progress bar shows: short runs stay quiet

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


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one sentence on stderr (and still exit status 2)."""

    def error(self, message: str):
        message = message.rstrip(".")
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message}; see {self.prog} --help.\n")


def _add_measure(commands) -> None:
    measure = commands.add_parser(
        "measure", help="what Tune saves on a model: peak memory by category, step time; "
                        "estimates at any batch; the largest batch that fits",
        description="Measure one training step of a model in Eval, Tune and Deploy mode.",
        epilog=MEASURE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    measure.add_argument("spec", metavar="SPEC", help="torchvision name, timm/NAME, "
                         "hf/MODEL_TYPE or package.module:callable")
    shape = measure.add_argument_group("input (default: --batch 8 --size 224)")
    shape.add_argument("--input", type=input_shape, metavar="SHAPE",
                       help="the whole input shape, e.g. 8x3x224x224 or 16x3x100 (Conv1d)")
    shape.add_argument("--batch", type=positive, metavar="N", help="batch size (default 8)")
    shape.add_argument("--size", type=positive, metavar="S",
                       help="image side: input N x 3 x S x S (default 224)")
    shape.add_argument("--sweep-batch", type=batch_sizes, metavar="B,B,...",
                       help="measure at each of these batch sizes (memory vs batch)")
    measure.add_argument("--state", choices=list(measuring.MEASURE_STATES), default="finetune",
                         help="finetune: train mode with frozen BN, one SGD step; frozen: "
                              "inference (default: finetune)")
    measure.add_argument("--modes", type=mode_list, default=list(measuring.MODES),
                         metavar="M,M,...",
                         help="modes to measure, of eval,tune,deploy (default: all); eval "
                              "is always measured, as the reference")
    measure.add_argument("--compile", action="store_true",
                         help="wrap every mode in torch.compile")
    measure.add_argument("--device", choices=["cpu", "cuda"],
                         help="where to run (default: cuda if available, else cpu)")
    measure.add_argument("--steps", type=positive, default=5, metavar="N",
                         help="timed steps per mode, after a warm-up step (default: 5)")
    memory = measure.add_argument_group("memory")
    memory.add_argument("--estimate", action="store_true",
                        help="estimate the peak on fake tensors: any batch and size in seconds, "
                             "nothing timed (tensor memory only: no allocator cache, cuDNN "
                             "workspaces or CUDA context)")
    memory.add_argument("--fit", type=memory_size, metavar="SIZE",
                        help="the largest batch per mode whose estimated peak fits in SIZE, "
                             "e.g. 24GiB or 80GB (searches on estimates)")
    memory.add_argument("--process-peak", action="store_true",
                        help="also each mode's peak in a fresh process: growth of the "
                             "resident set on CPU (noisy), max_memory_allocated on CUDA "
                             "(always measured there)")
    memory.add_argument("--no-peak", action="store_true",
                        help="skip every peak-memory figure")
    measure.add_argument("--format", choices=list(FORMATS), default="plain",
                         help="plain text, GitHub markdown or JSON (default: plain)")
    measure.add_argument("--plot", metavar="FILE",
                         help="also draw the figures to FILE (.png, .svg or .pdf; needs "
                              "matplotlib: pip install 'convbn-fx[plot]')")
    measure.add_argument("-q", "--quiet", action="store_true",
                         help="no progress bar (it is shown only on a terminal anyway)")
    measure.add_argument("-v", "--verbose", action="count", default=0,
                         help="log what the library does (-v info, -vv debug)")
    measure.set_defaults(run=_run_measure)


def build_parser(prog: str = "convbn-fx") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check what convbn_fx (Tune mode for conv→BN blocks, arXiv 2305.11624) "
                    "does to a model.",
        epilog=f"examples:\n  {prog} report resnet50 --expect 53 --fail-on-skip\n"
               f"  {prog} measure resnet50 --batch 8\n\n"
               f"run '{prog} report --help' or '{prog} measure --help' for the options.")
    parser.add_argument("-V", "--version", action="version",
                        version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=_Parser)
    report = commands.add_parser(
        "report", help="print rewrite counts per lowering and why blocks are skipped",
        description="Rewrite a model with convbn_fx.tune_mode and report what each conv→BN "
                    "block lowers to.",
        epilog=REPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("spec", metavar="SPEC", help="torchvision name, timm/NAME, "
                        "hf/MODEL_TYPE or package.module:callable")
    report.add_argument("--state", choices=list(STATES), default="finetune",
                        help="module state to rewrite in (default: finetune)")
    report.add_argument("--mode", choices=MODES, default="auto",
                        help="lowering rule: auto (per block, from state) or one forced mode "
                             "(default: auto)")
    report.add_argument("--blocks", action="store_true",
                        help="list every block, not only the skipped ones")
    shape = report.add_argument_group(
        "input (optional): call the rewritten model once on it, and say which path (Tune or "
        "Eval) each block auto lowered to Tune took")
    shape.add_argument("--input", type=input_shape, metavar="SHAPE",
                       help="the whole input shape, e.g. 2x3x64x64")
    shape.add_argument("--batch", type=positive, metavar="N",
                       help="batch size (default 8 with --size)")
    shape.add_argument("--size", type=positive, metavar="S",
                       help="image side: input N x 3 x S x S (default 224 with --batch)")
    report.add_argument("--format", choices=list(FORMATS), default="plain",
                        help="plain text, GitHub markdown (for $GITHUB_STEP_SUMMARY) or JSON "
                             "(default: plain)")
    report.add_argument("--expect", type=block_count, metavar="N",
                        help="exit 1 when fewer than N blocks are folded (Tune or Deploy)")
    report.add_argument("--fail-on-skip", action="store_true",
                        help="exit 1 when any block is skipped (not lowered at all)")
    report.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what the pass does (-v info, -vv debug)")
    report.set_defaults(run=_run_report)
    _add_measure(commands)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("convbn-fx")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"



# -- commands ------------------------------------------------------------------------------


def _run_report(args: argparse.Namespace) -> int:
    model = build_model(args.spec)
    try:
        report = make_report(model, args.spec, args.state, args.mode, _one_shape(args))
    except ModeError as exc:
        sentence = _forced_mode_sentence(exc, args)
        if sentence is None:
            raise
        raise ConvBNError(sentence) from None
    failures = report.failures(args.expect, args.fail_on_skip)
    if args.format == "json":
        sys.stdout.write(format_json(report, failures))
    else:
        sys.stdout.write(format_text(report, args.format, args.blocks))
    sys.stdout.flush()
    for failure in failures:
        print(f"{args.prog}: {failure}", file=sys.stderr)
    return EXIT_MISSED if failures else EXIT_OK


def _forced_mode_sentence(exc: ModeError, args: argparse.Namespace) -> str | None:
    """A forced mode that does not fit the state, said with this command's options (the
    library's sentence names Python calls)."""
    mode, bn = f"--mode {args.mode}", exc.block
    if exc.conflict == BATCH_STATISTICS:  # (a BN without running statistics is skipped)
        return (f"{mode} needs frozen BN, but in --state {args.state} BN {bn} normalises with "
                "batch statistics; use --state finetune (BN frozen), or --mode auto.")
    if exc.conflict == TRAINABLE:
        return (f"{mode} folds BN {bn} into constant weights, but its parameters require "
                f"grad in --state {args.state}; use --state frozen, or --mode tune.")
    return None


def _one_shape(args: argparse.Namespace) -> tuple[int, ...] | None:
    """The shape --input or --batch/--size give (their defaults filling in), None for neither."""
    if args.input and (args.batch or args.size):
        raise ConvBNError("--input and --batch/--size both set the input shape; pass one of "
                          "them.")
    if not (args.input or args.batch or args.size):
        return None
    return args.input or (args.batch or 8, 3, args.size or 224, args.size or 224)


def _input_shapes(args: argparse.Namespace) -> list[tuple[int, ...]]:
    if args.sweep_batch and args.batch:
        raise ConvBNError("--sweep-batch and --batch both set the batch size; pass one of "
                          "them.")
    shape = _one_shape(args) or (8, 3, 224, 224)
    return [(b, *shape[1:]) for b in args.sweep_batch] if args.sweep_batch else [shape]


def _check_fit(args: argparse.Namespace) -> tuple[int, ...]:
    """The input shape after the batch, for --fit; a sentence for what cannot go with it."""
    if args.batch or args.sweep_batch:
        raise ConvBNError("--fit searches the batch size; drop --batch and --sweep-batch.")
    for flag, given in (("--compile", args.compile), ("--no-peak", args.no_peak),
                        ("--process-peak", args.process_peak)):
        if given:
            raise ConvBNError(f"--fit searches on estimates (fake tensors), which {flag} "
                              "cannot go with; drop one of them.")
    if args.input and args.size:
        raise ConvBNError("--input and --size both set the input shape; pass one of them.")
    return tuple(args.input[1:]) if args.input else (3, args.size or 224, args.size or 224)


def _run_measure(args: argparse.Namespace) -> int:
    sample = _check_fit(args) if args.fit else None
    shapes = None if args.fit else _input_shapes(args)
    if args.plot:
        from .plot import check_plot_path  # matplotlib only when a plot is asked for

        check_plot_path(args.plot)  # before minutes of measuring, not after
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bar = ProgressBar(f"measure {args.spec}", enabled=False if args.quiet else None,
                      delay=PROGRESS_DELAY)
    try:
        if args.fit:
            result = fit_batches(args.spec, sample, args.fit, state=args.state,
                                 modes=args.modes, device=device, progress=bar)
        else:
            result = measuring.measure(
                args.spec, shapes, state=args.state, modes=args.modes, device=device,
                compile=args.compile, steps=args.steps, peak=not args.no_peak,
                estimate=args.estimate, process_peak=args.process_peak or None, progress=bar)
    finally:
        bar.close()
    if args.plot:
        from .plot import plot_fit, plot_measurement

        (plot_fit if args.fit else plot_measurement)(result, args.plot)
    if args.format == "json":
        sys.stdout.write((format_fit_json if args.fit else format_measure_json)(result))
    else:
        sys.stdout.write((format_fit_text if args.fit else format_measure_text)(result,
                                                                                args.format))
    sys.stdout.flush()
    if args.plot:
        print(f"{args.prog}: wrote the plot to {args.plot}", file=sys.stderr)
    failed = [] if args.fit else [f"{f.mode} at {'x'.join(map(str, r.shape))}"
                                  for r in result.inputs for f in r.modes.values() if f.error]
    if failed:
        print(f"{args.prog}: out of memory, not measured: {', '.join(failed)}; the other "
              "figures are above.", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def _log_handler(verbose: int) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    handler.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else
                     logging.WARNING)
    # tune_mode's "nothing folds, call bn.eval()" hint: the report shows the counts and
    # reasons itself, and its Python advice is not what a CLI user can type.
    handler.addFilter(lambda record: not getattr(record, NOTHING_FOLDS, False))
    return handler


def main(argv: list[str] | None = None, *, prog: str = "convbn-fx") -> int:
    """Entry point of `convbn-fx` and `python -m convbn_fx`; returns the exit status."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_BAD_INPUT
    args.prog = prog
    # `python -m` puts the current directory on sys.path, a console script does not.
    added_cwd = os.getcwd() not in sys.path and "" not in sys.path
    if added_cwd:
        sys.path.insert(0, os.getcwd())
    pkg_log = logging.getLogger("convbn_fx")
    handler, old_level = _log_handler(args.verbose), pkg_log.level
    pkg_log.addHandler(handler)
    pkg_log.setLevel(handler.level)
    try:
        return args.run(args)
    except ConvBNError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception:  # a bug in convbn_fx (or torch.fx): not the user's input, show it all
        traceback.print_exc()
        print(f"{prog}: internal error (above); please report it with the SPEC that caused it.",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if added_cwd and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())
        pkg_log.removeHandler(handler)
        pkg_log.setLevel(old_level)
