"""The model-zoo sweeps (bench/zoo.py): timm, Hugging Face and MONAI models fold, exactly.

Pairs are counted on the plain model with hooks (a norm fed by a conv's output, or by a
Linear's, directly or through a view), not by our matcher. Every model is checked for float64
algebra (outputs and every gradient to 1e-9) and float32 stability; over each zoo's set at
least 95 % of the pairs must fold. The default run covers 26 timm architectures, 15 Hugging
Face and 13 MONAI ones (QUICK, HF_QUICK, MONAI_QUICK: about 15 s each on 2 idle cores);
`pytest -m slow` (`make test-slow`, run by .ci/run) adds the rest of each zoo.
"""

import pytest
import torch
import torch.nn as nn

import convbn_fx
from bench.zoo_models import FAMILIES, HF, HF_QUICK, MONAI, MONAI_QUICK, QUICK

_results = {}


def _timm(name):
    pytest.importorskip("timm")
    from bench.zoo import check_model

    if name not in _results:
        _results[name] = check_model(name)
    return _results[name]


def _entry(zoo, name):
    pytest.importorskip({"hf": "transformers", "monai": "monai"}[zoo])
    from bench.zoo import check_entry

    key = f"{zoo}/{name}"
    if key not in _results:
        entry = next(e for e in (HF if zoo == "hf" else MONAI) if e.name == name)
        _results[key] = check_entry(entry)
    return _results[key]


def _assert_exact(result):
    assert result.exact, result
    assert result.blocks >= result.folded


def _assert_folds_every_pair(result):
    """Every hooked pair folded, but those whose conv output has another consumer."""
    folded, pairs = result.folded + result.linear_folded, result.pairs + result.linear_pairs
    assert folded >= pairs - result.shared, (result.lost, result.skipped)


def _assert_zoo_folds_95_percent(results, min_models):
    """At least 95 % of all hooked pairs folded, counting only models that are exact."""
    assert len({r.name for r in results}) >= min_models
    pairs = sum(r.pairs + r.linear_pairs for r in results)
    folded = sum(r.folded + r.linear_folded for r in results if r.exact)
    assert folded >= 0.95 * pairs, \
        {r.name: (r.folded + r.linear_folded, r.pairs + r.linear_pairs, r.error)
         for r in results if not r.exact or r.folded + r.linear_folded < r.pairs + r.linear_pairs}


def _only_with_m_slow(request):
    """The rest of a zoo runs with `-m slow` only (`python -m bench.zoo --zoo hf` sweeps it)."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the rest of the zoo runs with -m slow")


def _marked(names, expected_failures):
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=expected_failures[n]))
            if n in expected_failures else n for n in names]


# ------------------------------------------------------------------------------------ timm

@pytest.mark.parametrize("name", QUICK)
def test_zoo_model_is_exact(name):
    _assert_exact(_timm(name))


def test_zoo_folds_95_percent_of_conv_norm_pairs():
    results = [_timm(name) for name in QUICK]
    assert sum(r.pairs for r in results) > 1000
    _assert_zoo_folds_95_percent(results, 25)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for names in FAMILIES.values() for n in names
                                  if n not in QUICK])
def test_zoo_model_is_exact_full(name):
    _assert_exact(_timm(name))


# ---------------------------------------------------------------------------- Hugging Face

HF_LOSES_PAIRS = {
    "segformer": "SegformerDecodeHead, the only module holding its one pair, does not "
                 "trace (it iterates over its list argument, a Proxy): tune_mode warns and "
                 "returns the model unchanged",
    "vitpose": "VitPoseClassicDecoder's trace does not compute its forward (flip_pairs=None "
               "is a Proxy, so `flip_pairs is not None` holds): the check catches it and the "
               "decoder runs its own forward, so its two ConvTranspose2d→BatchNorm2d pairs "
               "are not folded",
}


@pytest.mark.parametrize("name", HF_QUICK)
def test_hf_model_is_exact(name):
    _assert_exact(_entry("hf", name))


@pytest.mark.parametrize("name", _marked(HF_QUICK, HF_LOSES_PAIRS))
def test_hf_model_folds_every_pair(name):
    _assert_folds_every_pair(_entry("hf", name))


def test_hf_zoo_folds_95_percent_of_pairs():
    _assert_zoo_folds_95_percent([_entry("hf", name) for name in HF_QUICK], 15)


@pytest.mark.slow
@pytest.mark.parametrize("name", [e.name for e in HF if e.name not in HF_QUICK])
def test_hf_model_is_exact_full(name, request):
    _only_with_m_slow(request)
    _assert_exact(_entry("hf", name))


# ----------------------------------------------------------------------------------- MONAI

@pytest.mark.parametrize("name", MONAI_QUICK)
def test_monai_model_is_exact(name):
    _assert_exact(_entry("monai", name))


@pytest.mark.parametrize("name", MONAI_QUICK)
def test_monai_model_folds_every_pair(name):
    _assert_folds_every_pair(_entry("monai", name))


def test_monai_zoo_folds_95_percent_of_pairs():
    _assert_zoo_folds_95_percent([_entry("monai", name) for name in MONAI_QUICK], 10)


def test_monai_basicunet_output_is_the_plain_models():
    """UpCat tests `torch.jit.isinstance(x_e, torch.Tensor)`: the trace must keep the skip."""
    pytest.importorskip("monai")
    from bench.zoo import _input, prepare

    entry = next(e for e in MONAI if e.name == "basicunet_2d")
    x = _input(entry.shape)
    torch.manual_seed(0)
    model = prepare(entry.build(), x)
    torch.testing.assert_close(convbn_fx.tune_mode(model)(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", [e.name for e in MONAI if e.name not in MONAI_QUICK])
def test_monai_model_is_exact_full(name, request):
    _only_with_m_slow(request)
    _assert_exact(_entry("monai", name))


# --------------------------------------------- defects the sweeps found, on small models

class _UpSkip(nn.Module):
    """MONAI UpCat's test, with a skip connection whose shapes agree."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x, skip=None):
        if skip is not None and torch.jit.isinstance(skip, torch.Tensor):
            x = x + skip
        return self.bn(self.conv(x))


class _SkipNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.up = nn.Conv2d(3, 8, 3, padding=1), _UpSkip(8)

    def forward(self, x):
        s = self.stem(x)
        return self.up(torch.relu(s), s)


def test_isinstance_of_a_proxy_does_not_change_the_answer():
    """isinstance of a Proxy takes the other branch and drops `x + skip`: the trace check
    catches it, and the module runs its own forward (with its blocks rewritten alone)."""
    model = _SkipNet().train()
    model.up.bn.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(convbn_fx.tune_mode(model)(x), model(x))


@pytest.mark.parametrize("conv, bn, shape", [
    (nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), (3, 16, 16)),
    (nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), (3, 16)),
], ids=["conv2d-3d-input", "conv1d-2d-input"])
def test_rewritten_block_rejects_what_the_bn_rejects(conv, bn, shape):
    """A conv takes an unbatched input; BatchNorm2d rejects its 3-D output, and BatchNorm1d
    reads a 2-D one as (N, C): the folded block must do what the modules do."""
    model = nn.Sequential(conv, bn).train()
    model[1].eval()
    x = torch.randn(shape)
    with pytest.raises((ValueError, RuntimeError)):
        model(x)
    with pytest.raises((ValueError, RuntimeError)):
        convbn_fx.tune_mode(model)(x)


class _HFFrozenBN(nn.Module):
    """transformers' DetrFrozenBatchNorm2d (and its 13 copies), forward as written there."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.bias = nn.Buffer(torch.ones(n)), nn.Buffer(torch.zeros(n))
        self.running_mean, self.running_var = nn.Buffer(torch.zeros(n)), nn.Buffer(torch.ones(n))

    def forward(self, x):
        weight = self.weight.reshape(1, -1, 1, 1)
        bias = self.bias.reshape(1, -1, 1, 1)
        running_var = self.running_var.reshape(1, -1, 1, 1)
        running_mean = self.running_mean.reshape(1, -1, 1, 1)
        epsilon = 1e-5
        scale = weight * (running_var + epsilon).rsqrt()
        bias = bias - running_mean * scale
        return x * scale + bias


def test_frozen_norm_traced_through_follows_load_state_dict():
    """A frozen norm's buffer arithmetic is traced, not baked into constants at trace time."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3),
                          _HFFrozenBN(8)).train()
    model[1].eval()
    tuned = convbn_fx.tune_mode(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state["3.running_var"] = torch.rand(8, generator=gen) + 0.5
    state["3.running_mean"] = torch.randn(8, generator=gen)
    tuned.load_state_dict(state)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(tuned(x), model(x))
