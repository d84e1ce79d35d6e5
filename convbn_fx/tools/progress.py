"""A one-line progress bar on stderr, for CLI runs that take more than a moment.

`convbn-fx measure` runs dozens of training steps; without a sign of life a user cannot tell
a slow model from a hung one. The bar is drawn only on a terminal (a log file or a CI job
would collect every redraw), only once the run has lasted `delay` seconds (short runs stay
quiet), and it erases itself when done so the tables that follow start on a clean line.

    bar = ProgressBar("measure resnet50")    # measure resnet50 [#####.....] 15/30 steps  tune
    for i in range(30):
        bar(i + 1, 30, "tune: timing")
    bar.close()
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """`bar(done, total, what)` redraws `title [#####.....] done/total what` in place."""

    def __init__(self, title: str, stream: TextIO | None = None, enabled: bool | None = None,
                 delay: float = 1.0, width: int = 20):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.title, self.delay, self.width = title, delay, width
        self.start = time.monotonic()
        self.drawn = False

    def __call__(self, done: int, total: int, what: str = "") -> None:
        if not self.enabled or time.monotonic() - self.start < self.delay:
            return
        filled = self.width * done // total if total else self.width
        line = (f"{self.title} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{done}/{total} steps  {what}")
        columns = shutil.get_terminal_size((100, 24)).columns - 1
        self.stream.write("\r" + line[:columns].ljust(columns))
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        """Erase the bar (if it was drawn) and leave the cursor at the start of the line."""
        if self.drawn:
            columns = shutil.get_terminal_size((100, 24)).columns - 1
            self.stream.write("\r" + " " * columns + "\r")
            self.stream.flush()
            self.drawn = False
