"""How figures are taken: interleaved step times, a process's peak memory in a fresh process.

`convbn-fx measure` (convbn_fx.measure) and the scripts in bench/ take their figures the same
way, so both are built on these few functions. Timing variants one after another (all of A,
then all of B) lets a CPU's clock, cache and the neighbours' load drift between them; running
them round-robin (A B C A B C ...) after a warm-up spreads that drift evenly, and every timed
call is kept so the spread shows. A process's peak memory (torch allocates outside Python, so
tracemalloc sees nothing) is taken in a fresh interpreter: its peak resident set, and on CUDA
`torch.cuda.max_memory_allocated`. (The exact tensor peak is tensor_peak.py's.)
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence

import torch

__all__ = ["default_device", "sync", "interleaved_times", "interleaved_medians", "rss_mib",
           "peak_rss_mib", "peak_during", "child_report", "run_child", "ChildFailed", "machine"]

_REPORT = "CONVBN_FX_CHILD_REPORT "  # marks the child's one JSON line on stdout


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_times(steps: Mapping[str, Callable[[], object]], repeats: int,
                      warmup: int = 1, clock: Callable[[], float] = time.perf_counter,
                      before: Callable[[], object] | None = None,
                      after: Callable[[str], object] | None = None,
                      announce: Callable[[str, int], object] | None = None
                      ) -> dict[str, list[float]]:
    """Seconds of every timed call of each step, called round-robin after `warmup` calls each.

    `clock=time.process_time` measures CPU time instead of wall time: for single-threaded
    Python work (a graph pass) it is what wall time would be on an idle machine, and it does
    not count the time other processes on a busy machine took the CPU away. `before` runs
    untimed ahead of every timed call (e.g. `gc.collect`); `after(name)` runs after every
    call, warm-up included; `announce(name, i)` before every call, with i the timed call's
    index (0 to repeats - 1) or -1 for a warm-up call (e.g. to draw a progress bar).
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            if announce is not None:
                announce(name, -1)
            steps[name]()
            if after is not None:
                after(name)
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names:
            if announce is not None:
                announce(name, i)
            if before is not None:
                before()
            start = clock()
            steps[name]()
            sync()
            times[name].append(clock() - start)
            if after is not None:
                after(name)
    return times


def interleaved_medians(steps: Mapping[str, Callable[[], object]], repeats: int,
                        warmup: int = 1, clock: Callable[[], float] = time.perf_counter,
                        before: Callable[[], object] | None = None,
                        after: Callable[[str], object] | None = None) -> dict[str, float]:
    """Median seconds per call of each step (`interleaved_times`, same arguments)."""
    times = interleaved_times(steps, repeats, warmup, clock, before, after)
    return {name: statistics.median(ts) for name, ts in times.items()}


def rss_mib() -> float:
    """This process's resident memory now (Linux), in MiB; 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB.

    Linux's VmHWM, not `ru_maxrss`: a child started by fork + exec inherits its parent's
    `ru_maxrss`, so a 2 GiB parent would make every child report at least 2 GiB.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def _reset_peak_rss() -> None:
    """Start VmHWM again from the current resident set (Linux 4.0+; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_during(step: Callable[[], object], repeats: int, device: torch.device | str = "cpu",
                warmup: int = 0) -> dict[str, float]:
    """Run `step` `warmup` + `repeats` times; memory before and at the peak of the repeats, MiB.

    Meant for a fresh process (see `run_child`), where the peak is this step's own:
    `rss_before` and `peak_rss` (resident memory), and on CUDA `cuda_peak`
    (`torch.cuda.max_memory_allocated`). Warm-up steps (e.g. torch.compile compiling) are
    left out of the peak.
    """
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        step()
    gc.collect()
    if warmup:
        _reset_peak_rss()
    before = rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        step()
    figures = {"rss_before": before, "peak_rss": peak_rss_mib()}
    if cuda:
        torch.cuda.synchronize(device)
        figures["cuda_peak"] = torch.cuda.max_memory_allocated(device) / 2**20
    return figures


def child_report(values: dict) -> None:
    """Called in the child: hand `values` back to `run_child` on stdout."""
    print(_REPORT + json.dumps(values), flush=True)


class ChildFailed(RuntimeError):
    """A child process ended without reporting; `returncode` < 0 is the signal that ended it."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def run_child(module: str, args: Sequence[str], timeout: float = 1800,
              env: Mapping[str, str] | None = None) -> dict:
    """Run `python -m module *args` in a fresh interpreter; return what it `child_report`ed.

    Raises ChildFailed when it exits without a report (a crash, or killed for memory).
    """
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_REPORT):
            return json.loads(line[len(_REPORT):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    raise ChildFailed(f"{module} {' '.join(args)} exited {proc.returncode}: {tail[0]}",
                      proc.returncode)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming what the figures were taken on."""
    parts = [f"{_cpu_name()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
             f"torch {torch.__version__}", f"Python {platform.python_version()}",
             platform.system()]
    if torch.cuda.is_available():
        parts.insert(1, f"GPU {torch.cuda.get_device_name()}")
    try:
        import torchvision
        parts.insert(-2, f"torchvision {torchvision.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)
