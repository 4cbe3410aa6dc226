"""What every command's entry point shares (build-image, try-image, flash-image): a usage error
becomes one line and exit 2, a failure one line and exit 1, a signal a line saying what was
cleaned up and 128 + its number, a reader that went away (`| head`) a quiet exit.
Small on purpose: each command imports this and its own modules, nothing of the others'."""

from __future__ import annotations

import argparse
import functools
import os
import select
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Protocol

from builder import __version__
from builder.errors import BuildError, Interrupted, UsageError

EXIT_ERROR = 1
EXIT_USAGE = 2             # as argparse exits for an unknown flag
# The command ran, and what it checked is not sound: the card does not hold the image
# (flash-image), the image failed try-image --smoke. A script can tell it from a failure to
# check at all (1).
EXIT_NOT_SOUND = 3
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE     # what a shell shows for a program SIGPIPE ended
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
    """Run a command's body: a usage error becomes one line and exit 2, any other error one
    line and exit 1, a signal a line saying what was cleaned up and 128 + its number (with
    --debug, errors keep their traceback)."""
    try:
        with signals_as_exceptions():
            return body()
    except BrokenPipeError as exc:
        if not stdout_reader_gone():
            return report_os_error(program, exc, debug=debug)
        raise           # the reader went away: quiet_on_closed_pipe ends the command
    except BuildError as exc:
        if debug:
            raise
        print(f"{program}: error: {exc}", file=sys.stderr)
        for detail in exc.details:
            print(f"  {detail}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR
    except OSError as exc:
        return report_os_error(program, exc, debug=debug)
    except Interrupted as exc:
        name = signal.Signals(exc.signum).name
        print(f"{program}: interrupted by {name}; {after_interrupt}", file=sys.stderr)
        return 128 + exc.signum


def report_os_error(program: str, exc: OSError, *, debug: bool) -> int:
    if debug:
        raise exc
    where = f"{exc.filename}: " if exc.filename else ""
    print(f"{program}: error: {where}{exc.strerror or exc}", file=sys.stderr)
    return EXIT_ERROR


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe nobody reads any more (poll says POLLERR for its write end),
    rather than some other pipe of the command's that broke, which is a real failure."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


class Main(Protocol):
    """A command's entry point: the console script calls it with no arguments."""

    def __call__(self, argv: Sequence[str] | None = None) -> int: ...


def quiet_on_closed_pipe(main: Main) -> Main:
    """A command's main, ending quietly (128 + SIGPIPE, as a shell shows for a program the
    pipe's signal ended) when whoever read its stdout went away: `--help | head` included,
    which argparse prints outside run_reporting."""

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        try:
            try:
                return main(argv)
            finally:
                # Here, not at the interpreter's exit, where it would be "Exception ignored".
                sys.stdout.flush()
        except BrokenPipeError:
            if not stdout_reader_gone():
                raise
            # `build-image --list-boards | head`: the reader has all it wanted. Python would
            # complain again when it flushes stdout at exit, so stdout goes nowhere from here.
            quiet_stdout()
            return EXIT_BROKEN_PIPE

    return wrapper


def quiet_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for a closed pipe is dropped."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


@contextmanager
def checking_usage() -> Iterator[None]:
    """Errors found while checking what the command line asks for (its flags, and the
    configuration and preseed files it names) are usage errors, whichever check finds them."""
    try:
        yield
    except UsageError:
        raise
    except BuildError as exc:
        raise UsageError(str(exc), exc.details) from None
