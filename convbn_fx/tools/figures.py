"""What `measure` found, as dataclasses: the CLI's tables, JSON and plot are views of them."""

from __future__ import annotations

import dataclasses

from .options import SCHEMA_VERSION

__all__ = ["ModeFigures", "InputResult", "Measurement", "MiB"]

MiB = 2**20


@dataclasses.dataclass
class ModeFigures:
    """One mode at one input; a figure is None when it was not measured (see `error`)."""

    mode: str
    blocks: dict[str, int]              # blocks per lowering; deploy: {"folded": n}
    saved_bytes: int | None = None      # autograd keeps for backward in one step; 0: inference
    peak_mib: float | None = None       # Measurement.peak says which peak
    step_s: float | None = None         # median seconds per step
    max_abs_diff: float | None = None   # largest |output - unrewritten model's output|
    error: str | None = None            # "out of memory (...)": the figures after it are None


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


@dataclasses.dataclass
class Measurement:
    """What `measure` found; the CLI's tables, JSON and plot are views of it."""

    spec: str
    model: str                  # class name of the built model
    state: str
    device: str
    compiled: bool
    steps: int                  # timed steps per mode, after one warm-up
    peak: str | None            # "rss_growth", "cuda_max_allocated", or None: not measured
    machine: str
    inputs: list[InputResult]

    @property
    def errors(self) -> list[str]:
        """One line per mode that could not be measured at some input."""
        return [f"input {'x'.join(map(str, r.shape))}, {f.mode}: {f.error}"
                for r in self.inputs for f in r.modes.values() if f.error]

    def to_json(self) -> dict:
        def mode_json(r: InputResult, f: ModeFigures) -> dict:
            return {"mode": f.mode, "blocks": f.blocks, "saved_bytes": f.saved_bytes,
                    "saved_mib": None if f.saved_bytes is None else f.saved_bytes / MiB,
                    "peak_mib": f.peak_mib,
                    "step_ms": None if f.step_s is None else f.step_s * 1e3,
                    "max_abs_diff": f.max_abs_diff,
                    "ratio_to_eval": {"saved": r.ratio(f.mode, "saved_bytes"),
                                      "peak": r.ratio(f.mode, "peak_mib"),
                                      "step_time": r.ratio(f.mode, "step_s")},
                    "error": f.error}
        return {"schema_version": SCHEMA_VERSION, "spec": self.spec, "model": self.model,
                "state": self.state, "device": self.device, "compiled": self.compiled,
                "steps": self.steps, "peak_memory": self.peak, "machine": self.machine,
                "inputs": [{"shape": list(r.shape),
                            "modes": [mode_json(r, f) for f in r.modes.values()]}
                           for r in self.inputs],
                "errors": self.errors}
