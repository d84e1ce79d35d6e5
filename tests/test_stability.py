"""bench.stability's model and training code: Tune trains exactly as Eval, Deploy does not.

The benchmark's claim rests on three facts tested here on synthetic data in float64, with
randomised BN statistics (so s = γ/√(σ²+ε) is spread over channels, never an identity BN):
Tune's fine-tuning trajectory is Eval's; `deploy_mode`'s result has no BN, trains every
parameter and starts at Eval's loss; and one Deploy step moves each output channel of the
folded weight 1/s² times as far as an Eval step orthogonally to W' (1/s with AdamW); along W'
Eval's own γ step adds to it. Which mode reaches which accuracy depends on data and seeds
and is measured by the benchmark, not asserted here.
"""

import math
import sys

import pytest
import torch
import torch.nn as nn

import convbn_fx
from bench.stability import (COLLAPSED, DIVERGED, ENDED_ABOVE, DigitsResNet, Run, Task,
                             failure, finetune, main, new_head, prepare)
from bench.step_ratio import step_ratios

EDGE_LR = 0.1   # the SGD learning rate where the benchmark's Deploy fails and Eval trains best
CHANNELS = 16 * 5 + 32 * 3 + 64 * 3   # output channels of the 11 conv→BN blocks


def _pretrained(x: torch.Tensor, seed: int = 0) -> nn.Module:
    """A stand-in for a pretrained backbone: γ spread log-uniformly over 0.05–1, BN statistics
    measured on `x` and then perturbed, so s is small and different in every channel (not an
    identity BN) while the channels stay alive."""
    torch.manual_seed(seed)
    model = DigitsResNet().double()
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            n = m.num_features
            m.weight.copy_(torch.empty(n, dtype=torch.float64).uniform_(
                math.log(0.05), 0.0, generator=gen).exp())
            m.bias.copy_(0.2 * m.weight * torch.randn(n, generator=gen, dtype=torch.float64))
            m.momentum = None   # the running statistics become those of the next batch
            m.reset_running_stats()
        model.train()(x)
        for m in bns:
            n = m.num_features
            m.running_var.mul_(torch.rand(n, generator=gen, dtype=torch.float64) * 1.5 + 0.5)
            m.running_mean.add_(0.2 * m.running_var.sqrt()
                                * torch.randn(n, generator=gen, dtype=torch.float64))
            m.momentum = 0.1
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: thread start-up dominates, and the test machine is shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pretrained(task) -> nn.Module:
    return _pretrained(task.x_train)


@pytest.fixture(scope="module")
def task() -> Task:
    """Five classes decided by a fixed random linear map of the image: learnable, not trivial."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 1, 16, 16, generator=gen, dtype=torch.float64)
    y = (x.flatten(1) @ torch.randn(256, 5, generator=gen, dtype=torch.float64)).argmax(1)
    return Task(x[:96], y[:96], x[96:], y[96:])


def _head(seed: int = 0) -> nn.Module:
    return new_head(seed).double()


def test_tune_trains_exactly_as_eval(pretrained, task):
    runs, models = {}, {}
    for mode in ("eval", "tune"):
        models[mode] = prepare(pretrained, _head(), mode)
        runs[mode] = finetune(models[mode], task, "sgd", EDGE_LR, seed=0, steps=25, mode=mode)
    infos = convbn_fx.describe(models["tune"])
    assert len(infos) == 11 and {i.lowering for i in infos} == {convbn_fx.Mode.TUNE}
    eval_losses, tune_losses = runs["eval"].losses, runs["tune"].losses
    assert len(eval_losses) == len(tune_losses) == 25
    assert all(math.isfinite(v) for v in eval_losses)
    assert abs(eval_losses[-1] - eval_losses[0]) > 1e-3   # it trained
    for a, b in zip(tune_losses, eval_losses):
        assert abs(a - b) <= 1e-9 * abs(b)
    tuned = dict(models["tune"].named_parameters())
    for name, p in models["eval"].named_parameters():
        assert (tuned[name] - p).abs().max() <= 1e-9 * p.abs().max(), name
    assert runs["tune"].accuracy == runs["eval"].accuracy


def test_deploy_folds_bn_trains_everything_and_starts_at_eval_loss(pretrained, task):
    deployed = prepare(pretrained, _head(), "deploy")
    assert not [m for m in deployed.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    params = dict(deployed.named_parameters())
    assert all(p.requires_grad for p in params.values())
    assert "fc.weight" in params and "conv1.bias" in params   # the new head; a folded bias
    before = {n: p.detach().clone() for n, p in params.items()}
    run = finetune(deployed, task, "sgd", EDGE_LR, seed=0, steps=1, mode="deploy")
    unchanged = [n for n, p in deployed.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    reference = finetune(prepare(pretrained, _head(), "eval"), task, "sgd", EDGE_LR, seed=0,
                         steps=1)
    assert abs(run.losses[0] - reference.losses[0]) <= 1e-9 * reference.losses[0]
    assert abs(run.initial_loss - reference.initial_loss) <= 1e-9 * reference.initial_loss


@pytest.mark.parametrize("optimizer, lr, exponent",
                         [(torch.optim.SGD, EDGE_LR, 2), (torch.optim.AdamW, 1e-3, 1)],
                         ids=["sgd-1/s^2", "adamw-1/s"])
def test_deploy_step_ratio_follows_the_bn_scale(pretrained, task, optimizer, lr, exponent):
    model = prepare(pretrained, _head(), "eval")
    ratios = step_ratios(model, task.x_train[:32], task.y_train[:32], optimizer, lr)
    assert ratios.exponent == exponent
    assert len(ratios.scale) > 0.9 * CHANNELS   # every block; a dead ReLU channel has no step
    assert ratios.scale.max() / ratios.scale.min() > 5   # a spread worth correlating
    # The steps' parts orthogonal to W' follow s^-exponent (exact to first order in lr).
    assert ratios.log_correlation(tangential=True) > 0.99
    assert 0.98 < ratios.median_ratio(tangential=True) < 1.02


def test_whole_step_follows_1_over_s_squared_when_gamma_is_frozen(pretrained, task):
    # What moves Eval's whole step off 1/s² is its γ step (W' = W·γ/σ moves along W): with γ
    # frozen the whole step obeys the law too.
    model = prepare(pretrained, _head(), "eval")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.requires_grad_(False)
    ratios = step_ratios(model, task.x_train[:32], task.y_train[:32], torch.optim.SGD, EDGE_LR,
                         momentum=0.9)
    assert len(ratios.scale) > 0.9 * CHANNELS
    assert ratios.log_correlation() > 0.99
    assert 0.98 < ratios.median_ratio() < 1.02


def _run(losses, final, accuracy, initial=1.6):
    return Run("deploy", "sgd", 0.03, 0, initial, final, accuracy, losses)


def test_failure_criteria():
    assert failure(_run([1.6, 1.0], 0.5, 0.9)) is None
    assert failure(_run([1.6, math.nan], math.nan, 0.2)) == DIVERGED
    assert failure(_run([1.6, math.inf], 0.5, 0.9)) == DIVERGED
    assert failure(_run([1.6, 9.0], 1.7, 0.6)) == ENDED_ABOVE
    assert failure(_run([1.6, 1.0], 1.2, 0.25)) == COLLAPSED
    assert failure(_run([1.6, 1.0], 1.2, 0.26)) is None


def test_missing_scikit_learn_is_one_sentence(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)   # `import sklearn` raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'convbn-fx[bench]'" in err and "\n" not in err
