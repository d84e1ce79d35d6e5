"""What `measure` found, as dataclasses: the CLI's tables, JSON and plot are views of them."""

from __future__ import annotations

import dataclasses
import statistics

from .options import MEASURE_SCHEMA_VERSION
from .tensor_peak import CATEGORIES, step_growth

__all__ = ["ModeFigures", "InputResult", "Measurement", "ModeFit", "FitResult", "MiB", "GiB",
           "NOISE_STEPS"]

MiB = 2**20
GiB = 2**30
NOISE_STEPS = 3     # fewer timed steps than this: no claim about the noise


@dataclasses.dataclass
class ModeFigures:
    """One mode at one input; a figure is None when it was not measured (see `error`)."""

    mode: str
    blocks: dict[str, int]              # blocks per lowering; deploy: {"folded": n}
    saved_bytes: int | None = None      # autograd keeps for backward in one step; 0: inference
    peak: dict[str, int] | None = None  # bytes alive at the step's peak, by category + "total"
    process_peak_mib: float | None = None  # Measurement.process_peak says which
    step_times_s: list[float] = dataclasses.field(default_factory=list)  # every timed step
    max_abs_diff: float | None = None   # largest |output - unrewritten model's output|
    error: str | None = None            # "out of memory (...)": the figures after it are None

    @property
    def peak_bytes(self) -> int | None:
        return None if self.peak is None else self.peak["total"]

    @property
    def step_s(self) -> float | None:
        """Median seconds per step."""
        return statistics.median(self.step_times_s) if self.step_times_s else None

    @property
    def step_range_s(self) -> tuple[float, float] | None:
        return (min(self.step_times_s), max(self.step_times_s)) if self.step_times_s else None


@dataclasses.dataclass
class InputResult:
    """Every mode at one input shape."""

    shape: tuple[int, ...]
    modes: dict[str, ModeFigures]

    def ratio(self, mode: str, field: str) -> float | None:
        """`field` of `mode` over Eval's, or None where either is missing or Eval's is 0."""
        ref = getattr(self.modes["eval"], field)
        got = getattr(self.modes[mode], field)
        return got / ref if ref and got is not None else None

    def time_in_noise(self, mode: str) -> bool | None:
        """True when `mode`'s step times overlap Eval's (min to max): the machine's noise
        could explain the difference. None with fewer than NOISE_STEPS steps, or for Eval."""
        mine, ref = self.modes[mode].step_range_s, self.modes["eval"].step_range_s
        if mode == "eval" or mine is None or ref is None or \
                len(self.modes[mode].step_times_s) < NOISE_STEPS:
            return None
        return mine[0] <= ref[1] and ref[0] <= mine[1]


@dataclasses.dataclass
class Measurement:
    """What `measure` found; the CLI's tables, JSON and plot are views of it."""

    spec: str
    model: str                  # class name of the built model
    state: str
    device: str
    compiled: bool
    steps: int                  # timed steps per mode, after one warm-up
    peak: str | None            # "tensors", "estimated" (fake tensors), or None: not measured
    process_peak: str | None    # "rss_growth", "cuda_max_allocated", or None
    machine: str
    inputs: list[InputResult]

    @property
    def estimated(self) -> bool:
        return self.peak == "estimated"

    @property
    def errors(self) -> list[str]:
        """One line per mode that could not be measured at some input."""
        return [f"input {'x'.join(map(str, r.shape))}, {f.mode}: {f.error}"
                for r in self.inputs for f in r.modes.values() if f.error]

    def to_json(self) -> dict:
        def ms(s):
            return None if s is None else s * 1e3

        def mode_json(r: InputResult, f: ModeFigures) -> dict:
            spread = f.step_range_s or (None, None)
            return {"mode": f.mode, "blocks": f.blocks, "saved_bytes": f.saved_bytes,
                    "saved_mib": None if f.saved_bytes is None else f.saved_bytes / MiB,
                    "peak_bytes": f.peak_bytes,
                    "peak_mib": None if f.peak is None else f.peak_bytes / MiB,
                    "peak_by_category": None if f.peak is None else
                    {k: f.peak[k] for k in CATEGORIES},
                    "peak_growth_bytes": None if f.peak is None else step_growth(f.peak),
                    "process_peak_mib": f.process_peak_mib,
                    "step_ms": ms(f.step_s), "step_ms_min": ms(spread[0]),
                    "step_ms_max": ms(spread[1]), "step_time_in_noise": r.time_in_noise(f.mode),
                    "max_abs_diff": f.max_abs_diff,
                    "ratio_to_eval": {"saved": r.ratio(f.mode, "saved_bytes"),
                                      "peak": r.ratio(f.mode, "peak_bytes"),
                                      "process_peak": r.ratio(f.mode, "process_peak_mib"),
                                      "step_time": r.ratio(f.mode, "step_s")},
                    "error": f.error}
        return {"schema_version": MEASURE_SCHEMA_VERSION, "spec": self.spec,
                "model": self.model, "state": self.state, "device": self.device,
                "compiled": self.compiled, "steps": self.steps, "peak_memory": self.peak,
                "process_peak": self.process_peak, "machine": self.machine,
                "inputs": [{"shape": list(r.shape),
                            "modes": [mode_json(r, f) for f in r.modes.values()]}
                           for r in self.inputs],
                "errors": self.errors}


@dataclasses.dataclass
class ModeFit:
    """The largest batch of one mode whose estimated peak fits the budget."""

    mode: str
    blocks: dict[str, int]
    batch: int | None           # None: not even batch 1 fits
    peak: dict[str, int] | None  # at `batch`, by category (as ModeFigures.peak)
    next_total: int | None      # total at batch + 1 (batch 1 if none fits); None at the limit
    probes: dict[int, int]      # every batch estimated -> its total bytes


@dataclasses.dataclass
class FitResult:
    """What `fit_batches` found: one ModeFit per mode, for inputs (batch, *sample_shape)."""

    spec: str
    model: str
    state: str
    device: str
    sample_shape: tuple[int, ...]   # the input shape after the batch
    budget: int                     # bytes
    limit: int                      # the largest batch searched
    machine: str
    modes: dict[str, ModeFit]

    def to_json(self) -> dict:
        return {"schema_version": MEASURE_SCHEMA_VERSION, "spec": self.spec,
                "model": self.model, "state": self.state, "device": self.device,
                "sample_shape": list(self.sample_shape), "budget_bytes": self.budget,
                "limit": self.limit, "peak_memory": "estimated", "machine": self.machine,
                "modes": [{"mode": f.mode, "blocks": f.blocks, "batch": f.batch,
                           "peak_bytes": None if f.peak is None else f.peak["total"],
                           "peak_by_category": None if f.peak is None else
                           {k: f.peak[k] for k in CATEGORIES},
                           "next_batch_peak_bytes": f.next_total,
                           "probes": {str(b): n for b, n in sorted(f.probes.items())}}
                          for f in self.modes.values()]}
