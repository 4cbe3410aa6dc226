"""First boot on one console among several, and `jupyter-setup` later.

At boot every console's wizard shows the banner and reads the preseed; a complete preseed is
applied by whichever wizard takes the lock first. Otherwise the console where someone presses
Enter first owns the session (Coordination: a lock in /run), asks the questions and applies
the answers; the others show the result. With `firstboot.unattended: token`, when nobody has
come to a console for a while, Jupyter gets a token shown on the board's consoles. rerun and
status are `jupyter-setup` after first boot.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
import traceback
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from builder.files import try_lock, unlock
from builder.firstboot import tls
from builder.firstboot.answers import Answers, parse_preseed
from builder.firstboot.card import CREDENTIALS, PRESEED, RUN_DIR, TLS_CERT, SetupError
from builder.firstboot.console import AnswerTimeout, Console, Garbage
from builder.firstboot.network import qr_code
from builder.firstboot.result import fingerprint_lines, result_text, urls
from builder.firstboot.setup_drive import NOTE
from builder.firstboot.system import (
    System,
    apply,
    certificate,
    read_credentials,
    read_hostname,
    start_jupyter,
    step_done,
    write_atomically,
)
from builder.firstboot.wizard import TooNoisy, Wizard

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


class Coordination:
    """What the wizards on different consoles share, in /run: a lock that the console
    running setup holds, that console's name, and the result to show everywhere: in two
    forms, the one for USB gadget consoles without what only the board's own consoles may
    show (the unattended mode's token and one-time password)."""

    def __init__(self, system: System, console: str) -> None:
        self.dir = system.path(RUN_DIR)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.console = console
        self.gadget = system.settings.gadget(console)
        self._fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        self.owned = False

    def claim(self) -> bool:
        if not try_lock(self._fd):
            return False
        self.owned = True
        (self.dir / "owner").write_text(self.console)
        return True

    def release(self) -> None:
        if self.owned:
            (self.dir / "owner").unlink(missing_ok=True)
            unlock(self._fd)
            self.owned = False

    def owner(self) -> str:
        try:
            return (self.dir / "owner").read_text() or "another console"
        except OSError:
            return "another console"

    def publish(self, text: str, public: str) -> None:
        # The public form first: a console that finds "result" finds it too.
        write_atomically(self.dir / "result-public", public.encode(), 0o600)
        write_atomically(self.dir / "result", text.encode(), 0o600)

    def result(self) -> str | None:
        try:
            (self.dir / "result").stat()
            return (self.dir / ("result-public" if self.gadget else "result")).read_text()
        except OSError:
            return None


@contextlib.contextmanager
def quiet_kernel(system: System) -> Iterator[None]:
    """Kernel messages and systemd's status lines would land in the middle of a prompt:
    lower the console log level and the status output while the wizard runs."""
    if not system.live:
        yield
        return
    printk = Path("/proc/sys/kernel/printk")
    saved = system.path(RUN_DIR) / "printk"
    with contextlib.suppress(OSError):
        level = printk.read_text().split()[0]
        with contextlib.suppress(FileExistsError):
            fd = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, level.encode())
            os.close(fd)
        printk.write_text("1")
    with contextlib.suppress(OSError):
        os.kill(1, signal.SIGRTMIN + 21)     # systemd: stop showing status on the console
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            printk.write_text(saved.read_text())
        # Status lines on again, unless the kernel command line asked for a quiet boot.
        with contextlib.suppress(OSError):
            if "quiet" not in Path("/proc/cmdline").read_text().split():
                os.kill(1, signal.SIGRTMIN + 20)


def banner(system: System) -> str:
    s = system.settings
    return (f"\n=== Jupyter workstation setup ({s.board}) ===\n"
            f"This card has no passwords yet. Setup sets the login password of {s.user}, the "
            f"Jupyter password\nand token, and optionally the hostname and time zone. "
            f"Jupyter starts when it is done.\n")


def boot(system: System, console: Console) -> int:
    """The wizard on one console at first boot; returns once setup is complete (here or on
    another console). It never fails: the getty waits for it, and one that started in its
    place would fight the wizard of a restarted unit for the line."""
    # A getty hanging up the line or a cable unplugged must not end setup, and noise on a
    # floating line must not stop it (Ctrl-\) or freeze its output (Ctrl-S).
    for name in ("SIGHUP", "SIGQUIT", "SIGTSTP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    shared = Coordination(system, console.name)
    started = time.monotonic()
    with quiet_kernel(system):
        preseed, problems = _read_preseed(system)
        console.say(banner(system))
        for line in _setup_drive_note(system):
            console.say(line)
        for problem in problems:
            console.say(f"/{PRESEED}: {problem}")
        if problems:
            console.say("The preseed's other answers are kept; setup asks for the rest.")
        if preseed is not None and _complete(preseed, system) and shared.claim():
            if shared.result() is None:
                code = _finish(system, console, shared, preseed, announce=True)
                if code is not None:
                    return code
            shared.release()
        prompted = False
        while True:
            try:
                code, prompted = _wait_for_someone(system, console, shared, preseed,
                                                   started, prompted)
            except KeyboardInterrupt:
                # Ctrl-C while nothing is being asked: show the banner's prompt again.
                code, prompted = None, False
                console.discard_input()
                console.say()
            except Exception as exc:   # a bug must not leave the card with no way in
                traceback.print_exc()      # to the journal (StandardError=journal)
                shared.release()
                console.say(f"\nSetup hit an error ({exc}); starting again.")
                code, prompted = None, False
                time.sleep(2)
            if code is not None:
                return code


def _wait_for_someone(system: System, console: Console, shared: Coordination,
                      preseed: Answers | None, started: float,
                      prompted: bool) -> tuple[int | None, bool]:
    """One turn of the banner's loop: an exit code when setup is over, and whether the
    "press Enter" prompt is on the screen."""
    text = shared.result()
    if text is not None:
        console.say(text)
        return EXIT_OK, prompted
    if not prompted:
        console.say("Press Enter to begin setup on this console. ", end="")
    s = system.settings
    # Only the board's own consoles: the unattended token and one-time password are shown
    # where setup runs, and a USB gadget console is reached by whoever has a cable.
    if (s.unattended == "token" and not shared.gadget
            and time.monotonic() - started > s.unattended_after
            and _claim_unfinished(system, shared)):
        console.say("\nNobody answered: Jupyter gets a token, shown on the consoles.")
        return _unattended(system, console, shared, preseed or Answers()), False
    try:
        line = console.read_line(1.0)
    except AnswerTimeout:
        return None, True
    except Garbage:
        console.discard_input()
        return None, True
    except EOFError:
        # Nobody is on the line (or it hung up): wait, without spinning.
        time.sleep(2)
        return None, True
    if line.strip():
        console.say("Press Enter (nothing else) to begin setup. ", end="")
        return None, True
    if not _claim_unfinished(system, shared):
        if shared.result() is None:
            _watch(console, shared)
        return None, False
    return _session(system, console, shared, preseed or Answers()), False


def _claim_unfinished(system: System, shared: Coordination) -> bool:
    """Own the session, unless another console has just finished setup."""
    if not shared.claim():
        return False
    if shared.result() is not None:
        shared.release()
        return False
    return True


def _setup_drive_note(system: System) -> list[str]:
    try:
        return system.path(NOTE).read_text().splitlines()
    except OSError:
        return []


def _read_preseed(system: System) -> tuple[Answers | None, list[str]]:
    path = system.path(PRESEED)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, []
    except OSError as exc:
        return None, [f"cannot be read: {exc.strerror}"]
    return parse_preseed(data, system.root, system.settings)


def _complete(answers: Answers, system: System) -> bool:
    if system.done():       # a preseed dropped on a card that is set up: apply what it says
        return True
    return answers.has_login() and answers.has_jupyter()


def _watch(console: Console, shared: Coordination) -> None:
    """Another console runs setup: say so, then show its result, or go back to the banner
    if it gives up."""
    console.say(f"\nSetup is running on {shared.owner()}; this console shows the result "
                f"when it is done.")
    while True:
        if shared.result() is not None:
            return
        if shared.claim():
            shared.release()
            if shared.result() is None:
                console.say("Setup on the other console stopped without finishing.")
            return
        time.sleep(1)


def _session(system: System, console: Console, shared: Coordination,
             preseed: Answers) -> int | None:
    """Questions and setup on the console that owns the session. None: the session ended
    without finishing (timeout, EOF, noise, a failure); back to the banner."""
    wizard = Wizard(system, console, first_boot=not system.done())
    try:
        while True:
            try:
                answers = wizard.questions(preseed)
                break
            except KeyboardInterrupt:
                console.discard_input()
                console.say("\n^C: starting over; nothing was changed.")
    except AnswerTimeout:
        console.say(f"\nNo answer for {int(wizard.timeout)} s: setup stopped, nothing was "
                    f"changed.")
        shared.release()
        return None
    except TooNoisy:
        console.say("\nOnly noise on this line: setup stopped, nothing was changed.")
        shared.release()
        return None
    except EOFError:
        console.say("\nThe console closed: setup stopped, nothing was changed.")
        shared.release()
        time.sleep(2)
        return None
    return _finish(system, console, shared, answers, announce=False)


def _finish(system: System, console: Console, shared: Coordination, answers: Answers,
            announce: bool, temporary_login: bool = False) -> int | None:
    """Apply, start Jupyter, show the result here and to the other consoles. Ctrl-C is
    ignored from the first change to the last line shown: the token must reach the screen,
    and the lock must be released."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if announce:
            console.say(f"Applying /{PRESEED}...")
        try:
            outcome = apply(system, answers, console.say, first_boot=not system.done(),
                            temporary_login=temporary_login)
            console.say(start_jupyter(system, boot=True))
            step_done("start-jupyter")
        except SetupError as exc:
            done = system.done()
            console.say(f"\nSetup failed: {exc}\n" + (
                "Setup itself is complete; see the journal (journalctl -b)." if done else
                "Nothing is marked done: answer the questions again."))
            shared.release()
            return EXIT_OK if done else None
        if temporary_login:
            outcome.temporary_login_password = answers.login_password
        console.say("Looking for the board's network addresses...")
        found = urls(system, outcome.hostname, outcome.token, outcome.fingerprint is not None)
        shared.publish(result_text(system, outcome, found, with_token=temporary_login),
                       result_text(system, outcome, found, with_token=False))
        console.say(result_text(system, outcome, found, with_token=True,
                                qr=console.shows_utf8()))
        shared.release()
        return EXIT_OK
    finally:
        signal.signal(signal.SIGINT, previous)


def _unattended(system: System, console: Console, shared: Coordination,
                preseed: Answers) -> int | None:
    """Nobody came: a token for Jupyter and a one-time login password, shown only on the
    board's own consoles (and before their login prompts); the Jupyter password is random
    and never shown. What a partial preseed says (SSH key, Wi-Fi, hostname) is applied."""
    answers = replace(preseed, ssh_keys=list(preseed.ssh_keys), token="generate",
                      login_hash=None, login_password=secrets.token_urlsafe(9),
                      jupyter_hash=None, jupyter_password=secrets.token_urlsafe(24))
    return _finish(system, console, shared, answers, announce=False, temporary_login=True)


# jupyter-setup after first boot.


def rerun(system: System, console: Console, preseed_file: Path | None,
          rotate_token: bool) -> int:
    if preseed_file is not None:
        try:
            data = preseed_file.read_bytes()
        except OSError as exc:
            console.say(f"jupyter-setup: {preseed_file}: {exc.strerror}")
            return EXIT_FAILED
        answers, problems = parse_preseed(data, system.root, system.settings)
        if problems:
            for problem in problems:
                console.say(f"jupyter-setup: {preseed_file}: {problem}")
            console.say("jupyter-setup: nothing was changed")
            return EXIT_FAILED
        if not system.done() and not _complete(answers, system):
            console.say(f"jupyter-setup: {preseed_file}: login and Jupyter passwords are "
                        f"both needed for a first setup; nothing was changed")
            return EXIT_FAILED
    elif rotate_token:
        answers = Answers(token="generate")
    else:
        wizard = Wizard(system, console, first_boot=not system.done())
        try:
            answers = wizard.questions(Answers())
        except (AnswerTimeout, EOFError):
            console.say("\njupyter-setup: no answer; nothing was changed")
            return EXIT_FAILED
        except KeyboardInterrupt:
            console.say("\njupyter-setup: interrupted; nothing was changed")
            return EXIT_INTERRUPTED
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # Only the file it was given is "the preseed" here; /boot's stays for the next boot.
        outcome = apply(system, answers, console.say, first_boot=not system.done(),
                        remove_preseed=False)
        console.say(start_jupyter(system, boot=False))
        found = urls(system, outcome.hostname, outcome.token, outcome.fingerprint is not None)
        console.say(result_text(system, outcome, found, with_token=True,
                                qr=console.shows_utf8()))
    except SetupError as exc:
        console.say(f"jupyter-setup: {exc}")
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGINT, previous)
    return EXIT_OK


def status(system: System, console: Console) -> int:
    if not system.done():
        console.say("Setup has not run yet: it waits on the serial console (or run "
                    "`sudo jupyter-setup`).")
        return EXIT_FAILED
    token = read_credentials(system).get("token") if os.access(
        system.path(CREDENTIALS), os.R_OK) else None
    fingerprint = None
    if system.settings.tls:
        try:
            fingerprint = tls.pem_fingerprint(system.path(TLS_CERT).read_bytes())
        except (OSError, tls.CertificateError):
            console.say(f"No TLS certificate at /{TLS_CERT} yet: Jupyter makes one when it "
                        f"starts (sudo systemctl restart jupyter).")
    found = urls(system, read_hostname(system), token, system.settings.tls)
    for url in found:
        console.say(url)
    for line in fingerprint_lines(fingerprint)[-1:]:
        console.say(line)
    drawn = qr_code(found[0].split("?")[0]) if found and console.shows_utf8() else None
    if drawn:
        console.say(drawn)
    return EXIT_OK


def certificate_check(system: System, console: Console, renew: str | None) -> int:
    """The certificate made, renewed or kept (certificate()), its fingerprint printed:
    before every start of Jupyter (jupyter.service), and `jupyter-setup --new-certificate`
    (renew says why; Jupyter is restarted to serve it)."""
    try:
        uid, gid, _ = system.account(system.settings.user)
        fingerprint = certificate(system, read_hostname(system), console.say, (uid, gid),
                                  renew)
    except (SetupError, OSError, ValueError, ImportError) as exc:
        console.say(f"jupyter-setup: Jupyter's TLS certificate: {exc}")
        return EXIT_FAILED
    if fingerprint:
        console.say(f"Certificate SHA-256 fingerprint: {fingerprint}")
    if renew is not None:
        try:
            console.say(start_jupyter(system, boot=False))
        except SetupError as exc:
            console.say(f"jupyter-setup: {exc}")
            return EXIT_FAILED
    return EXIT_OK
