"""Smoke tests: every example in examples/ runs with small arguments and passes its own check.

Each example asserts its result itself (exit code 1 when the rewritten model and the
unrewritten one disagree), so a test runs it as a user would and checks the exit code and the
line that reports the result. Arguments are shrunk so the whole file stays well under two
minutes on two CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

CASES = [
    pytest.param("finetune_classification.py",
                 ["--steps", "3", "--batch-size", "4", "--image-size", "128"],
                 ["auto picked tune", "OK: loss curves agree"], id="finetune_classification"),
    pytest.param("detection_frozen_bn.py",
                 ["--steps", "1", "--batch-size", "1", "--min-size", "96", "--max-size", "128"],
                 ["53 conv-BN blocks folded: 11 deploy, 42 tune", "RPN losses) within 2x",
                  "OK: tune_mode computes"], id="detection_frozen_bn"),
    pytest.param("adversarial_pgd.py", ["--steps", "3", "--batch-size", "2"],
                 ["auto picked deploy for 20", "OK: same adversarial examples"],
                 id="adversarial_pgd"),
    pytest.param("ddp_finetune.py", ["--steps", "2", "--batch-size", "4"],
                 ["DDP, 2 processes (gloo)", "OK: DDP with tune_mode matches"],
                 id="ddp_finetune"),
]


def run_example(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("script, args, expected", CASES)
def test_example_passes_its_check(script, args, expected):
    proc = run_example(script, args)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    for line in expected:
        assert line in proc.stdout, f"{line!r} not in the output of {script}:\n{proc.stdout}"


def test_examples_have_help():
    proc = run_example("adversarial_pgd.py", ["--help"])
    assert proc.returncode == 0 and "--steps" in proc.stdout


def test_bad_argument_is_refused():
    proc = run_example("ddp_finetune.py", ["--batch-size", "3"])
    assert proc.returncode == 2 and "multiple of 2" in proc.stderr
