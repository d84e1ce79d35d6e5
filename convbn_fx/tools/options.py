"""The tools' shared tables: the states a model is measured or reported in, output formats.

`convbn-fx report` and `convbn-fx measure` (and bench/) name a model's state and an output
format with the same words; one table each, so the two commands cannot drift apart.
"""

from __future__ import annotations

import torch.nn as nn

from .testing import finetune_state, frozen_state

__all__ = ["STATES", "TABLE_FORMATS", "FORMATS", "SCHEMA_VERSION", "MEASURE_SCHEMA_VERSION"]

SCHEMA_VERSION = 1  # of `report --format json`; bump on any incompatible change
# Of `measure --format json`. 2: peaks count tensors (MemTracker), by category; step spread.
MEASURE_SCHEMA_VERSION = 2


def _train(model: nn.Module) -> nn.Module:
    return model.train()


def _eval(model: nn.Module) -> nn.Module:
    return model.eval()


# State name -> what puts a model in it (in place).
STATES = {
    "finetune": finetune_state,   # model.train(), every BN .eval(): frozen BN, as in transfer
    "train": _train,              # BN uses batch statistics: nothing folds
    "eval": _eval,                # model.eval(), parameters still require grad
    "frozen": frozen_state,       # model.eval() and requires_grad_(False): inference
}
# --format value -> tabulate's table format (json is written separately).
TABLE_FORMATS = {"plain": "simple", "github": "github"}
FORMATS = (*TABLE_FORMATS, "json")
