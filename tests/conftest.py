"""Shared pytest options: `--fuzz N` runs N random-model seeds in tests/test_fuzz.py."""

import os
import sys

# tests/ holds plain helper modules (fuzz_models.py) imported by name.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    group = parser.getgroup("convbn_fx")
    group.addoption("--fuzz", type=int, default=None, metavar="N",
                    help="run N random-model seeds in test_fuzz.py (default: a few hundred)")
    group.addoption("--fuzz-start", type=int, default=0, metavar="S",
                    help="first fuzz seed (with --fuzz, to explore beyond the default range)")
