"""`convbn-fx measure`: tables, JSON, saved bytes against testing.saved_tensor_bytes, exact
peaks against bytes counted by hand, `--estimate` against the exact peak, `--fit` against
the estimates at its answer, the progress bar, the plot, and every bad input as exit 2 with
one sentence.

Runs on `cli_models:tiny` (two conv→BN blocks) at tiny inputs, in-process, with `--no-peak`
unless the test is about the peak. Figures that depend on the machine (step time, a
process's resident set) are checked for presence only; saved bytes and peaks are
deterministic and checked exactly.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import convbn_fx
from convbn_fx.kernels.frozen import frozen_fold
from convbn_fx.tools import cli, fit, measure, peak, progress
from convbn_fx.tools.fake import estimate_peak
from convbn_fx.tools.options import MEASURE_SCHEMA_VERSION
from convbn_fx.tools.specs import build_model
from convbn_fx.tools.steps import example_input, make_variant, prepared_model, training_step
from convbn_fx.tools.tensor_peak import tensor_peak
from convbn_fx.tools.testing import finetune_state, saved_tensor_bytes

TESTS = Path(__file__).resolve().parent
TINY = "cli_models:tiny"
FAST = ["--steps", "1", "--no-peak"]
MODE_KEYS = ["mode", "blocks", "saved_bytes", "saved_mib", "peak_bytes", "peak_mib",
             "peak_by_category", "peak_growth_bytes", "process_peak_mib", "step_ms",
             "step_ms_min", "step_ms_max", "step_time_in_noise", "max_abs_diff", "ratio_to_eval",
             "error"]


@pytest.fixture(autouse=True)
def _cli_models_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny steps on a shared machine: a second thread only waits for the neighbours' load
    # (4x slower here). Nothing asserted depends on it: bytes are the same on any thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    assert lines[2].split() == ["mode", "blocks", "saved", "MiB", "×Eval", "step", "ms",
                                "min–max", "×Eval", "max", "Δ", "out"]
    rows = {line.split()[0]: line.split() for line in lines[4:7]}
    assert list(rows) == ["eval", "tune", "deploy"]
    assert rows["eval"][1:3] == ["2", "eval"] and rows["eval"][4] == "1.00"
    assert rows["tune"][1:3] == ["2", "tune"]
    assert rows["deploy"][1:3] == ["2", "folded"]
    assert "peak: not measured." in out
    assert "training those weights directly" in out


def test_json_matches_saved_tensor_bytes(capsys):
    data = measure_json(capsys, TINY, "--input", "2x3x16x16", *FAST)
    assert data["schema_version"] == MEASURE_SCHEMA_VERSION
    assert list(data) == ["schema_version", "spec", "model", "state", "device", "compiled",
                          "steps", "peak_memory", "process_peak", "machine", "inputs", "errors"]
    assert (data["state"], data["device"], data["peak_memory"], data["process_peak"],
            data["errors"]) == ("finetune", "cpu", None, None, [])
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
        assert 0 < m["step_ms_min"] == m["step_ms"] == m["step_ms_max"]  # --steps 1
        assert m["ratio_to_eval"]["step_time"] > 0 and m["step_time_in_noise"] is None
        assert m["peak_mib"] is None and m["peak_by_category"] is None and m["error"] is None
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
    assert all(row.split()[3:8] == ["—"] * 5 and row.split()[8] != "—" for row in rows), out
    assert "not measured: input 4x3x8x8, tune: out of memory" in out


# -- exact peaks: the tensors alive at the step's peak, in bytes -----------------------------


def test_exact_peak_is_the_bytes_counted_by_hand():
    """One Linear layer (no bias), one SGD step: the peak is in backward, when the gradient
    of the output (B x O) and of the weight (O x I, still a temporary: the tracker files it as
    a gradient only once it is accumulated) are alive next to the weight, the input and the
    two loss scalars (the mean, and 0 + mean from sum())."""
    for batch, inputs, outputs in [(8, 32, 16), (64, 256, 512), (4, 1024, 8)]:
        net = torch.nn.Linear(inputs, outputs, bias=False)
        x = torch.randn(batch, inputs)
        peak = tensor_peak(training_step(net, x), net, x)
        weight, grad_out, scalars = 4 * outputs * inputs, 4 * batch * outputs, 2 * 4
        assert peak == {"parameters": weight, "buffers": 0, "gradients": 0, "optimizer": 0,
                        "activations": scalars, "temporaries": grad_out + weight,
                        "input": x.nbytes,
                        "total": weight + x.nbytes + scalars + grad_out + weight}


def test_exact_peak_categories_and_repeatability(capsys):
    argv = (TINY, "--input", "2x3x16x16", "--steps", "1")
    first, second = measure_json(capsys, *argv), measure_json(capsys, *argv)
    assert first["peak_memory"] == "tensors"
    model = finetune_state(build_model(TINY))
    for mode, m in by_mode(first).items():
        assert m == {**by_mode(second)[mode], **{k: m[k] for k in m if k.startswith("step")},
                     "ratio_to_eval": m["ratio_to_eval"]}   # identical but for the clock
        cats = m["peak_by_category"]
        assert sum(cats.values()) == m["peak_bytes"] == round(m["peak_mib"] * 2**20)
        net = make_variant(model, mode)
        assert cats["parameters"] == sum(p.nbytes for p in net.parameters())
        assert cats["buffers"] == sum(b.nbytes for b in net.buffers())
        assert cats["input"] == 2 * 3 * 16 * 16 * 4 and cats["optimizer"] == 0
        assert m["peak_growth_bytes"] == m["peak_bytes"] - cats["parameters"] - \
            cats["buffers"] - cats["input"]
    modes = by_mode(first)
    # Tune keeps one activation per block where Eval keeps two (conv output and BN input).
    assert modes["tune"]["peak_by_category"]["activations"] < \
        modes["eval"]["peak_by_category"]["activations"]


@pytest.mark.parametrize("mode", ["eval", "tune", "deploy"])
def test_one_tracked_step_is_enough(mode):
    """A second step peaks at the same bytes: no gradient is alive at a step's start, the SGD
    keeps no state, and tune's cached fold (of the frozen block) is made in the first."""
    net = make_variant(prepared_model("cli_models:partly_frozen"), mode)
    x = example_input((2, 3, 16, 16))
    one, two = (copy.deepcopy(net), copy.deepcopy(net))
    assert tensor_peak(training_step(one, x), one, x) == \
        tensor_peak(training_step(two, x), two, x, steps=2)


def test_frozen_parameters_are_tracked():
    """MemTracker raises on frozen parameters unless told; tune lowers the frozen block to
    Deploy, whose folded weight (cached between calls) is an activation of the peak."""
    model = prepared_model("cli_models:partly_frozen")
    net = make_variant(model, "tune")
    x = example_input((2, 3, 16, 16))
    peak = tensor_peak(training_step(net, x), net, x)
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(trainable) < len(list(net.parameters()))
    assert peak["parameters"] == sum(p.nbytes for p in net.parameters())
    assert peak["gradients"] <= sum(p.nbytes for p in trainable)


# -- --estimate: the same step on fake tensors ---------------------------------------------


def test_estimate_equals_the_exact_peak(capsys):
    exact = measure_json(capsys, TINY, "--sweep-batch", "1,3", "--size", "16", "--steps", "1")
    estimated = measure_json(capsys, TINY, "--sweep-batch", "1,3", "--size", "16",
                             "--estimate")
    assert estimated["peak_memory"] == "estimated"
    for i in range(2):
        for mode, m in by_mode(estimated, i).items():
            assert m["peak_by_category"] == by_mode(exact, i)[mode]["peak_by_category"]
            assert m["saved_bytes"] is None and m["step_ms"] is None


def test_estimate_of_a_partly_frozen_model():
    """Within a few percent: on fake tensors tune_mode refolds a frozen block on every call
    (it caches only real weights), so the estimate lacks exactly that folded weight."""
    model = prepared_model("cli_models:partly_frozen")
    net = make_variant(model, "tune")
    x = example_input((2, 3, 16, 16))
    fresh = copy.deepcopy(net)
    exact = tensor_peak(training_step(fresh, x), fresh, x)
    estimate = estimate_peak(net, tuple(x.shape))
    conv = model[0]
    folded = conv.weight.nbytes + conv.out_channels * 4   # W·s and b'
    assert exact["total"] - estimate["total"] == exact["activations"] - \
        estimate["activations"] == folded
    assert estimate["total"] == pytest.approx(exact["total"], rel=0.02)


def test_estimate_at_a_size_too_big_to_run(capsys):
    # 4096 x 3 x 1024 x 1024 floats would be 48 GiB for the input alone.
    data = measure_json(capsys, TINY, "--input", "4096x3x1024x1024", "--modes", "tune",
                        "--estimate")
    modes = by_mode(data)
    assert modes["eval"]["peak_by_category"]["input"] == 4096 * 3 * 1024 * 1024 * 4
    assert modes["tune"]["ratio_to_eval"]["peak"] < 0.8
    code, out, err = run(capsys, TINY, "--input", "4096x3x1024x1024", "--estimate")
    assert "peak GiB" in out and "estimated" in out.splitlines()[0]
    assert "not the CUDA caching allocator's reserve and fragmentation" in " ".join(out.split())


def test_fake_tensors_are_not_cached_by_frozen_fold():
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = [torch.randn(8, 3, 3, 3), torch.randn(8), torch.randn(8), torch.rand(8) + 0.5,
            torch.randn(8), torch.randn(8)]
    assert frozen_fold(*real, 1e-5)[0] is frozen_fold(*real, 1e-5)[0]   # cached
    mode = FakeTensorMode()
    fakes = [mode.from_tensor(t) for t in real]
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # FakeTensor.data_ptr() warns (and will raise)
        with mode:
            first, second = frozen_fold(*fakes, 1e-5), frozen_fold(*fakes, 1e-5)
    assert first[0] is not second[0] and first[0].shape == (8, 3, 3, 3)


# -- --fit: the largest batch whose estimate fits -------------------------------------------


def test_largest_batch_search():
    for budget in range(1, 3000, 41):
        for curve in (lambda b: 100 + 7 * b, lambda b: 3 * b * b + b, lambda b: 50 * b):
            batch, probes = fit.largest_batch(curve, budget)
            if batch is None:
                assert curve(1) > budget and list(probes) == [1]
            else:
                assert curve(batch) <= budget < curve(batch + 1)
                assert batch in probes and batch + 1 in probes
    assert fit.largest_batch(lambda b: b, 10**9, limit=64)[0] == 64
    # an affine peak (a CNN step, nearly): four estimates
    assert len(fit.largest_batch(lambda b: 1000 + 37 * b, 10**6)[1]) == 4


def test_fit(capsys):
    code, out, err = run(capsys, TINY, "--size", "16", "--fit", "4MiB")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].endswith("input Bx3x16x16, cpu, largest B within 4 MiB")
    found = [line.split()[:3] for line in lines[2:5]]
    assert [(mode, word) for mode, word, _ in found] == \
        [("eval:", "batch"), ("tune:", "batch"), ("deploy:", "batch")]
    model = prepared_model(TINY)
    for mode, _, batch in found:
        net = make_variant(model, mode.rstrip(":"))
        at, above = (estimate_peak(net, (b, 3, 16, 16))["total"]
                     for b in (int(batch), int(batch) + 1))
        assert at <= 4 * 2**20 < above, mode    # the largest that fits, the next does not
    assert int(found[1][2]) > int(found[0][2])  # Tune fits a bigger batch than Eval


def test_fit_json_and_nothing_fits(capsys):
    data = measure_json(capsys, TINY, "--size", "16", "--fit", "120KiB", "--modes", "eval")
    (m,) = data["modes"]
    assert (data["budget_bytes"], data["sample_shape"], data["peak_memory"]) == \
        (120 * 2**10, [3, 16, 16], "estimated")
    assert m["batch"] is None and m["peak_bytes"] is None
    assert m["next_batch_peak_bytes"] == int(m["probes"]["1"]) > 120 * 2**10
    code, out, err = run(capsys, TINY, "--size", "16", "--fit", "120KiB", "--modes", "eval")
    assert code == 0 and "eval: nothing fits (batch 1 needs" in out


def test_data_dependent_model_cannot_be_estimated(capsys):
    check_bad_input(capsys, ["cli_models:data_dependent", "--input", "2x3x8x8", "--estimate"],
                    "runs an operation whose output size depends on the data "
                    "(aten.nonzero.default;")
    code, out, err = run(capsys, "cli_models:data_dependent", "--input", "2x3x8x8", *FAST)
    assert code == 0   # measured for real, it runs


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
    pytest.param(["--fit", "24"], "argument --fit: expected a memory size with a unit, like "
                 "24GiB (2^30 bytes) or 80GB (10^9 bytes), got '24'", id="fit-no-unit"),
    pytest.param(["--fit", "24G"], "got '24G'", id="fit-which-gigabyte"),
    pytest.param(["--fit", "lots"], "got 'lots'", id="fit-not-a-size"),
    pytest.param(["--fit", "24GiB", "--batch", "8"], "--fit searches the batch size",
                 id="fit-and-batch"),
    pytest.param(["--fit", "24GiB", "--compile"], "which --compile cannot go with",
                 id="fit-and-compile"),
    pytest.param(["--estimate", "--compile"], "drop --compile or --estimate",
                 id="estimate-and-compile"),
    pytest.param(["--estimate", "--no-peak"], "--no-peak skips it", id="estimate-no-peak"),
    pytest.param(["--estimate", "--process-peak"], "pass one of them",
                 id="estimate-and-process-peak"),
    pytest.param(["--plot", "no/such/folder/m.png"], "cannot write the plot to "
                 "'no/such/folder/m.png': the folder 'no/such/folder' does not exist",
                 id="plot-missing-folder"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUT)
def test_bad_input_is_one_sentence(capsys, monkeypatch, argv, message):
    if "does not accept" not in message:   # found before anything is built or measured
        def no_building(*args, **kwargs):
            raise AssertionError("measured before checking its arguments")
        monkeypatch.setattr(measure, "prepared_model", no_building)
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


PLOTS = [pytest.param(["--input", "1x3x8x8", "--steps", "3"], id="bars"),
         pytest.param(["--size", "8", "--sweep-batch", "1,2", "--no-peak"], id="sweep"),
         pytest.param(["--size", "8", "--sweep-batch", "1,2", "--estimate"], id="sweep-estimate"),
         pytest.param(["--size", "8", "--fit", "1MiB"], id="fit")]


@pytest.mark.parametrize("argv", PLOTS)
def test_plot_writes_a_png(capsys, tmp_path, argv):
    pytest.importorskip("matplotlib")
    path = tmp_path / "measure.png"
    code, out, err = run(capsys, TINY, *argv, "--plot", str(path))
    assert (code, err) == (0, f"convbn-fx: wrote the plot to {path}\n")
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n")


# -- the progress bar -------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty,quiet,drawn,tqdm", [(True, False, True, True),
                                                  (True, False, True, False),
                                                  (True, True, False, False),
                                                  (False, False, False, False)],
                         ids=["tty-tqdm", "tty-plain", "tty-quiet", "not-a-tty"])
def test_progress_bar_only_on_a_terminal(capsys, monkeypatch, tty, quiet, drawn, tqdm):
    if tqdm and not progress.have_tqdm():
        pytest.skip("tqdm is not installed")
    monkeypatch.setenv("COLUMNS", "200")   # no line cut short
    monkeypatch.setattr(progress, "have_tqdm", lambda: tqdm)
    stderr = FakeTerminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(cli, "PROGRESS_DELAY", 0.0)   # draw from the first phase
    code = cli.main(["measure", TINY, "--input", "1x3x8x8", "--steps", "2", "--no-peak"]
                    + (["-q"] if quiet else []))
    assert code == 0
    text = stderr.getvalue()
    if not drawn:
        assert text == ""
        return
    # Build, 3 rewrites, the reference output; then per mode: output check, saved bytes,
    # a warm-up and the 2 steps asked for (named as such: "timed step 2/2").
    assert "measure cli_models:tiny" in text
    assert " 0/20 " in text and "building cli_models:tiny" in text
    assert " 1/20 " in text and "eval: rewriting" in text
    assert "tune: output check" in text and "deploy: timed step 2/2" in text
    assert " 20/20 " in text and "done" in text
    clock = r"\[\d\d:\d\d<" if tqdm else r" \d:\d\d<\d:\d\d "   # elapsed<left
    assert re.search(clock, text), text
    assert text.endswith("\r") or text.endswith("\x1b[A") or "\r" in text[-300:]  # erased


@pytest.mark.parametrize("tqdm", [True, False], ids=["tqdm", "plain"])
def test_progress_bar_draws_during_a_long_phase(monkeypatch, tqdm):
    """Nothing before `delay`; then redrawn by its own thread while a phase goes on."""
    if tqdm and not progress.have_tqdm():
        pytest.skip("tqdm is not installed")
    stream = FakeTerminal()
    bar = progress.ProgressBar("measure x", stream, delay=0.2, tick=0.02, use_tqdm=tqdm)
    bar(0, 4, "building x")   # before the delay: nothing yet
    assert stream.getvalue() == ""
    for _ in range(500):      # at most 5 s on a loaded machine
        if bar.drawn:
            break
        time.sleep(0.01)
    bar.close()
    text = stream.getvalue()
    assert "measure x" in text and "0/4" in text and "building x" in text


def test_progress_bar_on_a_real_terminal():
    """End to end on a pseudo-terminal: the real entry point, drawing from the start."""
    main, secondary = pty.openpty()
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1",   # as _one_thread
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    argv = ["measure", TINY, "--input", "1x3x8x8", "--modes", "tune", "--steps", "2",
            "--format", "json"]
    code = ("import sys; from convbn_fx.tools import cli; cli.PROGRESS_DELAY = 0.0; "
            f"sys.exit(cli.main({argv!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=secondary, env=env, cwd=TESTS)
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
    assert "measure cli_models:tiny" in terminal and "building cli_models:tiny" in terminal
    # build, 2 rewrites, the reference; 2 modes x (check, saved, exact peak, warm-up, 2 steps)
    assert "16/16" in terminal and "tune: exact peak" in terminal
    assert all(m["peak_bytes"] > 0 for m in by_mode(json.loads(out)).values())


def test_process_peak_column(capsys, monkeypatch):
    monkeypatch.setattr(measure, "peak_memory", lambda spec, mode, *a: (12.5, None))
    data = measure_json(capsys, TINY, "--input", "1x3x8x8", "--steps", "1", "--process-peak")
    assert data["process_peak"] == "rss_growth"
    assert {m["process_peak_mib"] for m in by_mode(data).values()} == {12.5}
    code, out, err = run(capsys, TINY, "--input", "1x3x8x8", "--steps", "1", "--process-peak")
    assert out.splitlines()[2].split()[8:10] == ["RSS", "MiB"] and "fresh process" in out


def test_process_peak_in_a_fresh_process():
    mib, error = peak.peak_memory(TINY, "tune", (1, 3, 8, 8))
    assert error is None and isinstance(mib, float) and mib >= 0


def test_help(capsys):
    code = cli.main(["measure", "--help"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert "convbn-fx measure resnet50 --batch 8" in out and "--sweep-batch" in out
    assert "--estimate" in out and "--fit SIZE" in out and "convbn-fx measure resnet50 --fit " \
        "24GiB --estimate" in out
