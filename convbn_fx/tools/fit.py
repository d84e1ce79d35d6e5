"""`measure --fit 24GiB`: the largest batch per mode whose estimated peak fits a budget.

"How much bigger a batch fits on my card with Tune?" is answered by search on the fake-tensor
estimate (fake.py), a few seconds a probe. The peak of a CNN step is the largest of many
`a_i + c_i * batch` (one per op instant), so it grows with the batch, piecewise affine and
convex: a secant step from two probes lands next to the answer, and regula falsi closes the
bracket (resnet50 at 24 GiB: 5 probes a mode, where doubling and bisection take 18-20).
Only monotony is relied on: the bracket shrinks with every probe whatever the curve.

    fit = fit_batches("resnet50", (3, 224, 224), parse_size("24GiB"))
    fit.modes["tune"].batch      # about 2x fit.modes["eval"].batch
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from ..vocabulary.errors import ConvBNError
from .fake import check_input, estimate_peak
from .figures import FitResult, ModeFit
from .measure import Phases, Progress, build_variants
from .meters import machine
from .steps import MEASURE_STATES, MODES, check_device, check_modes

__all__ = ["parse_size", "largest_batch", "fit_batches", "BATCH_LIMIT"]

BATCH_LIMIT = 1 << 20   # the largest batch searched
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in "24GiB" (2**30-byte units), "80GB" (10**9), "512MiB", ...; ValueError else.

    A unit is required: a bare "24" would be 24 bytes, and "24G" would not say which
    gigabyte (nvidia-smi prints MiB, vendors sell GB)."""
    match = _SIZE.fullmatch(text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if unit is None:
        raise ValueError(f"expected a memory size with a unit, like 24GiB (2^30 bytes) or 80GB "
                         f"(10^9 bytes), got {text!r}")
    size = int(float(match.group(1)) * unit)
    if size < 1:
        raise ValueError(f"expected a memory size above 0 bytes, got {text!r}")
    return size


def largest_batch(total_at: Callable[[int], int], budget: int, limit: int = BATCH_LIMIT
                  ) -> tuple[int | None, dict[int, int]]:
    """The largest batch b <= limit with total_at(b) <= budget, and every probe {b: total}.

    None when batch 1 does not fit. total_at must not decrease with the batch. The answer is
    always a probed batch, and so is the next one (over the budget) unless b is the limit.
    """
    probes: dict[int, int] = {}

    def total(b: int) -> int:
        if b not in probes:
            probes[b] = total_at(b)
        return probes[b]

    if total(1) > budget:
        return None, probes
    prev, lo, hi = None, 1, None
    while hi is None:    # grow: the secant through the last two fitting probes, past the budget
        if prev is None or total(lo) <= total(prev):
            nxt = 2 * lo
        else:
            slope = (total(lo) - total(prev)) / (lo - prev)
            nxt = lo + int((budget - total(lo)) / slope) + 1
        nxt = min(max(nxt, lo + 1), limit)
        if total(nxt) > budget:
            hi = nxt
        elif nxt == limit:
            return limit, probes
        else:
            prev, lo = lo, nxt
    moved = []          # which end each probe moved: a curved peak moves one end only
    while hi - lo > 1:   # regula falsi, each guess strictly inside (lo, hi)
        if moved[-2:] in (["lo", "lo"], ["hi", "hi"]):
            guess = (lo + hi) // 2   # bisect once: a one-sided run would crawl
        else:
            guess = lo + int((budget - total(lo)) * (hi - lo) / max(total(hi) - total(lo), 1))
        guess = min(max(guess, lo + 1), hi - 1)
        if total(guess) <= budget:
            lo = guess
            moved.append("lo")
        else:
            hi = guess
            moved.append("hi")
    return lo, probes


def fit_batches(spec: str, sample_shape: Sequence[int], budget: int, *,
                state: str = "finetune", modes: Sequence[str] = MODES, device: str = "cpu",
                limit: int = BATCH_LIMIT, progress: Progress | None = None) -> FitResult:
    """For each mode, the largest batch whose estimated step peak fits in `budget` bytes.

    Args:
        spec: as for `measure`. sample_shape: the input after the batch, e.g. (3, 224, 224).
        budget: bytes of tensor memory (see fake.WHAT_IT_MODELS for what is left out).
        state, modes, device: as for `measure`.
        limit: the largest batch tried. progress: as for `measure`, once per probe.
    """
    if state not in MEASURE_STATES:
        raise ConvBNError(f"unknown state {state!r}; measure knows {', '.join(MEASURE_STATES)}.")
    if budget < 1 or not sample_shape or min(sample_shape) < 1:
        raise ConvBNError("--fit needs a budget above 0 bytes and input sizes of 1 or more.")
    order = check_modes(modes)
    dev = check_device(device)
    sample = tuple(int(s) for s in sample_shape)
    # How many probes a mode takes is not known ahead: about 6 for a CNN, then the average.
    phases = Phases(2 + len(order) * 7, progress)
    model, nets, counts = build_variants(spec, state, order, dev, phases)
    phases.begin("checking the input")
    check_input(model, (1, *sample), spec)
    fits, probed = {}, 0
    for i, mode in enumerate(order):
        peaks: dict[int, dict[str, int]] = {}

        def total_at(b: int) -> int:
            phases.begin(f"{mode}: estimating batch {b}")
            peaks[b] = estimate_peak(nets[mode], (b, *sample), state == "finetune", spec)
            return peaks[b]["total"]

        batch, probes = largest_batch(total_at, budget, limit)
        probed += len(probes)
        phases.total = phases.done + round(probed / (i + 1) * (len(order) - i - 1))
        fits[mode] = ModeFit(mode, counts[mode], batch, peaks.get(batch),
                             probes.get((batch or 0) + 1), probes)
    phases.finish()
    return FitResult(spec, type(model).__name__, state, str(dev), sample, budget, limit,
                     machine(), fits)
