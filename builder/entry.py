"""What every command's entry point shares (build-image, try-image, flash-image): an error
becomes one line and exit 1, a signal a line saying what was cleaned up and 128 + its number.
Small on purpose: each command imports this and its own modules, nothing of the others'."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from builder import __version__
from builder.errors import BuildError, Interrupted

EXIT_ERROR = 1
# What stops a command: Ctrl-C, a CI job cancelled, a terminal closed.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """SIGTERM and SIGHUP (a CI job cancelled, a terminal closed) and SIGINT raise
    Interrupted, so every cleanup on the way out runs as it does for an error."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def shielded() -> Iterator[None]:
    """Hold back SIGINT, SIGTERM and SIGHUP while cleaning up or publishing: a second Ctrl-C
    must not stop an unmount half-way. A signal that arrives meanwhile is delivered after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's own, except that a text with line breaks of its own (an epilog's examples)
    is printed as written: wrapped, a command line would run into its explanation. The
    descriptions, one long line each, are still wrapped to the terminal."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def add_common_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """-q, --debug and --version, the same on every command."""
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--debug", action="store_true", help="show commands and tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def run_reporting(program: str, body: Callable[[], int], *, debug: bool,
                  after_interrupt: str) -> int:
    """Run a command's body: an error becomes one line and exit 1, a signal a line saying
    what was cleaned up and 128 + its number (with --debug, errors keep their traceback)."""
    try:
        with signals_as_exceptions():
            return body()
    except BuildError as exc:
        if debug:
            raise
        print(f"{program}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{program}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except Interrupted as exc:
        name = signal.Signals(exc.signum).name
        print(f"{program}: interrupted by {name}; {after_interrupt}", file=sys.stderr)
        return 128 + exc.signum
