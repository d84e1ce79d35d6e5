"""Peak memory of one step in a fresh process, and that process's entry point.

Peak memory is a property of a whole process (torch allocates outside Python, so tracemalloc
sees nothing): each variant runs in a fresh interpreter (`python -m convbn_fx.tools.peak`)
that reports its peak resident set, and on CUDA `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import torch

from .meters import ChildFailed, child_report, peak_during, run_child
from .steps import (
    compiling,
    example_input,
    is_out_of_memory,
    make_variant,
    out_of_memory,
    prepared_model,
    training_step,
)

__all__ = ["peak_memory", "PEAK_STEPS"]

PEAK_STEPS = 2      # steps the fresh process runs: the second sees the first one's leftovers


def _peak_in_child(request: dict) -> dict:
    """In the fresh process: build the variant, run PEAK_STEPS steps, report the peak."""
    device = torch.device(request["device"])
    model = prepared_model(request["spec"], request["state"]).to(device)
    net = make_variant(model, request["mode"])
    if request["compile"]:
        net = torch.compile(net)
    x = example_input(request["shape"], device)
    step = training_step(net, x, request["state"] == "finetune")
    try:
        with compiling(request["compile"]):
            # A compiled step compiles first: that is not the step's memory.
            got = peak_during(step, PEAK_STEPS, device, warmup=int(request["compile"]))
    except Exception as exc:
        if is_out_of_memory(exc):
            return {"error": out_of_memory(exc)}
        raise
    if device.type == "cuda":
        return {"peak_mib": got["cuda_peak"]}
    return {"peak_mib": got["peak_rss"] - got["rss_before"]}


def _child_env() -> dict[str, str]:
    # The fresh process imports SPEC the way this one does: same sys.path, cwd included.
    path = [p or os.getcwd() for p in sys.path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def peak_memory(spec: str, mode: str, shape: Sequence[int], state: str = "finetune",
                device: str = "cpu", compile: bool = False) -> tuple[float | None, str | None]:
    """(peak MiB, None) of PEAK_STEPS steps of `mode` in a fresh process, or (None, error).

    On CPU the peak is the growth of the process's resident memory during the steps (torch
    allocates outside Python, so only the process sees it); on CUDA it is
    `torch.cuda.max_memory_allocated`.
    """
    request = dict(spec=spec, mode=mode, shape=list(shape), state=state, device=device,
                   compile=compile)
    try:
        got = run_child("convbn_fx.tools.peak", ["--child", json.dumps(request)], env=_child_env())
    except ChildFailed as exc:
        if exc.returncode == -9:  # SIGKILL: on Linux, the kernel's out-of-memory killer
            return None, "out of memory (the fresh process was killed)"
        raise
    return got.get("peak_mib"), got.get("error")


def _child_main(argv: Sequence[str]) -> None:
    if len(argv) != 2 or argv[0] != "--child":
        sys.exit("convbn_fx.tools.peak is run by convbn-fx measure; run that instead.")
    child_report(_peak_in_child(json.loads(argv[1])))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
