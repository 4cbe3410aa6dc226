"""Messages and progress bars.

Everything for people goes to stderr; stdout carries only results that scripts read (the plan,
the path printed by --fetch-only), so `path=$(build-image --fetch-only ...)` works.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

_quiet = False
_debug = False
_build_log: TextIO | None = None


def setup(*, quiet: bool = False, debug: bool = False) -> None:
    global _quiet, _debug
    _quiet, _debug = quiet, debug


@contextmanager
def build_log(path: Path) -> Iterator[None]:
    """Copy every message, and all output of scripts, into `path` while the block runs."""
    global _build_log
    with open(path, "w", encoding="utf-8") as f:
        _build_log = f
        try:
            yield
        finally:
            _build_log = None


def _write(line: str, stream: TextIO | None = None, *, show: bool = True) -> None:
    if _build_log is not None:
        _build_log.write(line + "\n")
        _build_log.flush()
    if show:
        # tqdm.write keeps an active progress bar intact instead of printing through it.
        tqdm.write(line, file=stream or sys.stderr)


def info(message: str) -> None:
    _write(message, show=not _quiet)


def step_output(line: str) -> None:
    """A line of a customize script's output."""
    _write(line, show=not _quiet)


def warn(message: str) -> None:
    _write(f"warning: {message}")


def debug(message: str) -> None:
    _write(message, show=_debug) if _debug else None


def result(line: str) -> None:
    """A line on stdout, printed even with --quiet."""
    _write(line, sys.stdout)


class _Progress:
    """The part of tqdm's interface the builder uses; a no-op when bars are off."""

    def __init__(self, bar: tqdm[Any] | None) -> None:
        self._bar = bar

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)


@contextmanager
def progress(description: str, total: int | None, initial: int = 0) -> Iterator[_Progress]:
    """A byte progress bar on stderr, only when stderr is a terminal and not --quiet.

    CI logs and pipes get one line at the start instead of thousands of carriage returns.
    """
    if _quiet:
        yield _Progress(None)
        return
    if not sys.stderr.isatty():
        size = f" ({human_size(total)})" if total else ""
        _write(f"{description}{size}")
        yield _Progress(None)
        return
    # A serial console or `script` may report a size of 0 x 0, with which tqdm draws nothing
    # at all: fall back to 80 x 24.
    try:
        terminal = os.get_terminal_size(sys.stderr.fileno())
        width_known = terminal.columns > 0 and terminal.lines > 0
    except OSError:
        width_known = False
    bar = tqdm(
        total=total,
        initial=initial,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        dynamic_ncols=width_known,
        ncols=None if width_known else 80,
        nrows=None if width_known else 24,
        file=sys.stderr,
    )
    try:
        yield _Progress(bar)
    finally:
        bar.close()


def human_size(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
