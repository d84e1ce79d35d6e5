"""Writing bench results: each script owns one section of bench/RESULTS.md.

Several scripts share one results file, so each replaces only the text between its own
markers and a rerun of one benchmark keeps the others' figures.
"""

from __future__ import annotations

import datetime
import pathlib
import sys

from convbn_fx.tools.meters import machine

__all__ = ["RESULTS", "progress", "header", "write_section"]

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
_TITLE = "# convbn_fx benchmark results\n\nWritten by the scripts in bench/ (`python -m " \
         "bench.NAME`); each rewrites its own section.\n"


def progress(message: str) -> None:
    """One line of progress on stderr (stdout carries the tables)."""
    print(message, file=sys.stderr, flush=True)


def header(command: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"`{command}` — {stamp}\n\nMachine: {machine()}\n"


def write_section(name: str, text: str, path: pathlib.Path = RESULTS) -> None:
    """Replace the section `name` of the results file with `text` (appended if new)."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else _TITLE
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)
