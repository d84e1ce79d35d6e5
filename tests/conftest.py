"""Shared pytest options: `--fuzz N` runs N random-model seeds in tests/test_fuzz.py."""

import os
import sys

import pytest

from convbn_fx.kernels import choice

# tests/ holds plain helper modules (fuzz_models.py) imported by name.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    group = parser.getgroup("convbn_fx")
    group.addoption("--fuzz", type=int, default=None, metavar="N",
                    help="run N random-model seeds in test_fuzz.py (default: a few hundred)")
    group.addoption("--fuzz-start", type=int, default=0, metavar="S",
                    help="first fuzz seed (with --fuzz, to explore beyond the default range)")


@pytest.fixture(autouse=True)
def _fold_every_call(request, monkeypatch):
    """The suite checks the fold itself, mostly on inputs small next to the weights, where
    `auto` would run Eval per call (kernels/choice.py): there every call folds, as under
    `mode="tune"`. Tests marked `per_call` run the real rule."""
    if request.node.get_closest_marker("per_call") is None:
        monkeypatch.setattr(choice, "WEIGHT_COST", 0.0)
        monkeypatch.setattr(choice, "CALL_COST", 0)
