"""`jupyter-setup`'s command line, which is also how systemd starts the wizard at boot
(`--boot --console TTY`, jupyter-firstboot@.service); `--check FILE` checks a preseed file
wherever the program runs (the card, or the host: `python -m builder.firstboot --check`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from builder.firstboot import setup_drive
from builder.firstboot.answers import parse_preseed
from builder.firstboot.card import SetupError
from builder.firstboot.console import Console, configure_line
from builder.firstboot.session import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    boot,
    certificate_check,
    rerun,
    status,
)
from builder.firstboot.system import System

# The end of --help and the man page's EXAMPLES (builder/manpage.py; tests/test_manpages.py
# parses every command line here): an explanation, then its command, indented further.
EXAMPLES = """\
Examples:
  Change the passwords, the hostname or the time zone (Enter keeps each):
    sudo jupyter-setup
  A new Jupyter token; the old one stops working:
    sudo jupyter-setup --rotate-token
  Jupyter's URLs, and its certificate's fingerprint to compare with the
  browser's:
    jupyter-setup --status
  Check a preseed file, then apply it:
    jupyter-setup --check lab.conf
    sudo jupyter-setup --preseed lab.conf
"""


class HelpFormatter(argparse.HelpFormatter):
    """builder.entry.HelpFormatter's rule, here because the card's program carries nothing of
    the host's commands: a text with line breaks of its own (the examples) is printed as
    written, the description wrapped to the terminal."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def parser() -> argparse.ArgumentParser:
    """The options people use, and those only systemd and the image's units pass (hidden)."""
    p = argparse.ArgumentParser(
        prog="jupyter-setup",
        description="Set the passwords of this Jupyter workstation, make a new token, or "
                    "show where Jupyter is. Changing anything needs root (sudo).",
        epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("--preseed", metavar="FILE", type=Path,
                   help="apply a preseed file (same keys as /boot/jupyter-firstboot.conf)")
    p.add_argument("--rotate-token", action="store_true",
                   help="make a new Jupyter token; the old one stops working")
    p.add_argument("--status", action="store_true",
                   help="show the URLs of Jupyter and its certificate's fingerprint")
    p.add_argument("--new-certificate", action="store_true",
                   help="make a new TLS certificate for Jupyter now (after the board's "
                        "address changed, say); browsers must accept the new one")
    p.add_argument("--ensure-certificate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setup-drive", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--disk", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--root-partition", type=int, help=argparse.SUPPRESS)
    p.add_argument("--check", metavar="FILE", type=Path,
                   help="only check a preseed file; print its problems")
    p.add_argument("--boot", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--console", metavar="TTY", help=argparse.SUPPRESS)
    p.add_argument("--baud", type=int, help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)
    p.add_argument("--settings", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--jupyter-python", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Ctrl-C starts the questions over, so it must arrive as KeyboardInterrupt even when the
    # wizard was started by something that ignores SIGINT (a background job of a shell
    # without job control, nohup): Python then leaves it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    system = System.open(args.root, args.settings, args.jupyter_python)
    console = Console(0, 1, args.console or _tty_name())
    if args.check:
        return _check(args.check, system)
    if args.status:
        return status(system, console)
    if os.geteuid() != 0:
        console.say("jupyter-setup: run it as root: sudo jupyter-setup")
        return EXIT_FAILED
    try:
        system.account(system.settings.user)
    except (SetupError, OSError) as exc:
        console.say(f"jupyter-setup: {exc}")
        return EXIT_FAILED
    if args.setup_drive:
        return setup_drive.boot_step(system, console.say, args.disk, args.root_partition)
    if args.ensure_certificate or args.new_certificate:
        return certificate_check(system, console, "asked for" if args.new_certificate else None)
    if args.boot:
        configure_line(0, args.baud or system.settings.baud(console.name))
        code = boot(system, console)
        console.drain()
        return code
    try:
        return rerun(system, console, args.preseed, args.rotate_token)
    except KeyboardInterrupt:
        console.say("\njupyter-setup: interrupted; nothing was changed")
        return EXIT_INTERRUPTED


def _tty_name() -> str:
    try:
        return os.ttyname(0).removeprefix("/dev/")
    except OSError:
        return "stdin"


def _check(path: Path, system: System) -> int:
    """`--check FILE`: 'ok' on stdout, or each problem on stderr, as a linter reports."""
    try:
        _, problems = parse_preseed(path.read_bytes(), system.root, system.settings)
    except OSError as exc:
        print(f"jupyter-setup: {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{path}: ok")
    return EXIT_FAILED if problems else EXIT_OK
