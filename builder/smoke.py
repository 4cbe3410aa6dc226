"""try-image --smoke: a first boot driven from outside, as a person at the serial console and
a browser would, on a trial disk builder/tryimage.py prepared; the Trial it hands over is all
this module knows of the command.

What it proves, phase by phase. Each phase is a key of TIMEOUTS, its limit in seconds,
counted from the end of the phase before (`--timeout PHASE=SECONDS` changes one):

  u-boot       (machines that boot U-Boot: orangepi-pc) the image's SPL, "Starting kernel"
  kernel       the kernel reaches systemd
  userspace    the setup wizard's banner on the serial console (its unit failing ends it at once)
  wizard       answered with generated passwords, or by a preseed; the token it prints is read
  jupyter      Jupyter answers HTTP on the forwarded port
  cell         strangers get 403, the token and the password get in; a kernel runs the stack's
               cell with known answers, as the image's user (not root), on a root partition
               that grew at first boot
  browser      JupyterLab loads in headless Chromium with the token; a screenshot is kept
               (skipped with a note: no Chromium, --no-browser, a preseed fixing no token)
  login        a login prompt on the console after setup; the login password gives a shell
  shutdown     `sudo poweroff` to the guest's last words, so the next boot finds a clean disk;
               at least 1.5 times the boot's own time, unless --timeout set it
  second-boot  the same disk again: no wizard, a login prompt, Jupyter by itself with the same
               password and token

and, over both boots, that no password ever appears on the serial console.

The first failure ends the run (exit 2) with its phase, what was awaited and the serial
console's tail; when Jupyter, the cell or the browser failed while the guest runs, the guest's
own view is first read from a root shell on its console (GUEST_STATE_SECONDS at most). Each run
keeps its own report directory (report.json, summary.txt, both boots' serial logs, QEMU's log,
the screenshot, the guest's view). Its limits: this is QEMU's orangepi-pc or virt, not the
board; and a generated token is shown only on the console that ran setup, so with a preseed
fixing none the token and browser checks are skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from builder import browser as browser_check
from builder import jupyter_client as jupyter
from builder import log, qemu
from builder.compression import image_suffix
from builder.errors import BuildError
from builder.serial_console import ConsoleError, ConsoleTimeout, Match, SerialConsole, tail

EXIT_FAILED = 2
# Generous, because emulation is slow (measured figures are in README "Trying an image").
TIMEOUTS: dict[str, float] = {
    "u-boot": 180,          # QEMU start to "Starting kernel"
    "kernel": 600,          # to systemd's welcome
    "userspace": 1500,      # to the setup wizard's banner
    "wizard": 900,          # answering it, to "Setup is complete"
    "jupyter": 1200,        # to Jupyter answering HTTP
    "cell": 1200,           # a kernel started and the stack's cell run
    "browser": 600,         # JupyterLab's page in Chromium
    "login": 900,           # the console's login prompt and a shell
    "shutdown": 600,        # at least; longer on a machine that booted slowly (see below)
    "second-boot": 2400,    # from QEMU's start to the login prompt and Jupyter again
}


@dataclass(frozen=True)
class Credentials:
    """Who the smoke logs in as: a preseed's answers, or what it typed into the wizard."""

    user: str
    login_password: str
    jupyter_password: str
    token: str | None


@dataclass(frozen=True)
class Trial:
    """A trial disk ready to boot and what this run was asked for, from try-image's setup."""

    image: str                          # the image's file name, for the report
    board: str                          # the board's id
    machine: qemu.Machine
    disk: Path
    kernel: qemu.Kernel | None          # what virt boots, copied out of the image
    work: Path                          # QEMU's log and the serial socket go here
    user: str                           # the image's Jupyter user
    guest_port: int                     # Jupyter's port in the guest
    host_port: int                      # forwarded to it on 127.0.0.1
    root_partition: int                 # the root partition's size in the image, before boot
    timeouts: dict[str, float]          # TIMEOUTS with --timeout's changes
    timeouts_given: frozenset[str]      # the phases --timeout set: those are not scaled
    credentials: Credentials | None     # a preseed's: it answers the wizard itself
    browser: bool
    report: Path                        # this run's own report directory

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.host_port}"


@dataclass
class Report:
    """What --smoke found, written as report.json and printed as a summary."""

    image: str
    board: str = ""
    machine: str = ""
    ok: bool = False
    failed_phase: str | None = None
    error: str | None = None
    phases: dict[str, float] = field(default_factory=dict)      # seconds each
    checks: list[str] = field(default_factory=list)             # what passed, in order
    notes: list[str] = field(default_factory=list)
    stack: dict[str, Any] = field(default_factory=dict)
    guest_state: str | None = None      # what the guest said about itself after a failure

    def passed(self, what: str) -> None:
        self.checks.append(what)
        log.info(f"ok: {what}")


class SmokeFailure(Exception):
    """A phase failed: the phase, and what happened."""

    def __init__(self, phase: str, message: str) -> None:
        super().__init__(message)
        self.phase = phase


def run(trial: Trial) -> int:
    """The whole smoke, its report written whatever happened: 0 when every check passed,
    else EXIT_FAILED, with the failure and the serial console's tail on stderr."""
    report = Report(image=trial.image, board=trial.board, machine=trial.machine.name)
    try:
        run_phases(trial, report)
        report.ok = True
    except SmokeFailure as exc:
        report.failed_phase, report.error = exc.phase, str(exc)
    finally:
        write_report(report, trial.report)
        if (trial.work / "qemu.log").exists():
            shutil.copy(trial.work / "qemu.log", trial.report / "qemu.log")
        if report.guest_state is not None:
            (trial.report / "guest-state.txt").write_text(report.guest_state + "\n")
    sys.stdout.write(summary(report))
    if not report.ok:
        serial = last_serial_log(trial.report)
        print(f"\ntry-image: {report.failed_phase} failed: {report.error}\n"
              f"last 50 lines of the serial console ({serial or '-'}):\n"
              f"{tail(serial) if serial else ''}", file=sys.stderr)
        if report.guest_state is not None:
            print(f"\nwhat the guest said about itself (as root, on its serial console; "
                  f"{trial.report / 'guest-state.txt'}):\n{report.guest_state}",
                  file=sys.stderr)
    print(f"try-image: report in {trial.report}")
    return 0 if report.ok else EXIT_FAILED


def last_serial_log(directory: Path) -> Path | None:
    """The serial log of the boot started last (boot1, then boot2): the failure is in it."""
    logs = sorted(directory.glob("serial-boot*.log"))
    return logs[-1] if logs else None


def run_phases(trial: Trial, report: Report) -> None:
    """The phases in order, each timed into `report`; the first failure raises SmokeFailure."""
    t = trial.timeouts
    credentials = trial.credentials
    with booted(trial, "boot1") as (console, proc):
        started = time.monotonic()
        if trial.machine.boots_uboot:
            _expect(console, {"spl": r"U-Boot SPL"}, t["u-boot"], "u-boot")
            _expect(console, {"kernel": r"Starting kernel"}, t["u-boot"], "u-boot")
            started = _phase(report, "u-boot", started)
        _expect(console, {"systemd": r"Welcome to [^\n]*!|systemd\[1\]: systemd \d+"},
                t["kernel"], "kernel")
        started = _phase(report, "kernel", started)
        got = _expect(console, {"banner": r"=== Jupyter workstation setup",
                                "crashed": _wizard_failed(trial)}, t["userspace"], "userspace")
        if got.name == "crashed":
            raise SmokeFailure("userspace", _WIZARD_FAILED_MESSAGE)
        started = _phase(report, "userspace", started)
        credentials = answer_wizard(console, trial, credentials, t["wizard"])
        started = _phase(report, "wizard", started)
        report.passed("the setup wizard ran on the serial console and completed")
        check_no_secret_on_console(trial, credentials, "wizard")
        report.passed("no password appeared on the serial console during setup")
        try:
            try:
                jupyter.wait_until_up(trial.base, t["jupyter"],
                                      alive=lambda: proc.poll() is None)
            except jupyter.JupyterError as exc:
                raise SmokeFailure("jupyter", str(exc)) from None
            started = _phase(report, "jupyter", started)
            check_jupyter(trial, credentials, report)
            started = _phase(report, "cell", started)
            if credentials.token and trial.browser:
                check_browser(trial, credentials.token, report)
            elif trial.browser:
                report.notes.append("browser check skipped: the preseed fixes no token")
        except SmokeFailure:
            # Seen from outside, "no answer" could be the guest's network, Jupyter, or the
            # guest itself: ask the guest, which is still running, before it is stopped.
            if proc.poll() is None:
                report.guest_state = collect_guest_state(console, credentials)
            raise
        started = time.monotonic()
        log_in_on_console(console, credentials, t["login"])
        report.passed("a login prompt on the serial console after setup; the login "
                      "password works there")
        check_units(console, t["login"])
        started = _phase(report, "login", started)
        report.passed("no unit the image adds failed, and the card made its own SSH host "
                      "keys")
        shut_down(console, proc, credentials, shutdown_limit(trial, report))
        _phase(report, "shutdown", started)
        report.passed("the guest shut down cleanly")
    second_boot(trial, credentials, report)
    check_no_secret_on_console(trial, credentials, "shutdown")
    report.passed("no password appeared on the serial console in either boot")


@contextlib.contextmanager
def booted(trial: Trial, name: str) -> Iterator[tuple[SerialConsole, Any]]:
    """QEMU running the trial disk, its serial console connected and logged to the report."""
    sock_path = trial.work / "serial.sock"
    sock_path.unlink(missing_ok=True)
    argv = qemu.command(trial.machine, trial.disk, trial.kernel,
                        f"unix:{sock_path},server=on,wait=on", trial.host_port, trial.guest_port)
    log_path = trial.report / f"serial-{name}.log"
    with open(log_path, "wb") as serial_log, \
            qemu.running(argv, trial.work / "qemu.log") as proc:
        sock = qemu.connect_serial(sock_path, proc)
        console = SerialConsole(sock.fileno(), serial_log)
        try:
            yield console, proc
        finally:
            console.close()
            sock.close()


def _phase(report: Report, name: str, started: float) -> float:
    now = time.monotonic()
    report.phases[name] = round(now - started, 1)
    log.info(f"{name}: {report.phases[name]:.0f} s")
    return now


def _send(console: SerialConsole, text: str, phase: str) -> None:
    try:
        console.send(text)
    except (ConsoleError, OSError) as exc:
        raise SmokeFailure(phase, f"typing on the serial console failed ({exc}): did QEMU "
                                  f"stop?") from None


def _expect(console: SerialConsole, patterns: dict[str, str], timeout: float,
            phase: str) -> Match:
    try:
        return console.expect(patterns, timeout, phase)
    except ConsoleError as exc:
        raise SmokeFailure(phase, str(exc).split(": ", 1)[-1]) from None


def check_no_secret_on_console(trial: Trial, creds: Credentials, phase: str) -> None:
    """Everything typed at hidden prompts (the wizard's, login's, sudo's) stays off the
    serial line, which a report or a screen share shows."""
    for log_path in sorted(trial.report.glob("serial-boot*.log")):
        serial = log_path.read_bytes()
        for secret in (creds.login_password, creds.jupyter_password):
            if secret.encode() in serial:
                raise SmokeFailure(phase, f"a password appeared on the serial console "
                                          f"({log_path.name})")


# systemd's status line when the wizard's unit on the console failed (seen once: python3
# killed by SIGSEGV under QEMU's emulated H3): nothing more will come, so say so at once.
_WIZARD_FAILED_MESSAGE = ("the setup wizard's unit on the serial console failed (see "
                          "'systemctl status jupyter-firstboot@...' in the serial log)")


def _wizard_failed(trial: Trial) -> str:
    return rf"Failed to start [^\n]*setup on {re.escape(trial.machine.console)}\b"


def answer_wizard(console: SerialConsole, trial: Trial, known: Credentials | None,
                  timeout: float) -> Credentials:
    """The wizard's questions, answered as a person would; a preseed answers them itself."""
    if known is not None:
        got = _expect(console, {"done": r"Setup is complete\.",
                                "failed": r"Setup failed: [^\n]*|Setup hit an error[^\n]*"},
                      timeout, "wizard")
        if got.name == "failed":
            raise SmokeFailure("wizard", got.text.strip())
        return replace(known, user=trial.user)
    creds = Credentials(trial.user, secrets.token_urlsafe(12), secrets.token_urlsafe(12),
                        None)
    deadline = time.monotonic() + timeout
    prompts = {
        "begin": r"Press Enter (?:\(nothing else\) )?to begin setup[^\n]*",
        "login_again": r"Login password for \S+, again: ",
        "login": r"Login password for \S+: ",
        "jupyter_again": r"Jupyter password, again: ",
        "jupyter": r"Jupyter password: ",
        "hostname": r"Hostname \[[^\]\n]*\]: ",
        "timezone": r"Time zone \[[^\]\n]*\]: ",
        "differ": r"the two passwords differ|the password [^\n]*; try again",
        "done": r"Setup is complete\.",
        "running": r"Setup is running on (\S+);",
        "failed": r"Setup failed: [^\n]*|Setup hit an error[^\n]*",
        "crashed": _wizard_failed(trial),
    }
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SmokeFailure("wizard", f"setup did not complete in {timeout:.0f} s")
        got = _expect(console, prompts, left, "wizard")
        if got.name == "done":
            break
        if got.name == "failed":
            raise SmokeFailure("wizard", got.text.strip())
        if got.name == "crashed":
            raise SmokeFailure("wizard", _WIZARD_FAILED_MESSAGE)
        if got.name == "running":
            raise SmokeFailure("wizard", f"setup started on {got.groups[0]}, not on the serial "
                                         f"console (a preseed on the card?)")
        if got.name == "differ":
            raise SmokeFailure("wizard", f"the wizard refused a password: {got.text!r}")
        answer = {"begin": "", "login": creds.login_password,
                  "login_again": creds.login_password, "jupyter": creds.jupyter_password,
                  "jupyter_again": creds.jupyter_password}.get(got.name, "")
        _send(console, answer + "\r", "wizard")
    token = _expect(console, {"token": r"Token: (\S+)\s"}, 120, "wizard")
    return replace(creds, token=token.groups[0])


def check_jupyter(trial: Trial, creds: Credentials, report: Report) -> None:
    t = trial.timeouts
    try:
        jupyter.refuses_strangers(trial.base)
        report.passed("Jupyter refuses requests without credentials (403)")
        if creds.token:
            jupyter.token_works(trial.base, creds.token)
            report.passed("the token shown by the wizard gets in")
        else:
            report.notes.append("token check skipped: the preseed fixes no token (a generated "
                                "one is shown only on the console that ran setup)")
        session = jupyter.Session(trial.base)
        try:
            session.login(creds.jupyter_password)
            report.passed("the Jupyter password logs in through the login form")
            kernel = session.start_kernel()
            result = session.execute(kernel, jupyter.STACK_CELL, t["cell"])
            session.stop_kernel(kernel)
        finally:
            session.close()
        got = jupyter.check_stack_output(result.stdout)
    except (jupyter.JupyterError, OSError) as exc:
        raise SmokeFailure("cell", str(exc)) from None
    except Exception as exc:   # requests' and websocket's errors: a network failure
        raise SmokeFailure("cell", f"{type(exc).__name__}: {exc}") from None
    report.stack = got
    report.passed(f"a kernel ran a cell importing numpy, scipy, pandas, matplotlib, sympy "
                  f"and geopandas, with the right answers, in {result.seconds:.0f} s")
    if got["user"] != trial.user:
        raise SmokeFailure("cell", f"Jupyter's kernel runs as {got['user']}, not {trial.user}")
    report.passed(f"Jupyter runs as {trial.user}, not root")
    # Partition sizes compared: statvfs leaves out what dumpe2fs counts (journal, metadata).
    if got["root_partition_bytes"] <= trial.root_partition:
        raise SmokeFailure("cell", f"the root partition was not expanded at first boot "
                                   f"({got['root_partition_bytes']} bytes, as in the image)")
    report.passed(f"the root filesystem grew at first boot (partition "
                  f"{log.human_size(trial.root_partition)} → "
                  f"{log.human_size(got['root_partition_bytes'])})")


def check_browser(trial: Trial, token: str, report: Report) -> None:
    chromium = browser_check.find_chromium()
    if chromium is None:
        report.notes.append("browser check skipped: chromium is not installed "
                            "(apt-get install chromium)")
        log.warn(report.notes[-1])
        return
    started = time.monotonic()
    try:
        seen = browser_check.check_jupyterlab(
            trial.base, token, trial.report / "jupyterlab.png",
            timeout=trial.timeouts["browser"], chromium=chromium)
    except browser_check.BrowserError as exc:
        raise SmokeFailure("browser", str(exc)) from None
    except Exception as exc:   # the DevTools protocol's own errors, a dropped websocket
        raise SmokeFailure("browser", f"{type(exc).__name__}: {exc}") from None
    _phase(report, "browser", started)
    report.passed(f"JupyterLab loads in headless Chromium with the token "
                  f"(“{seen.title}”; screenshot {seen.screenshot.name})")


SHELL_MARK = "TRY-IMAGE-SHELL"


def log_in_on_console(console: SerialConsole, creds: Credentials, timeout: float) -> None:
    _expect(console, {"login": r"login: $|login: "}, timeout, "login")
    console.wait_quiet(3)
    _send(console, creds.user + "\r", "login")
    _expect(console, {"password": r"Password: "}, min(timeout, 120), "login")
    _send(console, creds.login_password + "\r", "login")
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
        _send(console, f"echo {SHELL_MARK}-$((6*7))\r", "login")
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
    _send(console, UNITS_COMMAND, "login")
    got = _expect(console, {"units": r"UNITS-BEGIN-21\r?\n([\s\S]*?)UNITS-END-44"},
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
# listens, what failed, and the journal of Jupyter and of the network. As root (through sudo,
# as the shutdown is): the journal of system units is not for users. The markers are computed
# by the guest's shell, so the echo of the typed line does not match them; the last one is
# printed whatever sudo did, so a refusal is seen at once.
GUEST_STATE_SCRIPT = ("echo STATE-BEGIN-$((5*5)); ip -brief address; ss -ltn; "
                      "systemctl --no-pager --failed; "
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
        _send(console, GUEST_STATE_COMMAND, "diagnose")
        got = _expect(console, {"sudo": _sudo_asks(creds), **state},
                      left(), "diagnose")
        if got.name == "sudo":
            _send(console, creds.login_password + "\r", "diagnose")
            got = _expect(console, {"again": _sudo_asks(creds), **state}, left(), "diagnose")
            if got.name == "again":
                _send(console, "\x03", "diagnose")     # leave sudo's second prompt
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
# A shutdown stops what the boot started: on an emulated machine that booted slowly it takes
# longer too, so its limit is at least this many times the boot's own time.
SHUTDOWN_PER_BOOT = 1.5


def shutdown_limit(trial: Trial, report: Report) -> float:
    """The shutdown's time limit: the phase's, or longer on a slow machine, measured by how
    long this guest took from QEMU's start to the setup wizard. A --timeout given wins."""
    limit = trial.timeouts["shutdown"]
    if "shutdown" in trial.timeouts_given:
        return limit
    booted_in = sum(report.phases.get(p, 0.0) for p in ("u-boot", "kernel", "userspace"))
    return max(limit, SHUTDOWN_PER_BOOT * booted_in)


def shut_down(console: SerialConsole, proc: Any, creds: Credentials, timeout: float) -> None:
    """`sudo poweroff` from the console's shell, so the second boot starts from a cleanly
    unmounted disk; QEMU is stopped once the guest has said it is done (HALTED)."""
    _send(console, f"sudo -p '{SUDO_PROMPT}' poweroff\r", "shutdown")
    _expect(console, {"sudo": _sudo_asks(creds)}, 120, "shutdown")
    _send(console, creds.login_password + "\r", "shutdown")
    try:
        console.expect({"halted": HALTED}, timeout, "shutdown")
    except ConsoleError as exc:
        if proc.poll() is None:
            raise SmokeFailure("shutdown", str(exc).split(": ", 1)[-1]) from None
    with contextlib.suppress(Exception):
        proc.wait(timeout=5)


def second_boot(trial: Trial, creds: Credentials, report: Report) -> None:
    t = trial.timeouts["second-boot"]
    started = time.monotonic()
    with booted(trial, "boot2") as (console, proc):
        got = _expect(console, {"wizard": r"=== Jupyter workstation setup",
                                "login": r"login: "}, t, "second-boot")
        if got.name == "wizard":
            raise SmokeFailure("second-boot", "the setup wizard ran again on the second boot")
        report.passed("the second boot goes to the login prompt; the wizard does not run again")
        try:
            jupyter.wait_until_up(trial.base, max(60, t - (time.monotonic() - started)),
                                  alive=lambda: proc.poll() is None)
            jupyter.refuses_strangers(trial.base)
            if creds.token:
                jupyter.token_works(trial.base, creds.token)
            session = jupyter.Session(trial.base)
            try:
                session.login(creds.jupyter_password)
            finally:
                session.close()
        except (jupyter.JupyterError, OSError) as exc:
            raise SmokeFailure("second-boot", str(exc)) from None
        except Exception as exc:
            raise SmokeFailure("second-boot", f"{type(exc).__name__}: {exc}") from None
        _phase(report, "second-boot", started)
        report.passed("Jupyter started by itself on the second boot, with the same password"
                      + (" and token" if creds.token else ""))


def summary(report: Report) -> str:
    lines = [f"try-image --smoke: {'PASSED' if report.ok else 'FAILED'} — {report.image} "
             f"({report.board} on QEMU {report.machine})", "", "phases (seconds):"]
    lines += [f"  {name:<12} {seconds:7.0f}" for name, seconds in report.phases.items()]
    lines += ["", "checks passed:"] + [f"  ✓ {c}" for c in report.checks]
    if report.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in report.notes]
    if not report.ok:
        lines += ["", f"FAILED in {report.failed_phase}: {report.error}"]
    return "\n".join(lines) + "\n"


def write_report(report: Report, directory: Path) -> None:
    (directory / "report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    (directory / "summary.txt").write_text(summary(report))


def new_report_directory(reports: Path, image: Path) -> Path:
    """A directory of this run's own in `reports`, named after the image and the time, and
    `reports/latest` pointing to it. An earlier run's report is never touched: after a
    failure, the next run (of this image or another) must not take its evidence away."""
    try:
        reports.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"--report {reports}: cannot make it ({exc.strerror}); give a "
                         f"writable directory") from None
    stem = image.name[: -len(image_suffix(image.name))] or image.name
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        directory = reports / (name if n == 1 else f"{name}-{n}")
        try:
            directory.mkdir()
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise BuildError(f"--report {reports}: cannot write there ({exc.strerror}); give "
                             f"a writable directory") from None
    else:
        raise BuildError(f"--report {reports}: too many reports named {name}")
    latest = reports / "latest"
    if not latest.exists() or latest.is_symlink():
        link = reports / f".latest-{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(directory.name)
        os.replace(link, latest)
    return directory
