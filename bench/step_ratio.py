"""Why Deploy's folded weights train at the wrong learning rate: the per-channel step ratio.

Deploy trains W' = W·s (s = γ/√(σ²+ε), BN folded once); Eval and Tune train W. The same
gradient then moves each output channel of W' by different amounts in the two, by a factor
set by s alone, and a pretrained network has small s. `step_ratios` measures that factor after
one step and compares it with the prediction; `python -m bench.stability` prints it under its
table (You et al., arXiv 2305.11624).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

import convbn_fx

__all__ = ["StepRatios", "step_ratios", "ratio_table"]


@dataclass
class StepRatios:
    """Per output channel of every block: the BN scale s and the measured step ratios."""
    optimizer: str
    exponent: int             # predicted ratio = s ** -exponent
    scale: torch.Tensor       # |s| = |γ|/√(σ²+ε)
    measured: torch.Tensor    # ‖ΔW'‖ of Deploy / ‖ΔW'‖ of Eval, the whole step
    tangential: torch.Tensor  # the same for the steps' parts orthogonal to W'

    @property
    def predicted(self) -> torch.Tensor:
        return self.scale ** -self.exponent

    def log_correlation(self, tangential: bool = False) -> float:
        ratio = self.tangential if tangential else self.measured
        return torch.corrcoef(torch.stack([ratio.log(), self.predicted.log()]))[0, 1].item()

    def median_ratio(self, tangential: bool = False) -> float:
        """Median of measured / predicted (1.0 when the prediction is right)."""
        ratio = self.tangential if tangential else self.measured
        return (ratio / self.predicted).median().item()

    def summary(self) -> dict:
        q = torch.tensor([0.05, 0.5, 0.95], dtype=self.scale.dtype)
        s05, s50, s95 = torch.quantile(self.scale, q).tolist()
        return {"optimizer": self.optimizer, "predicted": f"1/s^{self.exponent}",
                "channels": len(self.scale), "log_correlation": self.log_correlation(),
                "median_ratio": self.median_ratio(),
                "tangential_log_correlation": self.log_correlation(tangential=True),
                "tangential_median_ratio": self.median_ratio(tangential=True),
                "s_median": s50, "s_5": s05, "s_95": s95}


def _folded(conv: nn.Module, bn: nn.Module | None) -> torch.Tensor:
    """W' = W·s, one row per output channel (the conv's own weight when BN is folded away)."""
    w = conv.weight.detach().flatten(1).clone()
    if bn is None:
        return w
    return w * (bn.weight.detach() * torch.rsqrt(bn.running_var + bn.eps)).unsqueeze(1)


def _weights(model: nn.Module, blocks: list[tuple[str, str]], folded: bool) -> list:
    return [_folded(model.get_submodule(c), None if folded else model.get_submodule(b))
            for c, b in blocks]


def step_ratios(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                optimizer: type[torch.optim.Optimizer] = torch.optim.SGD, lr: float = 0.01,
                **options) -> StepRatios:
    """How far one step moves each output channel of the folded weight, Deploy over Eval.

    Both start from `model` (frozen BN) and take one step of `optimizer(params, lr=lr,
    **options)` on the batch (x, y).
    Eval (and Tune, which computes the same) trains W; as W' = W·s, ∂L/∂W = s·∂L/∂W', so
    plain SGD moves W by −lr·s·∂L/∂W' and the folded weight by s·ΔW = −lr·s²·∂L/∂W'. Deploy
    trains W' itself: ΔW'_deploy = −lr·∂L/∂W'. Per output channel the ratio is 1/s²:
    Deploy's learning rate is 1/s² times Eval's, channel by channel. Adam(W) divides each
    gradient by its own running RMS, so the s in ∂L/∂W cancels, ΔW and ΔW'_deploy have
    about the same size and the ratio is 1/s: a weaker effect.

    Eval also trains γ, and s = γ/√(σ²+ε) moves W' along W: ΔW'_eval = s·ΔW + W·Δs, so the
    whole-step ratio leaves 1/s² where γ's gradient is large (mostly below it: Eval's step
    grows). The steps' parts orthogonal to W' (which turn a channel's filter rather than
    rescale it) hold the law exactly, to first order in lr: `tangential`. Momentum does not
    change a first step; weight decay is left out, because it shrinks W' by about lr·wd·W' in
    either mode whatever the gradient, and would hide the gradient's step on a channel whose
    gradient is small.

    Args:
        model: the fine-tuning model (plain, BN frozen, its parameters trainable); it is not
            modified.
        optimizer: an optimizer class: Adam and AdamW are predicted 1/s, the others 1/s².
        options: its other arguments (momentum...); weight_decay is set to 0.
    Returns:
        StepRatios over every output channel of every conv→BN block whose step is not zero
        (a dead ReLU channel gets no gradient).
    """
    blocks = [(i.conv, i.bn) for i in convbn_fx.describe(model) if i.reason is None]
    models = {"eval": copy.deepcopy(model), "deploy": convbn_fx.deploy_mode(model)}
    before = {m: _weights(net, blocks, m == "deploy") for m, net in models.items()}
    for net in models.values():
        opt = optimizer(net.parameters(), lr=lr, **{**options, "weight_decay": 0.0})
        F.cross_entropy(net(x.to(next(net.parameters()).dtype)), y).backward()
        opt.step()
    after = {m: _weights(net, blocks, m == "deploy") for m, net in models.items()}
    scales, whole, tangential = [], [], []
    for k, (_, bn_name) in enumerate(blocks):
        u = F.normalize(before["deploy"][k], dim=1)   # each channel's filter direction
        step, turn = {}, {}
        for m in models:
            delta = after[m][k] - before[m][k]
            step[m] = delta.norm(dim=1)
            turn[m] = (delta - (delta * u).sum(1, keepdim=True) * u).norm(dim=1)
        keep = (step["eval"] > 0) & (step["deploy"] > 0) & (turn["eval"] > 0)
        bn = model.get_submodule(bn_name)
        scales.append((bn.weight * torch.rsqrt(bn.running_var + bn.eps)).detach()[keep].abs())
        whole.append(step["deploy"][keep] / step["eval"][keep])
        tangential.append(turn["deploy"][keep] / turn["eval"][keep])
    exponent = 1 if issubclass(optimizer, (torch.optim.Adam, torch.optim.AdamW)) else 2
    return StepRatios(optimizer.__name__.lower(), exponent, *(torch.cat(t).double()
                                             for t in (scales, whole, tangential)))


def ratio_table(ratios: list[StepRatios], tablefmt: str = "github") -> str:
    body = [[r.optimizer, f"1/s^{r.exponent}", len(r.scale),
             f"{r.log_correlation():.3f}", f"{r.median_ratio():.3f}",
             f"{r.log_correlation(True):.4f}", f"{r.median_ratio(True):.4f}"] for r in ratios]
    head = ["optimizer", "predicted", "channels", "whole step: corr of logs", "median ratio",
            "orthogonal to W': corr of logs", "median ratio"]
    return tabulate(body, head, tablefmt=tablefmt, disable_numparse=True)
