"""`convbn-fx measure --plot FILE`: a measurement as a picture for a slide or a PR.

One input size: the peak as stacked bars by category per mode (what Tune removes is the
activations), and the step time with its min-max range. A batch sweep: the peak and the time
against the batch size, the memory-vs-batch curve of You et al. (arXiv 2305.11624, fig. 4).
`--fit`: every estimate the search made, against the batch, with the budget as a line.
matplotlib is an optional extra (`pip install 'convbn-fx[plot]'`): nothing else needs it, so
it is imported only here, and only when a plot is asked for.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

from ..vocabulary.errors import ConvBNError
from .figures import FitResult, Measurement, MiB
from .measure_table import format_size, memory_unit
from .tensor_peak import CATEGORIES

__all__ = ["check_plot_path", "plot_measurement", "plot_fit", "FORMATS"]

FORMATS = (".png", ".svg", ".pdf")
COLORS = {"eval": "#7f7f7f", "tune": "#1f77b4", "deploy": "#ff7f0e"}
# Lines that coincide (tune and deploy often do) stay apart by marker and dash.
STYLES = {"eval": ("o", "-"), "tune": ("s", "--"), "deploy": ("^", ":")}
CATEGORY_COLORS = {"parameters": "#4c72b0", "buffers": "#8172b3", "gradients": "#55a868",
                   "optimizer": "#937860", "activations": "#c44e52", "temporaries": "#dd8452",
                   "input": "#8c8c8c"}


def check_plot_path(path: str) -> None:
    """Fail before measuring: a file type matplotlib will not write, a folder that is not
    there or not writable, matplotlib missing."""
    target = pathlib.Path(path)
    if target.suffix.lower() not in FORMATS:
        raise ConvBNError(f"cannot tell the image type of {path!r}; name a .png, .svg or "
                          ".pdf file.")
    folder = target.parent
    if not folder.is_dir():
        raise ConvBNError(f"cannot write the plot to {path!r}: the folder {str(folder)!r} "
                          "does not exist; create it or name another.")
    if not os.access(folder, os.W_OK) or target.is_dir():
        raise ConvBNError(f"cannot write the plot to {path!r}: "
                          + ("it is a folder." if target.is_dir() else
                             f"the folder {str(folder)!r} is not writable."))
    if importlib.util.find_spec("matplotlib") is None:
        raise ConvBNError("--plot needs matplotlib, which is not installed: "
                          "pip install 'convbn-fx[plot]' (or pip install matplotlib).")


def _figure(panels: int, width: float = 4.8):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(width * panels + 1.6, 3.8), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def _stacked_peaks(ax, m: Measurement) -> None:
    r = m.inputs[0]
    modes = [k for k, f in r.modes.items() if f.peak is not None]
    name, unit, fmt = memory_unit(max(r.modes[k].peak_bytes for k in modes))
    bottom = [0.0] * len(modes)
    for cat in CATEGORIES:
        values = [r.modes[k].peak[cat] / unit for k in modes]
        if not any(values):
            continue
        ax.bar(modes, values, bottom=bottom, color=CATEGORY_COLORS[cat], label=cat)
        bottom = [b + v for b, v in zip(bottom, values)]
    totals = ax.bar(modes, bottom, fill=False, linewidth=0)   # invisible, carries the labels
    ax.bar_label(totals, labels=[format(v, fmt) for v in bottom])
    ax.margins(y=0.12)
    ax.set_ylabel(f"peak tensor memory, {name}" + (" (estimated)" if m.estimated else ""))
    # Beside the bars, never over a label; top category first, as stacked.
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize="small", loc="upper left",
              bbox_to_anchor=(1.0, 1.0))


def _time_bars(ax, m: Measurement) -> None:
    r = m.inputs[0]
    modes = [k for k, f in r.modes.items() if f.step_s is not None]
    med = [r.modes[k].step_s * 1e3 for k in modes]
    lo = [med[i] - r.modes[k].step_range_s[0] * 1e3 for i, k in enumerate(modes)]
    hi = [r.modes[k].step_range_s[1] * 1e3 - med[i] for i, k in enumerate(modes)]
    # The median goes under the bar, where the min-max whisker cannot cross it.
    ticks = [f"{k}\n{v:.1f} ms" for k, v in zip(modes, med)]
    ax.bar(ticks, med, color=[COLORS.get(k, "C0") for k in modes], yerr=[lo, hi], capsize=4,
           ecolor="black")
    ax.set_ylabel(f"step time, ms (median of {m.steps}, min–max)")


def _against_batch(ax, m: Measurement, field: str) -> None:
    """One line per mode of `field` ("peak", "saved" or "time") against the batch size."""
    batches = [r.shape[0] for r in m.inputs]
    name, unit, _ = memory_unit(max(f.peak_bytes or 0 for r in m.inputs
                                    for f in r.modes.values()))
    value, label = {
        "peak": (lambda f: None if f.peak is None else f.peak_bytes / unit,
                 f"peak tensor memory, {name}"),
        "saved": (lambda f: None if f.saved_bytes is None else f.saved_bytes / MiB,
                  "saved for backward, MiB"),
        "time": (lambda f: None if f.step_s is None else f.step_s * 1e3,
                 "step time, ms (median)")}[field]
    for mode in m.inputs[0].modes:
        points = [(b, value(r.modes[mode])) for b, r in zip(batches, m.inputs)]
        points = [(b, v) for b, v in points if v is not None]
        marker, dash = STYLES.get(mode, ("o", "-"))
        ax.plot([b for b, _ in points], [v for _, v in points], marker=marker, linestyle=dash,
                label=mode, color=COLORS.get(mode), markerfacecolor="none")
    ax.set_xlabel("batch size")
    ax.set_xticks(batches)
    ax.set_ylabel(label)
    ax.legend()


def _saved_bars(ax, m: Measurement) -> None:
    r = m.inputs[0]
    modes = list(r.modes)
    bars = ax.bar(modes, [(r.modes[k].saved_bytes or 0) / MiB for k in modes],
                  color=[COLORS.get(k, "C0") for k in modes])
    ax.bar_label(bars, fmt="%.1f")
    ax.margins(y=0.12)
    ax.set_ylabel("saved for backward, MiB")


def plot_measurement(m: Measurement, path: str) -> None:
    """Write the figure of a measurement to `path` (.png, .svg or .pdf, from its suffix)."""
    check_plot_path(path)
    timed = not m.estimated and any(f.step_s for r in m.inputs for f in r.modes.values())
    fig, axes = _figure(1 + timed)
    if len(m.inputs) == 1:
        if m.peak is not None:
            _stacked_peaks(axes[0], m)
        else:
            _saved_bars(axes[0], m)
        if timed:
            _time_bars(axes[1], m)
    else:
        _against_batch(axes[0], m, "peak" if m.peak is not None else "saved")
        if timed:
            _against_batch(axes[1], m, "time")
    for ax in axes:
        ax.set_ylim(bottom=0)
    shape = m.inputs[0].shape
    where = "Bx" + "x".join(map(str, shape[1:])) if len(m.inputs) > 1 else \
        "x".join(map(str, shape))
    fig.suptitle(f"{m.spec}: {m.state}, input {where}, {m.device}"
                 + (", estimated" if m.estimated else ""))
    fig.savefig(path)


def plot_fit(fit: FitResult, path: str) -> None:
    """Write the estimates a `--fit` search made, against the batch, with the budget line."""
    check_plot_path(path)
    fig, (ax,) = _figure(1, width=6.4)
    name, unit, fmt = memory_unit(fit.budget)
    for f in fit.modes.values():
        points = sorted(f.probes.items())
        marker, dash = STYLES.get(f.mode, ("o", "-"))
        label = f.mode if f.batch is None else f"{f.mode}: batch {f.batch}"
        ax.plot([b for b, _ in points], [n / unit for _, n in points], marker=marker,
                linestyle=dash, color=COLORS.get(f.mode), markerfacecolor="none", label=label)
        if f.batch is not None:
            ax.annotate(str(f.batch), (f.batch, f.peak["total"] / unit), textcoords="offset "
                        "points", xytext=(-4, 6), ha="right", color=COLORS.get(f.mode))
    ax.axhline(fit.budget / unit, color="black", linewidth=1)
    ax.annotate(f"budget {format_size(fit.budget)}", (0, fit.budget / unit), xytext=(4, 4),
                textcoords="offset points", xycoords=("axes fraction", "data"))
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"estimated peak tensor memory, {name}")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")
    fig.suptitle(f"{fit.spec}: {fit.state}, input Bx{'x'.join(map(str, fit.sample_shape))}, "
                 f"{fit.device}\nlargest B within {format_size(fit.budget)}, estimated",
                 fontsize="medium")
    fig.savefig(path)
