"""`convbn-fx measure --plot FILE`: a measurement as a picture for a slide or a PR.

One input size: saved-for-backward MiB and step time per mode, as bars. A batch sweep: the
same two figures against the batch size, the memory-vs-batch curve of You et al.
(arXiv 2305.11624, fig. 4). matplotlib is an optional extra (`pip install 'convbn-fx[plot]'`):
nothing else needs it, so it is imported only here, and only when a plot is asked for.
"""

from __future__ import annotations

import importlib.util
import pathlib

from ..vocabulary.errors import ConvBNError
from .figures import Measurement, MiB

__all__ = ["check_plot_path", "plot_measurement", "FORMATS"]

FORMATS = (".png", ".svg", ".pdf")
COLORS = {"eval": "#7f7f7f", "tune": "#1f77b4", "deploy": "#ff7f0e"}


def check_plot_path(path: str) -> None:
    """Fail before measuring: matplotlib missing, or a file type it will not write."""
    if pathlib.Path(path).suffix.lower() not in FORMATS:
        raise ConvBNError(f"cannot tell the image type of {path!r}; name a .png, .svg or "
                          ".pdf file.")
    if importlib.util.find_spec("matplotlib") is None:
        raise ConvBNError("--plot needs matplotlib, which is not installed: "
                          "pip install 'convbn-fx[plot]' (or pip install matplotlib).")


def _series(m: Measurement, mode: str, field: str, scale: float) -> list[float | None]:
    values = [getattr(r.modes[mode], field) for r in m.inputs]
    return [None if v is None else v / scale for v in values]


def plot_measurement(m: Measurement, path: str) -> None:
    """Write the figure to `path` (.png, .svg or .pdf, from its suffix)."""
    check_plot_path(path)
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    modes = list(m.inputs[0].modes)
    panels = [("saved_bytes", MiB, "saved for backward, MiB"), ("step_s", 1e-3, "step time, ms")]
    for ax, (field, scale, label) in zip(axes, panels):
        if len(m.inputs) == 1:
            values = [v or 0.0 for mode in modes for v in _series(m, mode, field, scale)]
            bars = ax.bar(modes, values, color=[COLORS.get(k, "C0") for k in modes])
            ax.bar_label(bars, fmt="%.0f")
            ax.margins(y=0.12)  # room for the labels
        else:
            batches = [r.shape[0] for r in m.inputs]
            for mode in modes:
                points = [(b, v) for b, v in zip(batches, _series(m, mode, field, scale))
                          if v is not None]
                ax.plot([b for b, _ in points], [v for _, v in points], marker="o",
                        label=mode, color=COLORS.get(mode))
            ax.set_xlabel("batch size")
            ax.set_xticks(batches)
            ax.legend()
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
    shape = m.inputs[0].shape
    where = "Bx" + "x".join(map(str, shape[1:])) if len(m.inputs) > 1 else \
        "x".join(map(str, shape))
    fig.suptitle(f"{m.spec}: {m.state}, input {where}, {m.device}")
    fig.savefig(path)
