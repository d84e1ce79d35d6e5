"""`convbn-fx report`: golden outputs, every exit status, the JSON schema, both entry points.

Most tests call `convbn_fx.tools.cli.main` in-process (torch is imported once); two run the real
`python -m convbn_fx` and console script. Golden files live in tests/golden/; after an
intended change of the output, regenerate them with CONVBN_FX_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import convbn_fx
from convbn_fx.tools import cli
from convbn_fx.tools import report as report_module
from convbn_fx.tools.options import SCHEMA_VERSION
from convbn_fx.tools.report import make_report
from convbn_fx.tools.specs import build_model
from convbn_fx.tools.testing import finetune_state
from convbn_fx import BlockInfo
from convbn_fx import Mode

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "golden"
UPDATE = os.environ.get("CONVBN_FX_UPDATE_GOLDEN") == "1"
SKIPPY = "cli_models:skippy"    # 5 blocks: 2 fold (tune), 3 skipped


@pytest.fixture(autouse=True)
def _cli_models_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def report_json(capsys, *argv: str) -> dict:
    code, out, err = run(capsys, "report", *argv, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing {path}; run with CONVBN_FX_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"output differs from {path}"


# -- golden outputs -------------------------------------------------------------------------

GOLDEN_CASES = [
    pytest.param(["resnet18"], "resnet18.txt", id="resnet18-plain"),
    pytest.param(["resnet18", "--format", "github"], "resnet18.md", id="resnet18-github"),
    pytest.param([SKIPPY, "--blocks"], "skippy_blocks.txt", id="skipped-plain-blocks"),
    pytest.param([SKIPPY, "--format", "github"], "skippy.md", id="skipped-github"),
    pytest.param([SKIPPY, "--format", "json"], "skippy.json", id="skipped-json"),
]


@pytest.mark.parametrize("argv,golden", GOLDEN_CASES)
def test_golden_output(capsys, argv, golden):
    code, out, err = run(capsys, "report", *argv)
    assert (code, err) == (0, "")
    check_golden(golden, out)


# -- counts on real models ------------------------------------------------------------------

STATE_COUNTS = [
    pytest.param("finetune", {"tune": 20}, id="finetune-tune"),
    pytest.param("train", {"train": 20}, id="train-train"),
    pytest.param("eval", {"tune": 20}, id="eval-tune"),       # eval, but parameters train
    pytest.param("frozen", {"deploy": 20}, id="frozen-deploy"),
]


@pytest.mark.parametrize("state,expected", STATE_COUNTS)
def test_state_picks_lowering(capsys, state, expected):
    counts = report_json(capsys, "resnet18", "--state", state)["counts"]
    per_mode = {k: v for k, v in counts.items() if k in {m.value for m in Mode} and v}
    assert per_mode == expected
    assert counts["total"] == 20 and counts["skipped"] == 0


def test_resnet50_folds_53_blocks(capsys):
    code, out, err = run(capsys, "report", "resnet50", "--expect", "53", "--fail-on-skip")
    assert (code, err) == (0, "")
    assert "53 blocks, 53 folded, 0 skipped" in out


def test_fasterrcnn_is_traced_in_parts(capsys):
    # weights_backbone=None makes torchvision use plain BatchNorm2d, every layer trainable.
    data = report_json(capsys, "fasterrcnn_resnet50_fpn")
    assert (data["model"], data["traced_whole"], data["parts"]) == \
        ("FasterRCNN", False, ["backbone"])
    assert data["counts"]["tune"] == data["counts"]["total"] == 53
    assert {b["kind"] for b in data["blocks"]} == {"Conv2d+BatchNorm2d"}


def test_frozen_batchnorm_fasterrcnn(capsys):
    # As built for a pretrained backbone: FrozenBatchNorm2d, conv1 and layer1 frozen.
    data = report_json(capsys, "cli_models:frozen_bn_fasterrcnn")
    c = data["counts"]
    assert (c["tune"], c["deploy"], c["skipped"]) == (42, 11, 0)
    assert {b["kind"] for b in data["blocks"]} == {"Conv2d+FrozenBatchNorm2d"}
    deployed = {b["conv"] for b in data["blocks"] if b["lowering"] == "deploy"}
    assert all(name.startswith(("backbone.body.conv1", "backbone.body.layer1."))
               for name in deployed)


FORCED = [
    pytest.param("eval", "eval", id="eval"),
    pytest.param("train", "train", id="train"),
    pytest.param("tune", "tune", id="tune"),
]


@pytest.mark.parametrize("mode,lowering", FORCED)
def test_forced_mode(capsys, mode, lowering):
    data = report_json(capsys, SKIPPY, "--mode", mode)
    assert data["mode"] == mode
    assert [b["lowering"] for b in data["blocks"]] == [lowering, None, None, None, lowering]


# -- exit status ----------------------------------------------------------------------------

CHECKS = [
    pytest.param([SKIPPY], 0, None, id="ok"),
    pytest.param([SKIPPY, "--expect", "2"], 0, None, id="expect-met-exactly"),
    pytest.param([SKIPPY, "--expect", "3"], 1, "expected at least 3 folded blocks, found 2",
                 id="expect-missed"),
    pytest.param([SKIPPY, "--fail-on-skip"], 1, "3 blocks skipped", id="fail-on-skip"),
    pytest.param([SKIPPY, "--mode", "eval", "--expect", "1"], 1, "found 0",
                 id="eval-is-not-folded"),
    pytest.param(["resnet18", "--state", "train", "--expect", "1"], 1, "found 0",
                 id="train-state-folds-nothing"),
    pytest.param(["cli_models:no_blocks", "--expect", "0", "--fail-on-skip"], 0, None,
                 id="no-blocks-ok"),
    pytest.param(["cli_models:no_blocks", "--expect", "1"], 1, "found 0", id="no-blocks-missed"),
]


@pytest.mark.parametrize("argv,code,message", CHECKS)
def test_checks_exit_status(capsys, argv, code, message):
    got, out, err = run(capsys, "report", *argv)
    assert got == code
    assert out.startswith("convbn-fx report: ")  # the report is printed either way
    if message is None:
        assert err == ""
    else:
        assert err.count("\n") == 1 and err.startswith("convbn-fx: ") and message in err


BAD_INPUT = [
    pytest.param(["report", "resnt50"], "unknown torchvision model 'resnt50' (did you mean "
                 "resnet50", id="unknown-model"),
    pytest.param(["report", "no_such_pkg.models:build"], "could not import 'no_such_pkg."
                 "models' (ModuleNotFoundError", id="import-failure"),
    pytest.param(["report", "cli_models:nope"], "'cli_models' has no attribute 'nope'",
                 id="missing-attribute"),
    pytest.param(["report", "cli_models:broken_import_error"], "is not callable (NoneType)",
                 id="not-callable"),
    pytest.param(["report", "cli_models:not_a_module"], "returned a dict, not an nn.Module",
                 id="not-a-module"),
    pytest.param(["report", "torch.nn:Conv2d"], "torch.nn:Conv2d needs arguments",
                 id="needs-arguments"),
    pytest.param(["report", "cli_models:broken"], "raised RuntimeError: the checkpoint path",
                 id="builder-raises"),
    pytest.param(["report", "cli_models:"], "should look like package.module:callable",
                 id="empty-callable"),
    pytest.param(["report", SKIPPY, "--mode", "deploy"],
                 "--mode deploy folds BN bn1 into constant weights, but its parameters require "
                 "grad in --state finetune; use --state frozen, or --mode tune.",
                 id="deploy-while-training"),
    pytest.param(["report", SKIPPY, "--state", "eval", "--mode", "deploy"],
                 "grad in --state eval; use --state frozen, or --mode tune.",
                 id="deploy-in-eval"),
    pytest.param(["report", SKIPPY, "--state", "train", "--mode", "tune"],
                 "--mode tune needs frozen BN, but in --state train BN bn1 normalises with batch "
                 "statistics; use --state finetune (BN frozen), or --mode auto.",
                 id="tune-with-batch-stats"),
    pytest.param(["report", SKIPPY, "--state", "train", "--mode", "deploy"],
                 "--mode deploy needs frozen BN", id="deploy-with-batch-stats"),
    pytest.param(["report", SKIPPY, "--state", "train", "--mode", "eval"],
                 "--mode eval needs frozen BN", id="eval-with-batch-stats"),

    pytest.param(["report", SKIPPY, "--state", "bogus"], "invalid choice: 'bogus'",
                 id="bad-state"),
    pytest.param(["report", SKIPPY, "--mode", "auto-ish"], "invalid choice: 'auto-ish'",
                 id="bad-mode"),
    pytest.param(["report", SKIPPY, "--format", "xml"], "invalid choice: 'xml'",
                 id="bad-format"),
    pytest.param(["report", SKIPPY, "--expect", "-1"], "expected a block count",
                 id="negative-expect"),
    pytest.param(["report", SKIPPY, "--expect", "many"], "expected a block count",
                 id="non-integer-expect"),
    pytest.param(["report"], "the following arguments are required: SPEC", id="no-spec"),
    pytest.param([], "the following arguments are required: COMMAND", id="no-command"),
    pytest.param(["frob"], "invalid choice: 'frob'", id="unknown-command"),
    pytest.param(["report", SKIPPY, "--bogus"], "unrecognized arguments: --bogus",
                 id="unknown-option"),
    pytest.param(["report", "timm/efficientnet_b9"], "unknown timm model 'efficientnet_b9' "
                 "(did you mean efficientnet_b8", id="unknown-timm-model"),
    pytest.param(["report", "timm/"], "unknown timm model ''", id="empty-timm-name"),
    pytest.param(["report", SKIPPY, "--input", "2x3x8x8", "--size", "8"],
                 "--input and --batch/--size both set the input shape", id="input-and-size"),
    pytest.param(["report", SKIPPY, "--input", "2x5x8x8"], "does not accept an input of shape "
                 "2x5x8x8", id="input-rejected"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUT)
def test_bad_input_is_one_sentence(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err          # one line: no usage block, no traceback
    assert err.startswith("convbn-fx") and err.rstrip().endswith((".", "?")), err
    assert message in err
    for python in ("requires_grad_", "mode='", ".eval()"):  # CLI words, not the library's
        assert python not in err, err


# -- timm SPECs -------------------------------------------------------------------------------

TIMM_SPECS = ["timm/test_resnet", "timm/test_efficientnet", "timm/test_efficientnet.r160_in1k"]


@pytest.mark.parametrize("spec", TIMM_SPECS)
def test_timm_spec(capsys, spec):
    # Built with pretrained=False (nothing downloaded). Fold counts are not asserted: how
    # timm's BatchNormAct2d folds is another issue's work.
    data = report_json(capsys, spec)
    assert data["spec"] == spec
    assert data["model"] == ("ResNet" if "resnet" in spec else "EfficientNet")
    assert data["counts"]["total"] == len(data["blocks"])


def test_timm_not_installed(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)   # as if not installed
    code, out, err = run(capsys, "report", "timm/resnet18")
    assert (code, out) == (2, "")
    assert err == "convbn-fx: timm/resnet18 names a timm model but timm is not installed; " \
                  "pip install timm.\n"


# -- Hugging Face SPECs -----------------------------------------------------------------------

@pytest.mark.parametrize("spec, model, folded", [
    ("hf/mobilenet_v1", "MobileNetV1Model", 27),   # apply_tf_padding becomes a leaf
    ("hf/MobileNetV2Config", "MobileNetV2Model", 52),
])
def test_hf_spec(capsys, spec, model, folded):
    """A model type or config class, from its default config, offline; every block folds."""
    pytest.importorskip("transformers")
    data = report_json(capsys, spec, "--expect", str(folded))
    assert (data["model"], data["counts"]["tune"], data["counts"]["total"]) == \
        (model, folded, folded)


def test_hf_unknown_name_is_one_sentence(capsys):
    pytest.importorskip("transformers")
    code, out, err = run(capsys, "report", "hf/mobilenetv2")
    assert (code, out) == (2, "")
    assert err.startswith("convbn-fx: unknown transformers model type or config class "
                          "'mobilenetv2' (did you mean mobilenet_v2"), err
    assert err.count("\n") == 1


def test_timm_imported_only_for_timm_specs():
    code = ("import sys; from convbn_fx.tools import cli; "
            "assert cli.main(['report', 'cli_models:skippy']) == 0; "
            "assert 'timm' not in sys.modules; "
            "assert cli.main(['report', 'timm/test_resnet']) == 0; "
            "assert 'timm' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=TESTS, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_internal_error_is_not_bad_input(capsys, monkeypatch):
    def boom(module):
        raise RuntimeError("a bug")

    monkeypatch.setattr(report_module, "describe", boom)
    code, out, err = run(capsys, "report", SKIPPY)
    assert code == 3
    assert "Traceback" in err and "internal error" in err


@pytest.mark.parametrize("argv", [["--help"], ["report", "--help"], ["--version"]],
                         ids=["help", "report-help", "version"])
def test_help_exits_zero(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert (code, err) == (0, "")
    if argv == ["report", "--help"]:
        assert "convbn-fx report resnet50 --expect 53 --fail-on-skip" in out
    if argv == ["--version"]:
        assert out.strip() == f"convbn-fx {convbn_fx.__version__}"


# -- JSON -----------------------------------------------------------------------------------


@pytest.mark.per_call
def test_report_input_says_which_path_each_block_took(capsys):
    """At 2x3x128x128 resnet18's layer4 convs have 16,384 outputs to 2.4M weights: Eval; the
    stem's 524,288 outputs are 56x its weight: Tune. Without --input no path is given."""
    data = report_json(capsys, "resnet18", "--input", "2x3x128x128")
    blocks = {b["bn"]: b for b in data["blocks"]}
    assert data["input"] == [2, 3, 128, 128] and data["counts"]["tune"] == 20
    assert (blocks["bn1"]["path"], blocks["layer4.1.bn2"]["path"]) == ("tune", "eval")
    assert "2,359,296" in blocks["layer4.1.bn2"]["path_reason"]
    assert sum(data["paths"].values()) == 20
    code, out, _ = run(capsys, "report", "resnet18", "--batch", "2", "--size", "128", "--blocks")
    assert code == 0 and "One call on 2x3x128x128" in out and "path" in out
    assert "path" not in report_json(capsys, "resnet18")["blocks"][0]


def test_json_round_trip(capsys):
    code, out, err = run(capsys, "report", SKIPPY, "--format", "json", "--expect", "3",
                         "--fail-on-skip")
    assert code == 1
    data = json.loads(out)
    assert json.dumps(data, indent=2) + "\n" == out
    assert list(data) == ["schema_version", "spec", "model", "state", "mode", "traced_whole",
                          "parts", "counts", "blocks", "failures"]
    assert data["schema_version"] == SCHEMA_VERSION
    assert len(data["failures"]) == 2 and err.count("\n") == 2

    # The blocks read back are exactly what describe() says of the same model.
    blocks = [BlockInfo(b["conv"], b["bn"], b["kind"],
                        Mode(b["lowering"]) if b["lowering"] else None, b["reason"])
              for b in data["blocks"]]
    model = build_model(SKIPPY)
    assert blocks == convbn_fx.describe(finetune_state(model))
    report = make_report(build_model(SKIPPY), SKIPPY)
    assert report.counts() == data["counts"]
    assert report.blocks == blocks


# -- logging and entry points ---------------------------------------------------------------


def test_quiet_by_default_verbose_logs(capsys):
    code, _, err = run(capsys, "report", SKIPPY)
    assert (code, err) == (0, "")
    code, _, err = run(capsys, "report", SKIPPY, "-v")
    assert code == 0 and "convbn_fx.frontends.tune: INFO: convbn_fx rewrote Skippy" in err


def test_python_dash_m(tmp_path):
    # cwd=tests: `python -m` finds cli_models on the current directory.
    proc = subprocess.run([sys.executable, "-m", "convbn_fx", "report", SKIPPY, "--format",
                           "json"], cwd=TESTS, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["counts"]["skipped"] == 3


def test_console_script():
    script = Path(sys.executable).parent / "convbn-fx"
    if not script.exists():
        pytest.skip("console script not installed (pip install -e .)")
    # A console script does not put the current directory on sys.path; the CLI does.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(script), "report", SKIPPY, "--fail-on-skip"], cwd=TESTS,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    assert proc.stderr == "convbn-fx: 3 blocks skipped (--fail-on-skip); the report lists " \
                          "the reasons.\n"
    assert "3 skipped" in proc.stdout
