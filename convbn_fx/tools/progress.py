"""A one-line progress bar on stderr, for CLI runs that take more than a moment.

`convbn-fx measure` builds, rewrites, checks and times a model for up to minutes; without a
sign of life a user cannot tell a slow model from a hung one, nor how long is left. The bar
counts the run's phases (building, rewriting, each mode's checks, every step), names the
one running, and shows the time elapsed and an estimate of the time left. It is drawn only on
a terminal (a log file or a CI job would collect every redraw), from `delay` seconds on
(short runs stay quiet), redrawn every `tick` seconds even inside a long phase, and erased
when done so the tables that follow start on a clean line.

tqdm draws it where installed (it comes with timm and transformers, through huggingface_hub):
it fits the terminal's width as it changes and is what users know. It is an optional extra
(`pip install 'convbn-fx[progress]'`); without it a plain bar says the same.

    bar = ProgressBar("measure resnet50")
    bar(5, 12, "tune: timed step 2/3")   # measure resnet50 [########....] 5/12 0:07<0:10 tune...
    bar.close()
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import threading
import time
from typing import TextIO

__all__ = ["ProgressBar", "have_tqdm"]


def have_tqdm() -> bool:
    return importlib.util.find_spec("tqdm") is not None


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else \
        f"{minutes}:{seconds:02d}"


class ProgressBar:
    """`bar(done, total, what)`: `done` of `total` phases finished, `what` runs now."""

    def __init__(self, title: str, stream: TextIO | None = None, enabled: bool | None = None,
                 delay: float = 1.0, width: int = 20, tick: float = 0.5,
                 use_tqdm: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.title, self.delay, self.width, self.tick = title, delay, width, tick
        self.use_tqdm = have_tqdm() if use_tqdm is None else use_tqdm
        self.start = time.monotonic()
        self.state = (0, 0, "")
        self.drawn = False
        self._tqdm = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __call__(self, done: int, total: int, what: str = "") -> None:
        if not self.enabled:
            return
        with self._lock:
            self.state = (done, total, what)
        if self._ticker is None and self.tick > 0:
            self._ticker = threading.Thread(target=self._tick, daemon=True,
                                            name="convbn-fx progress")
            self._ticker.start()
        self._draw()

    def _tick(self) -> None:
        while not self._stop.wait(self.tick):
            self._draw()

    def _draw(self) -> None:
        with self._lock:
            if self._stop.is_set() or time.monotonic() - self.start < self.delay:
                return
            if self.use_tqdm:
                self._draw_tqdm()
            else:
                self._draw_plain()
            self.drawn = True

    def _draw_tqdm(self) -> None:
        done, total, what = self.state
        if self._tqdm is None:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, initial=done, desc=self.title, file=self.stream,
                              leave=False, mininterval=0)
            self._tqdm.start_t = time.time() - (time.monotonic() - self.start)  # from ours
        bar = self._tqdm
        # The size as shutil reads it (COLUMNS first, then a fallback): on a terminal that
        # reports no size tqdm reads 0 columns and -1 rows, and draws nothing.
        bar.ncols, bar.nrows = self._columns(), shutil.get_terminal_size((100, 24)).lines
        bar.bar_format = ("{desc} {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}]"
                          "  " + what.replace("{", "{{").replace("}", "}}"))
        bar.total, bar.n = total, done
        bar.refresh()

    @staticmethod
    def _columns() -> int:
        return shutil.get_terminal_size((100, 24)).columns - 1

    def _draw_plain(self) -> None:
        done, total, what = self.state
        elapsed = time.monotonic() - self.start
        filled = self.width * done // total if total else self.width
        left = f"<{_clock(elapsed * (total - done) / done)}" if 0 < done < total else ""
        line = (f"{self.title} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} "
                f"{_clock(elapsed)}{left}  {what}")
        columns = self._columns()
        self.stream.write("\r" + line[:columns].ljust(columns))
        self.stream.flush()

    def close(self) -> None:
        """Stop redrawing; erase the bar (if it was drawn), the cursor at the line's start."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            if self._tqdm is not None:
                self._tqdm.close()
                self._tqdm = None
            elif self.drawn:
                self.stream.write("\r" + " " * self._columns() + "\r")
                self.stream.flush()
            self.drawn = False
