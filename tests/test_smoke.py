"""try-image --smoke's side of the serial console, with the guest played on a pseudo-terminal:
logging in, reading the guest's own view after a failure, a wizard that crashed, the shutdown's
last words and its limit; with HTTPS, the fingerprint and the card's name read from the
wizard's result, the second boot's login banner, and the jupyter phase's pin against a real
Jupyter serving HTTPS. The whole scenario on real images is in test_appliance.py; a smoke
that fails at its phase's limit is in test_tryimage.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO

from builder import guest_shell, pinning, qemu, smoke, smoke_report
from builder.serial_console import SerialConsole

pytestmark = pytest.mark.slow


class PlayedConsole:
    """A serial console whose guest is played by a thread on the other end of a pty (raw, as
    a UART is): `guest(line)` writes with os.write(line.fd, ...) and reads typed lines with
    line.read_line()."""

    def __init__(self, guest: Callable[[PlayedConsole], None]) -> None:
        import io
        import threading
        import tty

        self.master, self.fd = os.openpty()
        tty.setraw(self.fd)
        self.player = threading.Thread(target=guest, args=(self,), daemon=True)
        self.console = SerialConsole(self.master, io.BytesIO())

    def read_line(self) -> bytes:
        data = b""
        while not data.endswith(b"\r"):
            data += os.read(self.fd, 1)
        return data[:-1]

    def __enter__(self) -> SerialConsole:
        self.player.start()
        return self.console

    def __exit__(self, *exc: object) -> None:
        self.console.close()
        self.player.join(timeout=5)
        os.close(self.master)
        os.close(self.fd)


def test_console_login_waits_for_the_shell_before_typing(tmp_path: Path) -> None:
    """A getty on a pty, played by a thread: login flushes what was typed ahead, as seen on
    QEMU's Orange Pi PC, and the shell reads only after its prompt. try-image must wait for the
    prompt (or type the command again), not lose the command."""
    import termios


    lines: list[bytes] = []

    def getty(line: PlayedConsole) -> None:
        os.write(line.fd, b"\r\nsmoke-pc login: ")
        lines.append(line.read_line())
        os.write(line.fd, b"Password: ")
        lines.append(line.read_line())
        time.sleep(0.5)                       # PAM, motd: whatever came meanwhile is gone
        termios.tcflush(line.fd, termios.TCIFLUSH)
        os.write(line.fd, b"Linux smoke-pc\r\n\x1b[?2004hjupyter@smoke-pc:~$ ")
        command = line.read_line()
        lines.append(command)
        if command == b"echo TRY-IMAGE-SHELL-$((6*7))":
            os.write(line.fd, b"\r\nTRY-IMAGE-SHELL-42\r\njupyter@smoke-pc:~$ ")

    with PlayedConsole(getty) as console:
        creds = guest_shell.Credentials("jupyter", "login-pw-123", "jupyter-pw-123", None)
        guest_shell.log_in_on_console(console, creds, 30)
    assert lines == [b"jupyter", b"login-pw-123", b"echo TRY-IMAGE-SHELL-$((6*7))"]


@pytest.mark.parametrize("answer, problem", [
    (b"  systemd-binfmt.service loaded failed failed Set Up Additional Binary Formats\r\n"
     b"HOSTKEYS-42\r\n", None),
    (b"jupyter.service loaded failed failed JupyterLab server\r\n"
     b"regenerate-ssh-host-keys.service loaded failed failed Generate this card's SSH host "
     b"keys\r\nHOSTKEYS-43\r\n",
     "failed after setup: jupyter.service, regenerate-ssh-host-keys.service"),
    (b"HOSTKEYS-43\r\n", "the SSH server has no host keys"),
    (b"", None),   # no SSH server in the image: nothing to make keys for
], ids=["base-unit-failed", "ours-failed", "no-host-keys", "no-ssh"])
def test_after_setup_the_units_the_image_adds_are_checked(answer: bytes,
                                                          problem: str | None) -> None:
    """The guest's shell is played: it gets the real command line and answers as a guest
    whose units failed (or not). A unit of the base image that failed is not ours to judge."""
    typed: list[bytes] = []

    def shell(line: PlayedConsole) -> None:
        command = line.read_line()
        typed.append(command)
        os.write(line.fd, command + b"\r\nUNITS-BEGIN-21\r\n" + answer +
                 b"UNITS-END-44\r\njupyter@smoke-pc:~$ ")

    with PlayedConsole(shell) as console:
        if problem is None:
            guest_shell.check_units(console, 30)
        else:
            with pytest.raises(guest_shell.SmokeFailure, match=re.escape(problem)):
                guest_shell.check_units(console, 30)
    assert typed == [guest_shell.UNITS_COMMAND.rstrip("\r").encode()]


@pytest.mark.root
@pytest.mark.skipif(shutil.which("sudo") is None or shutil.which("ip") is None,
                    reason="needs sudo and ip (apt-get install sudo iproute2)")
@pytest.mark.parametrize("sudo_asks, password", [(False, "login-pw-123"),
                                                 (True, "login-pw-123"),
                                                 (True, "wrong-pw-456")],
                         ids=["sudo", "sudo-asks-password", "sudo-refuses"])
def test_guest_state_is_read_from_a_root_shell_on_the_console(tmp_path: Path, sudo_asks: bool,
                                                               password: str) -> None:
    """When Jupyter fails from outside, try-image logs in on the console and asks the guest.
    Here the getty is played by a thread and the shell is a real bash on the pty, running the
    real commands through the real sudo (as root, which sudo does not ask; in the other cases
    behind a sudo that first asks for the password, as the guest's does, and asks again when
    it is wrong)."""
    import io
    import termios
    import threading
    import tty


    master, slave = os.openpty()
    cooked = termios.tcgetattr(slave)
    tty.setraw(slave)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if sudo_asks:
        (bin_dir / "sudo").write_text(
            '#!/bin/bash\n[ "$1" = -p ] || exit 9\nfor try in 1 2 3; do\n'
            '  printf %s "${2//%p/jupyter}"; read -rs answer; echo\n'
            '  [ "$answer" = login-pw-123 ] && { shift 2; exec /usr/bin/sudo "$@"; }\n'
            '  echo "Sorry, try again."\ndone\nexit 1\n')
        (bin_dir / "sudo").chmod(0o755)
    typed: list[bytes] = []
    shell: list[subprocess.Popen[bytes]] = []

    def getty() -> None:
        for prompt in (b"\r\nsmoke-pc login: ", b"Password: "):
            os.write(slave, prompt)
            line = b""
            while not line.endswith(b"\r"):
                line += os.read(slave, 1)
            typed.append(line[:-1])
        termios.tcsetattr(slave, termios.TCSANOW, cooked)     # a terminal, as after login
        env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path),
               "TERM": "dumb", "PS1": "jupyter@smoke-pc:~$ "}
        shell.append(subprocess.Popen(["bash", "--norc", "--noprofile", "-i"], stdin=slave,
                                      stdout=slave, stderr=slave, env=env,
                                      start_new_session=True))

    player = threading.Thread(target=getty, daemon=True)
    player.start()
    log = io.BytesIO()
    console = SerialConsole(master, log)
    try:
        creds = guest_shell.Credentials("jupyter", password, "jupyter-pw-123", None)
        started = time.monotonic()
        state = guest_shell.collect_guest_state(console, creds, 60)
        took = time.monotonic() - started
    finally:
        console.close()
        player.join(timeout=5)
        for proc in shell:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
    assert typed == [b"jupyter", password.encode()]
    if password != "login-pw-123":
        # Said at once, not after the whole time allowed.
        assert state == "(not available: sudo refused the login password)" and took < 30
        assert b"wrong-pw-456" not in log.getvalue()
        return
    # The real `ip -brief address` ran: the loopback interface with its address, and the
    # text stops before the end marker (no marker, no prompt in it).
    assert re.search(r"^lo\s+UNKNOWN\s+127\.0\.0\.1/8", state, re.M), state
    assert "STATE-" not in state and "jupyter@smoke-pc" not in state, state
    assert "login-pw-123" not in state and b"login-pw-123" not in log.getvalue()


def test_guest_state_says_why_it_is_missing(tmp_path: Path) -> None:
    """A console where nobody logs in: one line saying so, not an exception that would hide
    the failure it was meant to explain."""
    import io
    import tty


    master, slave = os.openpty()
    tty.setraw(slave)
    os.write(slave, b"Welcome\r\n")
    console = SerialConsole(master, io.BytesIO())
    try:
        creds = guest_shell.Credentials("jupyter", "login-pw-123", "jupyter-pw-123", None)
        state = guest_shell.collect_guest_state(console, creds, 2)
    finally:
        console.close()
        os.close(master)
        os.close(slave)
    assert state.startswith("(not available: ") and "login" in state, state


def test_a_crashed_wizard_fails_the_smoke_at_once(tmp_path: Path) -> None:
    """Recorded on QEMU's Orange Pi PC: the wizard's unit on ttyS0 failed (python3 killed by
    SIGSEGV) and the getty came up instead. The smoke stops there instead of waiting out the
    phase's limit for a banner that cannot come."""
    import io
    import threading
    import tty
    from types import SimpleNamespace


    recording = (REPO / "tests/data/boot-orangepi-pc-wizard-crashed.log").read_bytes()
    master, slave = os.openpty()
    tty.setraw(slave)
    player = threading.Thread(target=os.write, args=(slave, recording), daemon=True)
    player.start()
    console = SerialConsole(master, io.BytesIO())
    trial = SimpleNamespace(machine=qemu.Machine("orangepi-pc", "qemu-system-arm", "ttyS0",
                                                 1024))
    try:
        started = time.monotonic()
        got = console.expect({"banner": r"=== Jupyter workstation setup",
                              "crashed": smoke._wizard_failed(trial)},  # type: ignore[arg-type]
                             60, "userspace")
        assert got.name == "crashed" and time.monotonic() - started < 10
    finally:
        console.close()
        player.join(timeout=5)
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("last_words, ends", [
    # A Debian base (the kernel's default log level): systemd-shutdown's own line.
    (b"[  930.99] systemd-shutdown[1]: Powering off.\r\n", True),
    # The kernel's, shown at any log level (Armbian's verbosity=1 hides the line above), on a
    # machine that can power off and on one that cannot.
    (b"[ 1018.20] reboot: Power down\r\n", True),
    (b"[ 1018.20] reboot: Power off not available: System halted instead\r\n", True),
    # systemd's last status line is not the end: the disk is unmounted after it.
    (b"[  OK  ] Reached target poweroff.target - System Power Off.\r\n", False),
], ids=["systemd-shutdown", "power-down", "halted-instead", "not-yet"])
def test_shutdown_ends_at_the_guests_last_words(last_words: bytes, ends: bool) -> None:
    """`sudo poweroff` typed on a pty played by a thread, which answers with sudo's prompt and
    then the shutdown's last lines: try-image sees the end in any of the guest's last words,
    and fails at the limit when they never come."""

    typed: list[bytes] = []

    def guest(line: PlayedConsole) -> None:
        typed.append(line.read_line())
        os.write(line.fd, b"TRY-IMAGE-SUDO-jupyter:")
        typed.append(line.read_line())
        os.write(line.fd, b"\r\n[  OK  ] Stopped jupyter.service\r\n" + last_words)

    creds = guest_shell.Credentials("jupyter", "login-pw-123", "jupyter-pw-123", None)

    class Running:          # QEMU, still running when the guest stops talking
        def poll(self) -> None:
            return None

        def wait(self, timeout: float) -> None:
            return None

    started = time.monotonic()
    with PlayedConsole(guest) as console:
        if ends:
            guest_shell.shut_down(console, Running(), creds, 20)
        else:
            with pytest.raises(guest_shell.SmokeFailure,
                               match=r"no 'halted' on the serial console in 3 s"):
                guest_shell.shut_down(console, Running(), creds, 3)
    assert typed == [b"sudo -p 'TRY-IMAGE-SUDO-%p:' poweroff", b"login-pw-123"]
    assert time.monotonic() - started < (10 if ends else 15)


def test_shutdown_limit_grows_with_a_slow_boot() -> None:
    """A guest that took long to boot takes long to stop: the shutdown's limit is 1.5 times
    its boot (U-Boot to the wizard) when that is longer than the phase's limit, unless
    --timeout set the shutdown's."""
    from types import SimpleNamespace


    def limit(phases: dict[str, float], given: frozenset[str] = frozenset()) -> float:
        trial = SimpleNamespace(timeouts={"shutdown": 600.0}, timeouts_given=given)
        report = smoke_report.Report(image="x", phases=phases)
        return smoke.shutdown_limit(trial, report)  # type: ignore[arg-type]

    assert limit({"u-boot": 17, "kernel": 40, "userspace": 106, "wizard": 60}) == 600
    assert limit({"u-boot": 20, "kernel": 120, "userspace": 660, "cell": 900}) == 1200
    assert limit({"kernel": 120, "userspace": 660}, frozenset({"shutdown"})) == 600


def test_the_smoke_knows_nothing_of_the_command() -> None:
    """Everything the smoke needs comes in its Trial: importing it loads neither try-image's
    command nor the preseed reader the command checks a request with."""
    code = "import json, sys, builder.smoke; print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                                           capture_output=True, text=True).stdout))
    assert "builder.smoke" in loaded
    assert loaded & {"builder.tryimage", "builder.preseed"} == set()


def test_a_failure_shows_the_serial_log_of_the_last_boot(tmp_path: Path) -> None:
    """The tail printed after a failure is that of the boot started last: none before the
    first boot, the second boot's once it has started."""
    assert smoke_report.last_serial_log(tmp_path) is None
    for name in ("serial-boot1.log", "serial-boot2.log"):
        (tmp_path / name).write_bytes(b"")
        assert smoke_report.last_serial_log(tmp_path) == tmp_path / name


# HTTPS (the image's JUPYTER_TLS=yes): what the card prints, read off the console it plays,
# and the pin made from it checked against a real Jupyter serving HTTPS.

FINGERPRINT = ":".join(f"{i * 7 % 256:02X}" for i in range(32))
OTHER_FINGERPRINT = ":".join(f"{i * 11 % 256:02X}" for i in range(32))
URLS = (b"Open Jupyter in a browser on the same network:\r\n"
        b"    https://10.0.2.15:8888/lab?token=tok-123\r\n"
        b"    https://smoke-pc.local:8888/lab?token=tok-123\r\n")
SHOWN_FINGERPRINT = f"Certificate SHA-256 fingerprint: {FINGERPRINT}\r\n".encode()
TOKEN = b"Token: tok-123   (or log in with the Jupyter password)\r\n"


def tls_trial(tls: bool = True, preseed: bool = False) -> smoke.Trial:
    from types import SimpleNamespace
    creds = guest_shell.Credentials("jupyter", "l", "j", None) if preseed else None
    return SimpleNamespace(tls=tls, credentials=creds, user="jupyter")  # type: ignore[return-value]


def play_result(*parts: bytes) -> Callable[[PlayedConsole], None]:
    """The wizard's result, written in pieces cut anywhere (a serial line delivers it so)."""
    def guest(line: PlayedConsole) -> None:
        text = b"\r\nSetup is complete.\r\n\r\n" + b"".join(parts) + b"Log in as jupyter.\r\n"
        for i in range(0, len(text), 23):
            os.write(line.fd, text[i:i + 23])
            time.sleep(0.01)
    return guest


@pytest.mark.parametrize("parts", [
    (URLS, b"\r\n", SHOWN_FINGERPRINT, TOKEN),
    (SHOWN_FINGERPRINT, TOKEN, URLS, b"\r\n"),
    (URLS, b"    " + SHOWN_FINGERPRINT, b"\r\n", TOKEN),
], ids=["urls-first", "fingerprint-first", "fingerprint-indented-below-urls"])
def test_the_wizards_result_gives_the_fingerprint_and_the_cards_name(
        parts: tuple[bytes, ...]) -> None:
    """Whatever the order, and wherever the serial line cut the text: the token, the
    certificate's fingerprint, and the .local name from the URLs (not the address)."""
    creds = guest_shell.Credentials("jupyter", "l", "j", None)
    with PlayedConsole(play_result(*parts)) as console:
        smoke.answer_wizard(console, tls_trial(), creds, 30)
        got, shown = smoke.read_result(console, tls_trial(), creds, 30)
    assert got.token == "tok-123"
    assert shown == pinning.Shown(FINGERPRINT, "smoke-pc.local")


@pytest.mark.parametrize("hosts, name", [(["10.0.2.15", "fd00::5", "smoke-pc.local"],
                                           "smoke-pc.local"),
                                          (["10.0.2.15"], None)], ids=["avahi", "no-avahi"])
def test_the_result_as_the_cards_own_code_writes_it(hosts: list[str], name: str | None) -> None:
    """The text builder/firstboot/result.py makes on the card, through a serial line (\\n
    becomes \\r\\n): the smoke finds what it needs in it."""
    from types import SimpleNamespace

    from builder.firstboot import network, result
    from builder.firstboot.system import Outcome

    settings = SimpleNamespace(user="jupyter", port=8888, base_url="/")
    urls = [network.jupyter_url(settings, h, True) + "?token=tok-123"  # type: ignore[arg-type]
            for h in hosts]
    text = result.result_text(SimpleNamespace(settings=settings),  # type: ignore[arg-type]
                              Outcome("tok-123", "smoke-pc", FINGERPRINT), urls, True)
    creds = guest_shell.Credentials("jupyter", "l", "j", None)
    with PlayedConsole(play_result(text.replace("\n", "\r\n").encode())) as console:
        got, shown = smoke.read_result(console, tls_trial(), creds, 30)
    assert (got.token, shown) == ("tok-123", pinning.Shown(FINGERPRINT, name))


def test_a_card_without_a_local_name_is_pinned_without_one() -> None:
    urls = b"    https://10.0.2.15:8888/lab\r\n    https://[fd00::5]:8888/lab\r\n"
    creds = guest_shell.Credentials("jupyter", "l", "j", None)
    with PlayedConsole(play_result(urls, b"\r\n", SHOWN_FINGERPRINT)) as console:
        smoke.answer_wizard(console, tls_trial(preseed=True), creds, 30)
        _, shown = smoke.read_result(console, tls_trial(preseed=True), creds, 30)
    assert shown == pinning.Shown(FINGERPRINT, None)


@pytest.mark.parametrize("parts, problem", [
    ((URLS, b"\r\n", TOKEN),
     "the wizard's result shows no 'Certificate SHA-256 fingerprint:' line (the image says "
     "JUPYTER_TLS=yes) in 3 s"),
    ((URLS.replace(b"https://10", b"http://10"), b"\r\n", SHOWN_FINGERPRINT, TOKEN),
     "the card's console shows http://10.0.2.15 where it should show https:// URLs"),
], ids=["no-fingerprint", "http-url"])
def test_a_tls_image_whose_card_shows_no_https_fails_the_wizard(parts: tuple[bytes, ...],
                                                                problem: str) -> None:
    creds = guest_shell.Credentials("jupyter", "l", "j", "tok-123")
    with PlayedConsole(play_result(*parts)) as console, \
            pytest.raises(guest_shell.SmokeFailure) as caught:
        smoke.answer_wizard(console, tls_trial(preseed=True), creds, 30)
        smoke.read_result(console, tls_trial(preseed=True), creds, 3)
    assert caught.value.phase == "wizard" and str(caught.value).startswith(problem), caught.value


def test_an_image_without_tls_reads_only_the_token() -> None:
    """JUPYTER_TLS=no, or an image from before HTTPS: http:// URLs and no fingerprint are
    what it shows, and the smoke waits for neither."""
    creds = guest_shell.Credentials("jupyter", "l", "j", None)
    plain = URLS.replace(b"https", b"http")
    started = time.monotonic()
    with PlayedConsole(play_result(plain, b"\r\n", TOKEN)) as console:
        smoke.answer_wizard(console, tls_trial(tls=False), creds, 30)
        got, shown = smoke.read_result(console, tls_trial(tls=False), creds, 30)
    assert (got.token, shown) == ("tok-123", None)
    assert time.monotonic() - started < 10


BANNER = (b"\r\nDebian GNU/Linux 13 smoke-pc ttyS0\r\n\r\n"
          b"Jupyter: https://smoke-pc.local:8888/lab\r\n")


@pytest.mark.parametrize("console_text, shown, problem", [
    (BANNER + SHOWN_FINGERPRINT + b"\r\nsmoke-pc login: ", FINGERPRINT, None),
    (BANNER + b"\r\nsmoke-pc login: ", FINGERPRINT,
     "the login banner on the second boot shows no 'Certificate SHA-256 fingerprint:' line"),
    (BANNER + SHOWN_FINGERPRINT.replace(FINGERPRINT.encode(), OTHER_FINGERPRINT.encode())
     + b"\r\nsmoke-pc login: ", FINGERPRINT,
     f"the login banner on the second boot shows {OTHER_FINGERPRINT}, but the first boot's "
     f"certificate is {FINGERPRINT}"),
    (b"\r\n=== Jupyter workstation setup ===\r\n", FINGERPRINT,
     "the setup wizard ran again on the second boot"),
    (b"\r\nsmoke-pc login: ", None, None),
], ids=["same", "none", "other", "wizard-again", "no-tls"])
def test_the_second_boots_login_banner_shows_the_same_fingerprint(
        console_text: bytes, shown: str | None, problem: str | None) -> None:
    def guest(line: PlayedConsole) -> None:
        os.write(line.fd, console_text)

    first = pinning.Shown(shown, "smoke-pc.local") if shown else None
    with PlayedConsole(guest) as console:
        if problem is None:
            smoke.await_login(console, first, 10)
        else:
            with pytest.raises(guest_shell.SmokeFailure, match=re.escape(problem)):
                smoke.await_login(console, first, 10)


def test_the_jupyter_phase_pins_the_certificate_the_console_showed(tmp_path: Path) -> None:
    """Against a real Jupyter serving HTTPS: the fingerprint the console showed pins its
    certificate, and plain HTTP gets no login page, as the report says; a console that
    showed another fingerprint fails the phase in one line naming both."""
    from types import SimpleNamespace

    from test_jupyter_client import tls_jupyter

    from builder.firstboot import tls

    with tls_jupyter(tmp_path, "server", "tok-123") as server:
        trial = SimpleNamespace(tls=True, host_port=server.port,
                                base=f"https://127.0.0.1:{server.port}")
        shown = pinning.Shown(tls.pem_fingerprint(server.certificate), "smoke-pc.local")
        report = smoke_report.Report(image="x")
        pin = smoke.reach_jupyter(trial, shown, lambda: True, 60,  # type: ignore[arg-type]
                                  "jupyter")
        assert pin is not None and pin.hostname == "smoke-pc.local"
        smoke.check_https(trial, pin, report)  # type: ignore[arg-type]
        assert report.checks[0].startswith(
            f"the server's certificate is the one whose fingerprint the card showed on its "
            f"console (SHA-256 {shown.fingerprint})")
        assert report.checks[1].startswith("plain HTTP gets no login page (")
        with pytest.raises(guest_shell.SmokeFailure) as caught:
            smoke.reach_jupyter(trial, pinning.Shown(OTHER_FINGERPRINT, "smoke-pc.local"),
                                lambda: True, 60, "second-boot")  # type: ignore[arg-type]
    assert caught.value.phase == "second-boot"
    assert str(caught.value).startswith(f"the server's certificate is {shown.fingerprint} but "
                                        f"the card's console shows {OTHER_FINGERPRINT}")
