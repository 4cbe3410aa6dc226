"""try-image --smoke at the guest's serial console, as a person at the cable: typing and
awaiting text with a phase's name on every failure, logging in, the units the image adds, the
guest's own view of itself after a failure (GUEST_STATE_SECONDS at most), and the shutdown.
builder/smoke.py runs the phases; who logs in (Credentials) and how a phase fails
(SmokeFailure) are defined here, below it."""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from typing import Any

from builder.firstboot.card import TLS_CERT
from builder.serial_console import ConsoleError, ConsoleTimeout, Match, SerialConsole


@dataclass(frozen=True)
class Credentials:
    """Who the smoke logs in as: a preseed's answers, or what it typed into the wizard."""

    user: str
    login_password: str
    jupyter_password: str
    token: str | None


class SmokeFailure(Exception):
    """A phase failed: the phase, and what happened."""

    def __init__(self, phase: str, message: str) -> None:
        super().__init__(message)
        self.phase = phase


def send(console: SerialConsole, text: str, phase: str) -> None:
    try:
        console.send(text)
    except (ConsoleError, OSError) as exc:
        raise SmokeFailure(phase, f"typing on the serial console failed ({exc}): did QEMU "
                                  f"stop?") from None


def expect(console: SerialConsole, patterns: dict[str, str], timeout: float,
           phase: str) -> Match:
    try:
        return console.expect(patterns, timeout, phase)
    except ConsoleError as exc:
        raise SmokeFailure(phase, str(exc).split(": ", 1)[-1]) from None


SHELL_MARK = "TRY-IMAGE-SHELL"


def log_in_on_console(console: SerialConsole, creds: Credentials, timeout: float) -> None:
    expect(console, {"login": r"login: $|login: "}, timeout, "login")
    console.wait_quiet(3)
    send(console, creds.user + "\r", "login")
    expect(console, {"password": r"Password: "}, min(timeout, 120), "login")
    send(console, creds.login_password + "\r", "login")
    # Type nothing before the shell is there: what login or the shell's start-up reads or
    # flushes is lost (seen: half a command typed ahead). Its prompt is user@host...$.
    try:
        got = console.expect({"prompt": rf"{re.escape(creds.user)}@[^\n]*[$#] ",
                              "refused": r"Login incorrect"}, min(timeout, 300), "login")
    except ConsoleError as exc:
        if not isinstance(exc, ConsoleTimeout):
            raise SmokeFailure("login", str(exc).split(": ", 1)[-1]) from None
        got = None     # an unusual prompt: the command below still proves a shell
    if got is not None and got.name == "refused":
        raise SmokeFailure("login", "the login password was refused on the serial console")
    # A command whose output differs from its echo proves a shell ran it; typed again if
    # the shell lost it.
    for attempt in range(3):
        console.wait_quiet(1, limit=10)
        send(console, f"echo {SHELL_MARK}-$((6*7))\r", "login")
        try:
            console.expect({"shell": rf"{SHELL_MARK}-42"}, min(timeout, 60), "login")
            return
        except ConsoleTimeout:
            if attempt == 2:
                raise SmokeFailure("login", "no shell answered on the serial console after "
                                            "logging in") from None
        except ConsoleError as exc:
            raise SmokeFailure("login", str(exc).split(": ", 1)[-1]) from None


# After setup, as the login user (no root needed): which services failed, and whether a card
# with an SSH server has host keys of its own (the build removed the image's; a unit of the
# image makes them at first boot). The markers are computed by the guest's shell, so the echo
# of the typed line never matches them.
UNITS_COMMAND = ("echo UNITS-BEGIN-$((3*7)); systemctl --no-pager --failed --no-legend --plain "
                 "--type=service; if [ -x /usr/bin/ssh-keygen ]; then "
                 "if [ -s /etc/ssh/ssh_host_ed25519_key.pub ]; then echo HOSTKEYS-$((40+2)); "
                 "else echo HOSTKEYS-$((40+3)); fi; fi; echo UNITS-END-$((4*11))\r")
# The units the image adds (overlays/, --base debian); others belong to the base image.
OUR_UNITS = re.compile(r"^\s*((?:jupyter|jupyter-firstboot@\S+|regenerate-ssh-host-keys|"
                       r"grow-root-filesystem)\.service)\b", re.MULTILINE)


def check_units(console: SerialConsole, timeout: float) -> None:
    """No unit the image adds failed, and an SSH server has this card's own host keys."""
    send(console, UNITS_COMMAND, "login")
    got = expect(console, {"units": r"UNITS-BEGIN-21\r?\n([\s\S]*?)UNITS-END-44"},
                 min(timeout, 120), "login")
    listing = got.groups[0]
    failed = OUR_UNITS.findall(listing)
    if failed:
        raise SmokeFailure("login", f"failed after setup: {', '.join(failed)} (systemctl "
                                    f"--failed on the guest; journalctl -u names why)")
    if "HOSTKEYS-43" in listing:
        raise SmokeFailure("login", "the SSH server has no host keys: "
                                    "regenerate-ssh-host-keys.service did not make them")


# sudo's own prompt (%p: the user), never the shell's echo of the command typed: a password
# must arrive once sudo has turned echo off.
SUDO_PROMPT = "TRY-IMAGE-SUDO-%p:"


def _sudo_asks(creds: Credentials) -> str:
    return re.escape(SUDO_PROMPT.replace("%p", creds.user))


# What the guest says about itself when a check from outside failed: its addresses, what
# listens, what failed and its journal, the fingerprint of the certificate Jupyter serves
# (where it serves HTTPS), and the journal of Jupyter and of the network. As root (through sudo,
# as the shutdown is): the journal of system units is not for users. The markers are computed
# by the guest's shell, so the echo of the typed line does not match them; the last one is
# printed whatever sudo did, so a refusal is seen at once.
GUEST_STATE_SCRIPT = ("echo STATE-BEGIN-$((5*5)); ip -brief address; ss -ltn; "
                      "systemctl --no-pager --failed; "
                      "systemctl --no-pager --failed --no-legend --plain | while read -r u x; "
                      "do journalctl -b --no-pager -n 20 -u \"$u\"; done; "
                      f"[ -r /{TLS_CERT} ] && openssl x509 -noout -fingerprint -sha256 "
                      f"-in /{TLS_CERT}; "
                      "systemctl --no-pager status jupyter.service | tail -n 15; "
                      "journalctl -b --no-pager -n 40 -u jupyter.service "
                      "-u systemd-networkd.service -u NetworkManager.service; "
                      "echo STATE-END-$((6*7))")
GUEST_STATE_COMMAND = (f"sudo -p '{SUDO_PROMPT}' sh -c '{GUEST_STATE_SCRIPT}'; "
                       f"echo STATE-DONE-$((7*8))\r")
# All of it, login included: it only explains a failure that has already cost its phase's limit.
GUEST_STATE_SECONDS = 300


def collect_guest_state(console: SerialConsole, creds: Credentials,
                        budget: float = GUEST_STATE_SECONDS) -> str:
    """The guest's own view of itself from a root shell on its serial console, or one line
    saying why it could not be had. Never raises: it explains a failure, never replaces it."""
    deadline = time.monotonic() + budget

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    state = {"state": r"STATE-BEGIN-25\n([\s\S]*?)STATE-END-42",
             "done": r"STATE-DONE-56"}
    try:
        log_in_on_console(console, creds, left())
        console.wait_quiet(1, limit=min(10, left()))
        send(console, GUEST_STATE_COMMAND, "diagnose")
        got = expect(console, {"sudo": _sudo_asks(creds), **state},
                     left(), "diagnose")
        if got.name == "sudo":
            send(console, creds.login_password + "\r", "diagnose")
            got = expect(console, {"again": _sudo_asks(creds), **state}, left(), "diagnose")
            if got.name == "again":
                send(console, "\x03", "diagnose")     # leave sudo's second prompt
                return "(not available: sudo refused the login password)"
        if got.name == "done":
            return "(not available: sudo did not run the commands)"
        return got.groups[0].strip()
    except SmokeFailure as exc:
        return f"(not available: {exc})"
    except Exception as exc:      # a bug here must not hide the failure being explained
        return f"(not available: {type(exc).__name__}: {exc})"


# The last words of a shutdown on the serial line: systemd-shutdown's, once it has synced and
# unmounted everything (shown at the kernel's default log level; try-image raises an Armbian
# image's verbosity=1 on the trial disk), or the kernel's own (pr_emerg, shown at any level):
# "Power down", or on a machine that cannot power off, "System halted" /  "Power off not
# available: System halted instead". QEMU's orangepi-pc does not power off; it is stopped.
HALTED = (r"systemd-shutdown\[1\]: Powering off|reboot: Power down|reboot: System halted|"
          r"Power off not available")


def shut_down(console: SerialConsole, proc: Any, creds: Credentials, timeout: float) -> None:
    """`sudo poweroff` from the console's shell, so the second boot starts from a cleanly
    unmounted disk; QEMU is stopped once the guest has said it is done (HALTED)."""
    send(console, f"sudo -p '{SUDO_PROMPT}' poweroff\r", "shutdown")
    expect(console, {"sudo": _sudo_asks(creds)}, 120, "shutdown")
    send(console, creds.login_password + "\r", "shutdown")
    try:
        console.expect({"halted": HALTED}, timeout, "shutdown")
    except ConsoleError as exc:
        if proc.poll() is None:
            raise SmokeFailure("shutdown", str(exc).split(": ", 1)[-1]) from None
    with contextlib.suppress(Exception):
        proc.wait(timeout=5)
