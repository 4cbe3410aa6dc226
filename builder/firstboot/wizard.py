"""The questions: what the wizard asks on a console (passwords twice and hidden, hostname,
time zone, and later whether to make a new token), asked again until each answer passes its
check, skipping what a preseed already answered."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from builder.firstboot.answers import Answers, check_hostname, check_password, check_timezone
from builder.firstboot.console import Console, Garbage
from builder.firstboot.system import System, read_hostname

# Lines of noise in a row that end a session: a floating UART keeps sending them, and a
# session it started must not hold the other consoles off for ever.
NOISE_LIMIT = 5


class TooNoisy(Exception):
    """Only noise came from the line, several times in a row."""


class Wizard:
    def __init__(self, system: System, console: Console, first_boot: bool) -> None:
        self.system, self.console, self.first_boot = system, console, first_boot
        self.timeout = system.settings.answer_timeout

    def ask(self, prompt: str, check: Callable[[str], str], default: str | None = None,
            hidden: bool = False) -> str | None:
        """Ask until the answer passes `check`; Enter gives `default` (None: keep)."""
        shown = f" [{default}]" if default else ""
        noise = 0
        while True:
            try:
                answer = self.console.read_line(self.timeout, hidden=hidden,
                                                prompt=f"{prompt}{shown}: ")
            except Garbage:
                noise += 1
                if noise >= NOISE_LIMIT:
                    raise TooNoisy from None
                self.console.say("\n  unreadable input ignored (is the terminal set to the "
                                 "right baud rate?)")
                self.console.discard_input()
                continue
            if not answer.strip() and not hidden:
                return default
            try:
                return check(answer)
            except ValueError as exc:
                self.console.say(f"  {exc}" if hidden else f"  {answer.strip()!r} {exc}")

    def ask_password(self, what: str, optional: bool) -> str | None:
        minimum = self.system.settings.min_password_length
        keep = " (Enter keeps the current one)" if optional else ""
        while True:
            first = self.ask(f"{what}{keep}", lambda v: v, hidden=True)
            if not first and optional:
                return None
            try:
                check_password(first or "", minimum)
            except ValueError as exc:
                self.console.say(f"  the password {exc}; try again")
                continue
            again = self.ask(f"{what}, again", lambda v: v, hidden=True)
            if again != first:
                self.console.say("  the two passwords differ; try again")
                continue
            return first

    def questions(self, answers: Answers) -> Answers:
        """Ask for what `answers` lacks. Raises AnswerTimeout, EOFError, KeyboardInterrupt."""
        s, got = self.system.settings, replace(answers, ssh_keys=list(answers.ssh_keys))
        optional = not self.first_boot
        self.console.say(f"\nPasswords: at least {s.min_password_length} characters; "
                         f"they are not shown as you type.\n")
        if not got.has_login():
            got.login_password = self.ask_password(f"Login password for {s.user}", optional)
        if not got.has_jupyter():
            got.jupyter_password = self.ask_password("Jupyter password", optional)
            if got.jupyter_password and got.jupyter_password == got.login_password:
                # Allowed, but one password then opens both the board's shell (and sudo)
                # and Jupyter's, which crosses the network on every login.
                self.console.say("  note: the Jupyter password is the login password: whoever "
                                 "learns one has both (sudo included); run sudo jupyter-setup "
                                 "to change either")
        if not got.hostname:
            current = read_hostname(self.system)
            got.hostname = self.ask("Hostname", check_hostname, default=current)
            if got.hostname == current:
                got.hostname = None
        if not got.timezone and self.system.path("usr/share/zoneinfo").is_dir():
            current = _current_timezone(self.system)
            got.timezone = self.ask("Time zone", lambda v: check_timezone(v, self.system.root),
                                    default=current)
            if got.timezone == current:
                got.timezone = None
        if optional and got.token is None:
            rotate = self.ask("Make a new Jupyter token? (the old one stops working) [y/N]",
                              _yes_no)
            got.token = "generate" if rotate == "y" else None
        return got


def _yes_no(value: str) -> str:
    answer = value.strip().lower()[:1]
    if answer not in ("y", "n"):
        raise ValueError("answer y or n")
    return answer


def _current_timezone(system: System) -> str:
    try:
        return system.path("etc/timezone").read_text().strip() or "Etc/UTC"
    except OSError:
        return "Etc/UTC"

