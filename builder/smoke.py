"""try-image --smoke: a first boot driven from outside, as a person at the serial console and
a browser would, on a trial disk builder/tryimage.py prepared; the Trial it hands over is all
this module knows of the command.

What it proves, phase by phase. Each phase is a key of TIMEOUTS, its limit in seconds,
counted from the end of the phase before (`--timeout PHASE=SECONDS` changes one):

  u-boot       (machines that boot U-Boot: orangepi-pc) the image's SPL, "Starting kernel"
  kernel       the kernel reaches systemd
  userspace    the setup wizard's banner on the serial console (its unit failing ends it at once)
  wizard       answered with generated passwords, or by a preseed; the token it prints is read,
               and with TLS the certificate's fingerprint and the card's <name>.local
  jupyter      Jupyter answers on the forwarded port. With TLS (the image's release file says
               JUPYTER_TLS=yes): the certificate it serves is exactly the one whose
               fingerprint the console showed, and plain HTTP gets no login page
  cell         strangers get 403, the token and the password get in; a kernel runs the stack's
               cell with known answers, as the image's user (not root), on a root partition
               that grew at first boot
  browser      JupyterLab loads in headless Chromium with the token; a screenshot is kept
               (skipped with a note: no Chromium, --no-browser, a preseed fixing no token)
  login        a login prompt on the console after setup; the login password gives a shell
  shutdown     `sudo poweroff` to the guest's last words, so the next boot finds a clean disk;
               at least 1.5 times the boot's own time, unless --timeout set it
  second-boot  the same disk again: no wizard, a login prompt (with TLS, after a banner showing
               the same fingerprint), Jupyter by itself with the same password and token (and
               the same certificate)

and, over both boots, that no password ever appears on the serial console. With TLS every
check of Jupyter, the browser's too, trusts only the certificate pinned in the jupyter phase
(builder/pinning.py); without it (JUPYTER_TLS=no, or an image from before HTTPS) they use
plain HTTP, as the report notes.

The first failure ends the run (exit 3) with its phase, what was awaited and the serial
console's tail; when Jupyter, the cell or the browser failed while the guest runs, the guest's
own view is first read from a root shell on its console (builder/guest_shell.py). Each run
keeps its own report directory (report.json, summary.txt, both boots' serial logs, QEMU's log,
the screenshot, the guest's view). Its limits: this is QEMU's orangepi-pc or virt, not the
board; and a generated token is shown only on the console that ran setup, so with a preseed
fixing none the token and browser checks are skipped.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from builder import browser as browser_check
from builder import jupyter_client as jupyter
from builder import log, pinning, qemu
from builder.entry import EXIT_NOT_SOUND
from builder.guest_shell import (
    Credentials,
    SmokeFailure,
    check_units,
    collect_guest_state,
    expect,
    log_in_on_console,
    send,
    shut_down,
)
from builder.serial_console import ConsoleError, ConsoleTimeout, SerialConsole, tail
from builder.smoke_report import Report, last_serial_log, summary, write_report

EXIT_FAILED = EXIT_NOT_SOUND
# Generous, because emulation is slow (measured figures are in docs/trying.md).
TIMEOUTS: dict[str, float] = {
    "u-boot": 180,          # QEMU start to "Starting kernel"
    "kernel": 600,          # to systemd's welcome
    "userspace": 1500,      # to the setup wizard's banner
    "wizard": 900,          # answering it, to "Setup is complete"
    "jupyter": 1200,        # to Jupyter answering (over HTTPS: its certificate pinned)
    "cell": 1200,           # a kernel started and the stack's cell run
    "browser": 600,         # JupyterLab's page in Chromium
    "login": 900,           # the console's login prompt and a shell
    "shutdown": 600,        # at least; longer on a machine that booted slowly (see below)
    "second-boot": 2400,    # from QEMU's start to the login prompt and Jupyter again
}


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
    tls: bool = False                   # the image's JUPYTER_TLS=yes: Jupyter serves HTTPS

    @property
    def base(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.host_port}"


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


def run_phases(trial: Trial, report: Report) -> None:
    """The phases in order, each timed into `report`; the first failure raises SmokeFailure."""
    t = trial.timeouts
    credentials = trial.credentials
    if not trial.tls:
        report.notes.append("plain HTTP: the image's release file does not say JUPYTER_TLS=yes "
                            "(an image built with jupyter.tls off, or before HTTPS), so "
                            "Jupyter was checked without TLS")
    with booted(trial, "boot1") as (console, proc):
        started = time.monotonic()
        if trial.machine.boots_uboot:
            expect(console, {"spl": r"U-Boot SPL"}, t["u-boot"], "u-boot")
            expect(console, {"kernel": r"Starting kernel"}, t["u-boot"], "u-boot")
            started = _phase(report, "u-boot", started)
        expect(console, {"systemd": r"Welcome to [^\n]*!|systemd\[1\]: systemd \d+"},
               t["kernel"], "kernel")
        started = _phase(report, "kernel", started)
        got = expect(console, {"banner": r"=== Jupyter workstation setup",
                               "crashed": _wizard_failed(trial)}, t["userspace"], "userspace")
        if got.name == "crashed":
            raise SmokeFailure("userspace", _WIZARD_FAILED_MESSAGE)
        started = _phase(report, "userspace", started)
        credentials = answer_wizard(console, trial, credentials, t["wizard"])
        credentials, shown = read_result(console, trial, credentials)
        started = _phase(report, "wizard", started)
        report.passed("the setup wizard ran on the serial console and completed")
        check_no_secret_on_console(trial, credentials, "wizard")
        report.passed("no password appeared on the serial console during setup")
        try:
            pin = reach_jupyter(trial, shown, lambda: proc.poll() is None, t["jupyter"],
                                "jupyter")
            if pin is not None:
                check_https(trial, pin, report)
            started = _phase(report, "jupyter", started)
            check_jupyter(trial, credentials, report, pin)
            started = _phase(report, "cell", started)
            if credentials.token and trial.browser:
                check_browser(trial, credentials.token, report, pin)
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
    second_boot(trial, credentials, shown, report)
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
        got = expect(console, {"done": r"Setup is complete\.",
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
        got = expect(console, prompts, left, "wizard")
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
        send(console, answer + "\r", "wizard")
    return creds


# What the wizard's result shows after "Setup is complete.", and what the smoke calls it when
# it does not come: the generated token, and with TLS the certificate's fingerprint and URLs.
RESULT = {"token": (r"Token: (\S+)\s", "token"),
          "fingerprint": (pinning.SHOWN_FINGERPRINT,
                          "'Certificate SHA-256 fingerprint:' line (the image says "
                          "JUPYTER_TLS=yes)"),
          "urls": (pinning.SHOWN_URLS, "URLs")}


def read_result(console: SerialConsole, trial: Trial, creds: Credentials,
                timeout: float = 120) -> tuple[Credentials, pinning.Shown | None]:
    """The wizard's result, in whatever order the card prints it: the token it generated
    (when the smoke answered the wizard), and with TLS the certificate's fingerprint and the
    card's .local name."""
    wanted = [name for name, needed in (("token", trial.credentials is None),
                                        ("fingerprint", trial.tls), ("urls", trial.tls))
              if needed]
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while len(found) < len(wanted):
        missing = [name for name in wanted if name not in found]
        try:
            got = console.expect({name: RESULT[name][0] for name in missing},
                                 max(1.0, deadline - time.monotonic()), "wizard")
        except ConsoleTimeout:
            raise SmokeFailure("wizard", f"the wizard's result shows no {RESULT[missing[0]][1]} "
                                         f"in {timeout:.0f} s") from None
        except ConsoleError as exc:
            raise SmokeFailure("wizard", str(exc).split(": ", 1)[-1]) from None
        found[got.name] = got.groups[0]
    if "token" in found:
        creds = replace(creds, token=found["token"])
    if not trial.tls:
        return creds, None
    try:
        return creds, pinning.shown(found["fingerprint"], found["urls"])
    except pinning.PinError as exc:
        raise SmokeFailure("wizard", str(exc)) from None


def reach_jupyter(trial: Trial, shown: pinning.Shown | None, alive: Callable[[], bool],
                  timeout: float, phase: str) -> pinning.Pin | None:
    """Jupyter answering on the forwarded port; with TLS first its certificate, pinned when
    it is exactly the one the console showed: the pin every later check trusts alone."""
    started = time.monotonic()
    pin = None
    try:
        if shown is not None:
            served = pinning.wait_for_certificate("127.0.0.1", trial.host_port, timeout,
                                                  shown.hostname, alive)
            pin = pinning.pin(served, shown.fingerprint, shown.hostname)
        jupyter.wait_until_up(trial.base, max(60.0, timeout - (time.monotonic() - started)),
                              alive=alive, pin=pin)
    except (pinning.PinError, jupyter.JupyterError, OSError) as exc:
        raise SmokeFailure(phase, str(exc)) from None
    return pin


def check_https(trial: Trial, pin: pinning.Pin, report: Report) -> None:
    report.passed(f"the server's certificate is the one whose fingerprint the card showed on "
                  f"its console (SHA-256 {pin.fingerprint}); every check of Jupyter below "
                  f"trusts only it")
    try:
        outcome = pinning.no_login_page_over_http("127.0.0.1", trial.host_port)
    except (pinning.PinError, OSError) as exc:
        raise SmokeFailure("jupyter", str(exc)) from None
    report.passed(f"plain HTTP gets no login page ({outcome})")


def check_jupyter(trial: Trial, creds: Credentials, report: Report,
                  pin: pinning.Pin | None) -> None:
    t = trial.timeouts
    try:
        jupyter.refuses_strangers(trial.base, pin)
        report.passed("Jupyter refuses requests without credentials (403)"
                      + (" over HTTPS" if pin else ""))
        if creds.token:
            jupyter.token_works(trial.base, creds.token, pin)
            report.passed("the token shown by the wizard gets in")
        else:
            report.notes.append("token check skipped: the preseed fixes no token (a generated "
                                "one is shown only on the console that ran setup)")
        session = jupyter.Session(trial.base, pin)
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
    # The setup drive came after the root: first boot takes it and removes it.
    if got.get("partitions_after_root"):
        raise SmokeFailure("cell", f"partitions still follow the root on the card "
                                   f"({', '.join(got['partitions_after_root'])}): the setup "
                                   f"drive was not removed")
    report.passed("no partition follows the root: the setup drive is gone")


def check_browser(trial: Trial, token: str, report: Report, pin: pinning.Pin | None) -> None:
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
            timeout=trial.timeouts["browser"], chromium=chromium, pin=pin)
    except browser_check.BrowserError as exc:
        raise SmokeFailure("browser", str(exc)) from None
    except Exception as exc:   # the DevTools protocol's own errors, a dropped websocket
        raise SmokeFailure("browser", f"{type(exc).__name__}: {exc}") from None
    _phase(report, "browser", started)
    where = f" at {seen.url.split('?')[0]}, trusting only the card's certificate" if pin else ""
    report.passed(f"JupyterLab loads in headless Chromium with the token{where} "
                  f"(“{seen.title}”; screenshot {seen.screenshot.name})")


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


def await_login(console: SerialConsole, shown: pinning.Shown | None, timeout: float) -> None:
    """The second boot's way to the login prompt: no wizard, and with TLS a login banner
    showing the fingerprint of the first boot's certificate."""
    deadline = time.monotonic() + timeout
    patterns = {"wizard": r"=== Jupyter workstation setup", "login": r"login: "}
    if shown is not None:
        patterns["fingerprint"] = pinning.SHOWN_FINGERPRINT
    got = expect(console, patterns, timeout, "second-boot")
    if got.name == "wizard":
        raise SmokeFailure("second-boot", "the setup wizard ran again on the second boot")
    if shown is None:
        return
    if got.name == "login":
        raise SmokeFailure("second-boot", "the login banner on the second boot shows no "
                                          "'Certificate SHA-256 fingerprint:' line before "
                                          "'login:' (/etc/issue.d)")
    if got.groups[0] != shown.fingerprint:
        raise SmokeFailure("second-boot", f"the login banner on the second boot shows "
                                          f"{got.groups[0]}, but the first boot's certificate "
                                          f"is {shown.fingerprint}")
    expect(console, {"login": r"login: "}, max(1.0, deadline - time.monotonic()),
           "second-boot")


def second_boot(trial: Trial, creds: Credentials, shown: pinning.Shown | None,
                report: Report) -> None:
    t = trial.timeouts["second-boot"]
    started = time.monotonic()
    with booted(trial, "boot2") as (console, proc):
        await_login(console, shown, t)
        report.passed("the second boot goes to the login prompt; the wizard does not run again")
        pin = reach_jupyter(trial, shown, lambda: proc.poll() is None,
                            max(60, t - (time.monotonic() - started)), "second-boot")
        if pin is not None:
            report.passed(f"the second boot serves the same certificate (SHA-256 "
                          f"{pin.fingerprint}), and its login banner shows that fingerprint")
        try:
            jupyter.refuses_strangers(trial.base, pin)
            if creds.token:
                jupyter.token_works(trial.base, creds.token, pin)
            session = jupyter.Session(trial.base, pin)
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
