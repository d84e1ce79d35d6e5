"""The model-zoo sweep: timm's families fold, exactly, and run as before (bench/zoo.py).

Pairs are counted on the plain model with hooks (a norm fed by a conv's output), not by our
matcher. Every model is checked for float64 algebra (outputs and every gradient to 1e-9) and
float32 stability; over the set at least 95 % of the pairs must fold. The default run covers
26 architectures from every family; `pytest -m slow` (`make test-slow`, run by .ci/run) adds
the other 11 of bench.zoo.FAMILIES.
"""

import pytest

pytest.importorskip("timm")

from bench.zoo import FAMILIES, QUICK, check_model  # noqa: E402

_results = {}


def _check(name):
    if name not in _results:
        _results[name] = check_model(name)
    return _results[name]


def _assert_exact(result):
    assert result.error is None, result.error
    assert result.runs and result.stable, result
    assert result.algebra <= 1e-9, result
    assert result.blocks >= result.folded


@pytest.mark.parametrize("name", QUICK)
def test_zoo_model_is_exact(name):
    _assert_exact(_check(name))


def test_zoo_folds_95_percent_of_conv_norm_pairs():
    results = [_check(name) for name in QUICK]
    assert len({r.name for r in results}) >= 25
    pairs, folded = sum(r.pairs for r in results), sum(r.folded for r in results)
    assert pairs > 1000 and folded >= 0.95 * pairs, \
        {r.name: (r.folded, r.pairs, r.skipped) for r in results if r.folded < r.pairs}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for names in FAMILIES.values() for n in names
                                  if n not in QUICK])
def test_zoo_model_is_exact_full(name):
    _assert_exact(_check(name))
