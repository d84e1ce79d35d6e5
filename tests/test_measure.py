"""`convbn-fx measure`: tables, JSON, saved bytes against testing.saved_tensor_bytes, the
progress bar, the plot, and every bad input as exit 2 with one sentence.

Runs on `cli_models:tiny` (two conv→BN blocks) at tiny inputs, in-process with `--no-peak`
unless the test is about the fresh-process peak. Figures that depend on the machine (peak
memory, step time) are checked for presence only; saved bytes are deterministic and checked
exactly.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convbn_fx
from convbn_fx.tools import cli, measure
from convbn_fx.tools.options import SCHEMA_VERSION
from convbn_fx.tools.specs import build_model
from convbn_fx.tools.testing import finetune_state, saved_tensor_bytes

TESTS = Path(__file__).resolve().parent
TINY = "cli_models:tiny"
FAST = ["--steps", "1", "--no-peak"]
MODE_KEYS = ["mode", "blocks", "saved_bytes", "saved_mib", "peak_mib", "step_ms",
             "max_abs_diff", "ratio_to_eval", "error"]


@pytest.fixture(autouse=True)
def _cli_models_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["measure", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def measure_json(capsys, *argv: str, quiet: bool = True) -> dict:
    code, out, err = run(capsys, *argv, "--format", "json")
    assert code == 0, err
    assert err == "" or not quiet, err
    return json.loads(out)


def by_mode(data: dict, i: int = 0) -> dict[str, dict]:
    return {m["mode"]: m for m in data["inputs"][i]["modes"]}


# -- what is measured -----------------------------------------------------------------------


def test_table(capsys):
    code, out, err = run(capsys, TINY, "--input", "2x3x16x16", *FAST)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "convbn-fx measure: cli_models:tiny (Sequential), state finetune, " \
                       "input 2x3x16x16, cpu"
    assert lines[2].split()[:4] == ["mode", "blocks", "saved", "MiB"]
    rows = {line.split()[0]: line.split() for line in lines[4:7]}
    assert list(rows) == ["eval", "tune", "deploy"]
    assert rows["eval"][1:3] == ["2", "eval"] and rows["eval"][4] == "1.00"
    assert rows["tune"][1:3] == ["2", "tune"]
    assert rows["deploy"][1:3] == ["2", "folded"]
    assert "peak: not measured." in out
    assert "training those weights directly" in out


def test_json_matches_saved_tensor_bytes(capsys):
    data = measure_json(capsys, TINY, "--input", "2x3x16x16", *FAST)
    assert data["schema_version"] == SCHEMA_VERSION
    assert list(data) == ["schema_version", "spec", "model", "state", "device", "compiled",
                          "steps", "peak_memory", "machine", "inputs", "errors"]
    assert (data["state"], data["device"], data["peak_memory"], data["errors"]) == \
        ("finetune", "cpu", None, [])
    assert data["inputs"][0]["shape"] == [2, 3, 16, 16]
    modes = by_mode(data)
    assert list(modes) == ["eval", "tune", "deploy"]
    assert all(list(m) == MODE_KEYS for m in modes.values())
    assert [m["blocks"] for m in modes.values()] == [{"eval": 2}, {"tune": 2}, {"folded": 2}]

    # The same bytes, counted here on variants built independently of the CLI.
    x = torch.randn(2, 3, 16, 16)
    model = finetune_state(build_model(TINY))
    variants = {"eval": convbn_fx.tune_mode(model, "eval"), "tune": convbn_fx.tune_mode(model),
                "deploy": convbn_fx.deploy_mode(model)}
    expected = {k: saved_tensor_bytes(lambda m=m: m(x).mean()) for k, m in variants.items()}
    assert {k: m["saved_bytes"] for k, m in modes.items()} == expected
    assert expected["tune"] < expected["eval"]   # Tune keeps no conv output for BN
    for k, m in modes.items():
        assert m["ratio_to_eval"]["saved"] == pytest.approx(expected[k] / expected["eval"])
        assert m["saved_mib"] == pytest.approx(expected[k] / 2**20)
        assert m["step_ms"] > 0 and m["ratio_to_eval"]["step_time"] > 0
        assert m["peak_mib"] is None and m["error"] is None
        # Same dropout masks in every mode: only rounding separates them from the original.
        assert 0 <= m["max_abs_diff"] < 1e-5


def test_frozen_state_is_inference(capsys):
    data = measure_json(capsys, TINY, "--input", "2x3x8x8", "--state", "frozen", *FAST)
    modes = by_mode(data)
    assert [m["blocks"] for m in modes.values()] == [{"eval": 2}, {"deploy": 2}, {"folded": 2}]
    assert {m["saved_bytes"] for m in modes.values()} == {0}
    assert {m["ratio_to_eval"]["saved"] for m in modes.values()} == {None}
    assert all(m["step_ms"] > 0 for m in modes.values())


def test_modes_always_include_eval(capsys):
    data = measure_json(capsys, TINY, "--input", "1x3x8x8", "--modes", "tune", *FAST)
    assert list(by_mode(data)) == ["eval", "tune"]


def test_batch_sweep(capsys):
    data = measure_json(capsys, TINY, "--sweep-batch", "1,3", "--size", "8", *FAST)
    assert [r["shape"] for r in data["inputs"]] == [[1, 3, 8, 8], [3, 3, 8, 8]]
    one, three = by_mode(data, 0), by_mode(data, 1)
    for mode in ("eval", "tune", "deploy"):
        assert three[mode]["saved_bytes"] > one[mode]["saved_bytes"]
    code, out, err = run(capsys, TINY, "--sweep-batch", "1,3", "--size", "8", *FAST)
    assert code == 0 and "input Bx3x8x8, B in 1, 3" in out
    assert [line.split()[:2] for line in out.splitlines()[4:10]] == \
        [[b, m] for b in ("1", "3") for m in ("eval", "tune", "deploy")]


def test_github_format(capsys):
    code, out, err = run(capsys, TINY, "--input", "1x3x8x8", "--format", "github", *FAST)
    assert code == 0
    assert out.startswith("### convbn-fx measure: `cli_models:tiny`")
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 5 and len({line.count("|") for line in table}) == 1


def test_timm_spec(capsys):
    data = measure_json(capsys, "timm/test_resnet", "--input", "1x3x32x32", "--modes", "tune",
                        *FAST)
    assert (data["spec"], data["model"]) == ("timm/test_resnet", "ResNet")
    assert all(m["saved_bytes"] > 0 for m in by_mode(data).values())


@pytest.mark.slow   # inductor compiles four graphs: about 30 s on two cores
def test_compile(capsys):
    # torch.compile may warn on stderr (no CUDA runtime, ...): that is torch's, not ours.
    data = measure_json(capsys, TINY, "--input", "1x3x8x8", "--modes", "tune", "--compile",
                        *FAST, quiet=False)
    assert data["compiled"] is True
    modes = by_mode(data)
    assert modes["tune"]["blocks"] == {"tune": 2}
    assert all(m["saved_bytes"] > 0 and m["max_abs_diff"] < 1e-5 for m in modes.values())


# -- out of memory: reported per mode, the run goes on -------------------------------------


def test_out_of_memory_is_reported_and_the_run_goes_on(capsys):
    code, out, err = run(capsys, "cli_models:oom_from_batch_4", "--sweep-batch", "2,4",
                         "--size", "8", "--format", "json", *FAST)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("convbn-fx: out of memory, not measured: "
                                                   "eval at 4x3x8x8, tune at 4x3x8x8, deploy at "
                                                   "4x3x8x8;")
    data = json.loads(out)
    ok, failed = by_mode(data, 0), by_mode(data, 1)
    assert all(m["error"] is None and m["saved_bytes"] > 0 for m in ok.values())
    assert all(m["error"].startswith("out of memory (OutOfMemoryError: CUDA out of memory")
               and m["saved_bytes"] is None and m["step_ms"] is None for m in failed.values())
    assert len(data["errors"]) == 3


def test_out_of_memory_table(capsys):
    code, out, err = run(capsys, "cli_models:oom_from_batch_4", "--input", "4x3x8x8", *FAST)
    assert code == 2 and err.count("\n") == 1
    rows = out.splitlines()[4:7]
    # The output check runs without grad, so it is measured; the training figures are not.
    assert all(row.split()[3:9] == ["—"] * 6 and row.split()[9] != "—" for row in rows), out
    assert "not measured: input 4x3x8x8, tune: out of memory" in out


# -- bad input: exit 2, one sentence, nothing on stdout ------------------------------------

BAD_INPUT = [
    pytest.param(["--input", "8x3x"], "argument --input: expected sizes joined by x",
                 id="unparsable-input"),
    pytest.param(["--input", "2x1x8x8"], "cli_models:tiny does not accept an input of shape "
                 "2x1x8x8 (RuntimeError: Given groups=1", id="wrong-shape"),
    pytest.param(["--input", "2x3x8x8", "--batch", "4"], "both set the input shape",
                 id="input-and-batch"),
    pytest.param(["--sweep-batch", "2,4", "--batch", "4"], "both set the batch size",
                 id="sweep-and-batch"),
    pytest.param(["--sweep-batch", "2,four"], "expected batch sizes joined by commas",
                 id="bad-sweep"),
    pytest.param(["--modes", "tune,fast"], "unknown mode 'fast'", id="bad-mode"),
    pytest.param(["--steps", "0"], "expected a whole number, 1 or more", id="zero-steps"),
    pytest.param(["--state", "train"], "invalid choice: 'train'", id="bad-state"),
    pytest.param(["--plot", "figure.gif"], "cannot tell the image type of 'figure.gif'",
                 id="bad-plot-type"),
    pytest.param(["--format", "xml"], "invalid choice: 'xml'", id="bad-format"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUT)
def test_bad_input_is_one_sentence(capsys, argv, message):
    check_bad_input(capsys, [TINY, *argv], message)


def check_bad_input(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err          # one line: no usage block, no traceback
    assert err.startswith("convbn-fx") and err.rstrip().endswith((".", "?")), err
    assert message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(capsys):
    check_bad_input(capsys, [TINY, "--device", "cuda"], "CUDA is not available: torch ")


@pytest.mark.parametrize("spec,message", [
    pytest.param("timm/efficientnet_b9", "unknown timm model 'efficientnet_b9' (did you mean "
                 "efficientnet_b8", id="unknown-timm"),
    pytest.param("resnt18", "unknown torchvision model 'resnt18' (did you mean resnet18",
                 id="unknown-torchvision"),
    pytest.param("cli_models:not_a_module", "returned a dict, not an nn.Module",
                 id="not-a-module"),
])
def test_bad_spec(capsys, spec, message):
    check_bad_input(capsys, [spec], message)


def test_plot_without_matplotlib(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # as if not installed
    check_bad_input(capsys, [TINY, "--plot", str(tmp_path / "m.png")],
                    "--plot needs matplotlib, which is not installed: pip install "
                    "'convbn-fx[plot]'")
    assert not (tmp_path / "m.png").exists()


# -- the plot ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sweep", [[], ["--sweep-batch", "1,2"]], ids=["bars", "sweep"])
def test_plot_writes_a_png(capsys, tmp_path, sweep):
    pytest.importorskip("matplotlib")
    path = tmp_path / "measure.png"
    shape = ["--size", "8"] if sweep else ["--input", "1x3x8x8"]
    code, out, err = run(capsys, TINY, *shape, *sweep, "--plot", str(path), *FAST)
    assert (code, err) == (0, "")
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n")


# -- the progress bar -------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty,quiet,drawn", [(True, False, True), (True, True, False),
                                             (False, False, False)],
                         ids=["tty", "tty-quiet", "not-a-tty"])
def test_progress_bar_only_on_a_terminal(capsys, monkeypatch, tty, quiet, drawn):
    monkeypatch.setenv("COLUMNS", "200")   # no line cut short
    stderr = FakeTerminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(cli, "PROGRESS_DELAY", 0.0)   # draw from the first step
    code = cli.main(["measure", TINY, "--input", "1x3x8x8", "--steps", "2", "--no-peak"]
                    + (["-q"] if quiet else []))
    assert code == 0
    text = stderr.getvalue()
    if drawn:
        # eval, tune, deploy: output check, saved bytes, warm-up and 2 steps each.
        assert "measure cli_models:tiny [####################] 15/15 steps  deploy: timing" \
            in text
        assert " 3/15 steps  tune: output check" in text
        assert text.endswith("\r")   # erased again before the table
    else:
        assert text == ""


def test_progress_bar_on_a_real_terminal():
    """End to end on a pseudo-terminal, with the fresh-process peak (a few seconds)."""
    main, secondary = pty.openpty()
    env = {**os.environ, "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    proc = subprocess.Popen([sys.executable, "-m", "convbn_fx", "measure", TINY, "--input",
                             "1x3x8x8", "--modes", "tune", "--steps", "2", "--format", "json"],
                            stdout=subprocess.PIPE, stderr=secondary, env=env, cwd=TESTS)
    os.close(secondary)
    chunks = []
    while True:   # read the terminal while the process runs (a full pty would block it)
        ready, _, _ = select.select([main], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(main, 4096)
            except OSError:   # the process closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif proc.poll() is not None:
            break
    out = proc.stdout.read()
    proc.wait(timeout=60)
    os.close(main)
    terminal = b"".join(chunks).decode()
    assert proc.returncode == 0, terminal
    assert "measure cli_models:tiny [" in terminal
    assert "12/12 steps  tune: timing" in terminal  # 2 modes x (check, saved, peak, 1 + 2 steps)
    data = json.loads(out)
    assert data["peak_memory"] == "rss_growth"
    assert all(isinstance(m["peak_mib"], float) and m["peak_mib"] >= 0
               for m in by_mode(data).values())


def test_help(capsys):
    code = cli.main(["measure", "--help"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert "convbn-fx measure resnet50 --batch 8" in out and "--sweep-batch" in out
