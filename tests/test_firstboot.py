"""The first-boot wizard (builder/firstboot/) as a person meets it: the card's own zipapp on
a pseudo-terminal, against a temporary card (a root directory with its own passwd, shadow and
hostname), with the real chpasswd writing the shadow file, the real jupyter_server hashing and
checking the Jupyter password, and two wizards on two terminals sharing one card. The preseed
format's checks on their own: tests/test_firstboot_answers.py; the zipapp itself:
tests/test_firstboot_bundle.py."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from conftest import REPO
from firstboot_card import JUPYTER, LOGIN, PYTHON, UID, Card, finished

from builder.firstboot.answers import hash_login_password
from builder.firstboot.card import (
    CREDENTIALS,
    ISSUE,
    PRESEED,
    SSH_KEYS_ONLY,
    STAMP,
    Settings,
)
from builder.firstboot.console import Console
from builder.firstboot.network import addresses
from builder.firstboot.system import KILL_AFTER, STEP_NAMES, System
from builder.firstboot.wizard import NOISE_LIMIT, Wizard


def ssh_public_key() -> str:
    blob = b"".join(len(part).to_bytes(4, "big") + part
                    for part in (b"ssh-ed25519", secrets.token_bytes(32)))
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} me@laptop"


def verifies(hashed: str, password: str) -> bool:
    from jupyter_server.auth.security import passwd_check
    return bool(passwd_check(hashed, password))


def dialog(child: pexpect.spawn, *exchanges: tuple[str, str]) -> None:
    for prompt, answer in exchanges:
        child.expect_exact(prompt)
        child.sendline(answer)


PASSWORDS = (("Login password for jupyter: ", LOGIN),
             ("Login password for jupyter, again: ", LOGIN),
             ("Jupyter password: ", JUPYTER),
             ("Jupyter password, again: ", JUPYTER))
DEFAULTS = (("Hostname [orangepipcplus]: ", ""), ("Time zone [Etc/UTC]: ", ""))


def answer_everything(child: pexpect.spawn, hostname: str = "", timezone: str = "") -> None:
    child.expect("Press Enter to begin setup")
    child.sendline("")
    dialog(child, *PASSWORDS, ("Hostname [orangepipcplus]: ", hostname),
           ("Time zone [Etc/UTC]: ", timezone))


# The wizard on one console.


@pytest.mark.root
def test_first_boot_sets_everything_and_shows_where_to_go(card: Card) -> None:
    child = card.boot()
    child.expect("=== Jupyter workstation setup \\(Orange Pi PC Plus\\) ===")
    answer_everything(child, hostname="Lab-Board-7", timezone="Europe/Berlin")
    child.expect("Setup is complete")
    child.expect(r"Token: (\S+)")
    shown_token = child.match.group(1)
    output = finished(child)
    log = (card.root.parent / "ttyT0.log").read_text()
    assert LOGIN not in log and JUPYTER not in log, "passwords must not be echoed"

    credentials = card.credentials()
    assert verifies(credentials["hashed_password"], JUPYTER)
    assert credentials["hashed_password"].startswith("argon2:$argon2id$")
    assert not verifies(credentials["hashed_password"], LOGIN)
    assert credentials["token"] == shown_token and re.fullmatch(r"[\w-]{40,}", shown_token)
    assert set(credentials) == {"hashed_password", "token"}
    info = (card.root / CREDENTIALS).stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and (info.st_uid, info.st_gid) == (UID, UID)
    assert card.login_accepts(LOGIN) and not card.login_accepts(JUPYTER)
    assert "the Jupyter password is the login password" not in output
    assert card.shadow("jupyter").startswith("$y$")
    assert card.shadow("root") == "!*", "root is locked, Armbian's 1234 gone"
    assert (card.root / "etc/hostname").read_text() == "lab-board-7\n"
    hosts = (card.root / "etc/hosts").read_text()
    assert "127.0.1.1\tlab-board-7" in hosts and "orangepipcplus" not in hosts
    assert os.readlink(card.root / "etc/localtime") == "/usr/share/zoneinfo/Europe/Berlin"
    assert (card.root / "etc/timezone").read_text() == "Europe/Berlin\n"
    assert (card.root / STAMP).exists()
    assert not list((card.root / "var/lib/jupyter").glob(".*tmp")), "no temporary files left"
    if addresses():
        assert f":8888/lab?token={shown_token}" in log
    else:
        assert "No network address yet" in log
    assert "sudo jupyter-setup" in output
    # Typed after the hidden password questions: echo came back on.
    assert "Lab-Board-7" in log


@pytest.mark.root
def test_one_password_for_both_is_allowed_but_said(card: Card) -> None:
    child = card.boot()
    child.expect("Press Enter to begin setup")
    child.sendline("")
    dialog(child, *PASSWORDS[:2], ("Jupyter password: ", LOGIN),
           ("Jupyter password, again: ", LOGIN))
    child.expect_exact("note: the Jupyter password is the login password: whoever learns one "
                       "has both (sudo included)")
    dialog(child, *DEFAULTS)
    finished(child)
    assert verifies(card.credentials()["hashed_password"], LOGIN)


@pytest.mark.root
def test_bad_passwords_are_asked_again(card: Card) -> None:
    child = card.begin()
    child.sendline("")
    child.expect("the password is empty; try again")
    child.expect_exact("Login password for jupyter: ")
    child.sendline("short")
    child.expect("the password is shorter than 8 characters; try again")
    child.expect_exact("Login password for jupyter: ")
    child.sendline(LOGIN)
    child.expect_exact("again: ")
    child.sendline(LOGIN + "x")
    child.expect("the two passwords differ; try again")
    child.expect_exact("Login password for jupyter: ")
    child.sendline(LOGIN)
    child.expect_exact("again: ")
    child.sendline(LOGIN)
    child.expect_exact("Jupyter password: ")
    child.sendline(JUPYTER)
    child.expect_exact("Jupyter password, again: ")
    child.sendline(JUPYTER)
    child.expect_exact("Hostname [orangepipcplus]: ")
    child.sendline("not_a_hostname!")
    child.expect("is not a host name")
    child.expect_exact("Hostname [orangepipcplus]: ")
    child.sendline("")
    child.expect_exact("Time zone [Etc/UTC]: ")
    child.sendline("Mars/Olympus_Mons")
    child.expect("is not a known time zone")
    child.expect_exact("Time zone [Etc/UTC]: ")
    child.sendline("../../../etc/passwd")
    child.expect("is not a time zone name")
    child.sendline("")
    finished(child)
    assert card.login_accepts(LOGIN)
    assert (card.root / "etc/hostname").read_text() == "orangepipcplus\n"
    assert not (card.root / "etc/localtime").exists(), "Enter kept the default"


@pytest.mark.root
def test_garbage_and_eof_set_nothing_and_the_wizard_stays(card: Card) -> None:
    child = card.boot()
    child.expect("Press Enter to begin setup")
    # What a floating UART pin or a wrong baud rate produces.
    os.write(child.child_fd, b"\xff\xfe\x80\x1b[\x7f\xc3(\n")
    os.write(child.child_fd, b"\xf0\x9f\x98\n")
    child.sendline("hello")
    child.expect("Press Enter \\(nothing else\\) to begin setup")
    child.sendline("")
    child.expect_exact("Login password for jupyter: ")
    child.sendcontrol("a")
    child.sendline("")
    child.expect("unreadable input ignored")
    child.expect_exact("Login password for jupyter: ")
    child.sendeof()
    child.expect("The console closed: setup stopped, nothing was changed")
    child.expect("Press Enter to begin setup", timeout=30)
    assert child.isalive()
    card.untouched()
    child.sendeof()
    child.sendeof()
    assert not child.expect([pexpect.TIMEOUT, pexpect.EOF], timeout=5), \
        "EOF at the banner does not end the wizard"
    child.sendline("")
    child.expect_exact("Login password for jupyter: ", timeout=30)
    child.terminate(force=True)
    card.untouched()


@pytest.mark.root
def test_ctrl_c_starts_the_questions_over(card: Card) -> None:
    child = card.begin()
    child.sendline("first-attempt")
    child.expect_exact("again: ")
    child.sendline("first-attempt")
    child.expect_exact("Jupyter password: ")
    child.sendintr()
    child.expect("\\^C: starting over; nothing was changed")
    card.untouched()
    dialog(child, *PASSWORDS, *DEFAULTS)
    finished(child)
    assert card.login_accepts(LOGIN) and not card.login_accepts("first-attempt")
    # Echo came back after the interrupted hidden read: the terminal is usable.
    assert verifies(card.credentials()["hashed_password"], JUPYTER)


@pytest.mark.root
def test_an_unanswered_question_ends_the_session(card: Card) -> None:
    card.settings(answer_timeout=2)
    child = card.begin()
    child.expect("No answer for 2 s: setup stopped, nothing was changed", timeout=20)
    child.expect("Press Enter to begin setup")
    card.untouched()
    child.terminate(force=True)


@pytest.mark.root
def test_the_first_console_to_answer_owns_setup(card: Card) -> None:
    serial, screen = card.boot("ttyS0"), card.boot("tty1")
    for child in (serial, screen):
        child.expect("Press Enter to begin setup")
    screen.sendline("")
    screen.expect_exact("Login password for jupyter: ")
    serial.sendline("")
    serial.expect("Setup is running on tty1; this console shows the result")
    screen.sendline(LOGIN)
    dialog(screen, *PASSWORDS[1:], *DEFAULTS)
    screen.expect(r"Token: (\S+)")
    token = screen.match.group(1)
    finished(screen)
    serial.expect("Setup is complete", timeout=30)
    output = finished(serial)
    assert token not in output, "the token is shown only where setup ran"
    assert "The token is shown on the console where setup ran" in output
    assert card.credentials()["token"] == token


@pytest.mark.root
def test_console_that_gives_up_frees_the_others(card: Card) -> None:
    card.settings(answer_timeout=3)
    first, second = card.boot("ttyS0"), card.boot("tty1")
    for child in (first, second):
        child.expect("Press Enter to begin setup")
    first.sendline("")
    first.expect_exact("Login password for jupyter: ")
    second.sendline("")
    second.expect("Setup is running on ttyS0")
    second.expect("Setup on the other console stopped without finishing", timeout=30)
    second.expect("Press Enter to begin setup")
    second.sendline("")
    second.expect_exact("Login password for jupyter: ")
    for child in (first, second):
        child.terminate(force=True)
    card.untouched()


# Headless: the preseed file.


@pytest.mark.root
def test_complete_preseed_applies_headless_and_is_removed(card: Card) -> None:
    key = ssh_public_key()
    (card.root / "usr/sbin").mkdir(parents=True)
    (card.root / "usr/sbin/netplan").write_text("")
    card.preseed(f"# written by flash-image\nlogin_password = '{LOGIN}'\n"
                 f"jupyter_password = '{JUPYTER}'\njupyter_token = generate\n"
                 f"hostname = field-station\ntimezone = America/New_York\nssh_key = {key}\n"
                 f"wifi_ssid = Lab WLAN\nwifi_key = correct horse battery\n")
    child = card.boot()
    child.expect("Applying /boot/jupyter-firstboot.conf")
    output = finished(child)
    assert "removed (it held secrets)" in output
    assert not (card.root / PRESEED).exists()
    assert card.login_accepts(LOGIN)
    assert verifies(card.credentials()["hashed_password"], JUPYTER)
    assert (card.root / "etc/hostname").read_text() == "field-station\n"
    authorized = card.root / "home/jupyter/.ssh/authorized_keys"
    assert authorized.read_text() == key + "\n"
    info = authorized.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == UID
    assert stat.S_IMODE(authorized.parent.stat().st_mode) == 0o700
    # With a key, passwords no longer open SSH (sshd takes the first value: 05 is early).
    assert "SSH: keys only from now on" in output
    assert (card.root / SSH_KEYS_ONLY).read_text().splitlines()[1:] == [
        "PasswordAuthentication no", "KbdInteractiveAuthentication no"]
    plan = card.root / "etc/netplan/30-jupyter-wifi.yaml"
    assert stat.S_IMODE(plan.stat().st_mode) == 0o600
    wifi = json.loads(plan.read_text())["network"]["wifis"]["wlan0"]
    assert wifi["access-points"] == {"Lab WLAN": {"password": "correct horse battery"}}
    assert (card.root / STAMP).exists()


@pytest.mark.root
def test_preseed_with_hashes_needs_no_plain_password(card: Card) -> None:
    from jupyter_server.auth import passwd
    token = secrets.token_urlsafe(24)
    card.preseed(f"login_password_hash = {hash_login_password(LOGIN)}\n"
                 f"jupyter_password_hash = {passwd(JUPYTER)}\njupyter_token = {token}\n")
    finished(card.boot())
    assert card.login_accepts(LOGIN)
    assert card.credentials()["token"] == token
    assert verifies(card.credentials()["hashed_password"], JUPYTER)


@pytest.mark.root
def test_bad_preseed_is_reported_and_the_rest_is_asked(card: Card) -> None:
    card.preseed(f"login_password = '{LOGIN}'\ncolour = blue\ntimezone = Europe/Atlantis\n"
                 "hostname = -bad-\njupyter_password_hash = argon2:nonsense\n"
                 "just some words\n")
    child = card.boot()
    child.expect("line 2: 'colour': unknown key")
    child.expect("line 3: 'timezone': 'Europe/Atlantis' is not a known time zone")
    child.expect("line 4: 'hostname': '-bad-' is not a host name")
    child.expect("line 5: 'jupyter_password_hash': is not a Jupyter password hash")
    child.expect("line 6: not 'key = value'")
    child.expect("Press Enter to begin setup")
    child.sendline("")
    # The valid login password is kept: the first question is Jupyter's.
    child.sendline(JUPYTER)
    dialog(child, *PASSWORDS[3:], *DEFAULTS)
    finished(child)
    assert card.login_accepts(LOGIN)
    assert not (card.root / PRESEED).exists()


@pytest.mark.root
@pytest.mark.parametrize("step", [s for s in STEP_NAMES if s != "start-jupyter"])
def test_power_loss_between_steps_leaves_nothing_half_set(card: Card, step: str) -> None:
    card.preseed(f"login_password = '{LOGIN}'\njupyter_password = {JUPYTER}\n"
                 f"hostname = after-{step}\nssh_key = {ssh_public_key()}\n")
    child = card.boot(env={KILL_AFTER: step})
    child.expect(pexpect.EOF, timeout=120)
    child.close()
    assert child.signalstatus == signal.SIGKILL
    done = (card.root / STAMP).exists()
    # The stamp is what jupyter.service waits for: it exists only when everything is set.
    assert done == (STEP_NAMES.index(step) >= STEP_NAMES.index("stamp"))
    if done:
        assert verifies(card.credentials()["hashed_password"], JUPYTER)
        assert card.login_accepts(LOGIN)
    # Until setup is done, the preseed (with its secrets) is kept for the next boot.
    assert (card.root / PRESEED).exists() == (step != "remove-preseed")
    # The next boot: the unit runs again (no stamp, or a preseed still there) and completes.
    if (card.root / PRESEED).exists() or not done:
        finished(card.boot())
    assert not (card.root / PRESEED).exists() and (card.root / STAMP).exists()
    assert card.login_accepts(LOGIN)
    assert verifies(card.credentials()["hashed_password"], JUPYTER)
    assert (card.root / "etc/hostname").read_text() == f"after-{step}\n"
    keys = (card.root / "home/jupyter/.ssh/authorized_keys").read_text().splitlines()
    assert len(keys) == 1, "a key applied twice is kept once"
    assert not [p for p in card.root.rglob(".*.tmp")], "no temporary file is left"


@pytest.mark.root
def test_ssh_passwords_can_be_kept_with_a_key(card: Card) -> None:
    card.settings(ssh_passwords="keep")
    card.preseed(f"login_password = '{LOGIN}'\njupyter_password = '{JUPYTER}'\n"
                 f"ssh_key = {ssh_public_key()}\n")
    output = finished(card.boot())
    assert "SSH keys for jupyter: 1 added" in output
    assert "keys only" not in output and not (card.root / SSH_KEYS_ONLY).exists()


@pytest.mark.root
def test_unattended_token_mode_shows_a_token_locally(card: Card) -> None:
    card.settings(unattended="token", unattended_after=1)
    key = ssh_public_key()
    card.preseed(f"ssh_key = {key}\nhostname = unattended\n")
    child = card.boot()
    child.expect("Nobody answered", timeout=30)
    child.expect(r"Token: (\S+)")
    token = child.match.group(1)
    child.expect(r"one-time password (\S+) \(you must change it\)")
    temporary = child.match.group(1)
    finished(child)
    assert card.credentials()["token"] == token
    assert card.login_accepts(temporary)
    lastchange = (card.root / "etc/shadow").read_text().split("jupyter:")[1].split(":")[1]
    assert lastchange == "0", "the one-time password must be changed at first login"
    # What the partial preseed said is applied; the secrets wait before the login prompts,
    # for root's eyes (agetty) only, until jupyter-setup runs again.
    assert (card.root / "home/jupyter/.ssh/authorized_keys").read_text() == key + "\n"
    assert (card.root / "etc/hostname").read_text() == "unattended\n"
    issue = card.root / ISSUE
    assert stat.S_IMODE(issue.stat().st_mode) == 0o600
    assert token in issue.read_text() and temporary in issue.read_text()
    finished(card.wizard("--rotate-token"))
    assert not issue.exists()


@pytest.mark.root
def test_a_usb_gadget_console_never_shows_the_unattended_secrets(card: Card) -> None:
    """ttyGS0 is reached by whoever plugs a USB cable into the board: its wizard (when
    firstboot.consoles gives it one) never takes the unattended mode's turn, and shows the
    result without the token and the one-time password that the board's UART shows."""
    card.settings(unattended="token", unattended_after=1,
                  consoles=[{"device": "ttyS0", "baud": 115200},
                            {"device": "ttyGS0", "baud": 115200, "gadget": True}])
    gadget = card.boot("ttyGS0")
    gadget.expect("Press Enter to begin setup")
    local = card.boot("ttyS0")
    local.expect("Nobody answered", timeout=30)
    local.expect(r"Token: (\S+)")
    token = local.match.group(1)
    local.expect(r"one-time password (\S+) \(you must change it\)")
    temporary = local.match.group(1)
    finished(local)
    shown = finished(gadget)
    assert "Setup is complete" in shown and "shown on the console where setup ran" in shown
    assert token not in shown and temporary not in shown, shown
    assert "Nobody answered" not in shown, "the gadget console's wizard never took the turn"


# jupyter-setup, later.


@pytest.mark.root
def test_rerun_rotates_the_token_and_keeps_the_passwords(card: Card) -> None:
    card.preseed(f"login_password = '{LOGIN}'\njupyter_password = {JUPYTER}\n")
    finished(card.boot())
    before, secret = card.credentials(), card.cookie_secret()
    assert len(base64.b64decode(secret)) == 32
    child = card.wizard("--rotate-token")
    child.expect_exact("signed out (new cookie secret)")
    child.expect(r"Token: (\S+)")
    token = child.match.group(1)
    finished(child)
    after = card.credentials()
    assert token == after["token"] != before["token"]
    assert after["hashed_password"] == before["hashed_password"]
    # Sessions opened with the old token end: Jupyter signs cookies with this secret.
    assert card.cookie_secret() != secret
    assert card.login_accepts(LOGIN)


@pytest.mark.root
def test_rerun_changes_only_what_is_answered(card: Card) -> None:
    card.preseed(f"login_password = '{LOGIN}'\njupyter_password = {JUPYTER}\n")
    finished(card.boot())
    before, secret = card.credentials(), card.cookie_secret()
    child = card.wizard()
    child.expect_exact("Login password for jupyter (Enter keeps the current one): ")
    child.sendline("")
    child.expect_exact("Jupyter password (Enter keeps the current one): ")
    child.sendline("a new jupyter password")
    child.expect_exact("Jupyter password, again: ")
    child.sendline("a new jupyter password")
    child.expect_exact("Hostname [orangepipcplus]: ")
    child.sendline("")
    child.expect_exact("Time zone [Etc/UTC]: ")
    child.sendline("")
    child.expect_exact("Make a new Jupyter token? (the old one stops working) [y/N]: ")
    child.sendline("")
    finished(child)
    after = card.credentials()
    assert after["token"] == before["token"]
    assert verifies(after["hashed_password"], "a new jupyter password")
    assert card.cookie_secret() != secret, "a new password signs everyone out too"
    assert card.login_accepts(LOGIN)


@pytest.mark.root
def test_rerun_interrupted_changes_nothing(card: Card) -> None:
    card.preseed(f"login_password = '{LOGIN}'\njupyter_password = {JUPYTER}\n")
    finished(card.boot())
    before = (card.root / CREDENTIALS).read_bytes(), card.shadow("jupyter")
    child = card.wizard()
    child.expect_exact("(Enter keeps the current one): ")
    child.sendline("something new")
    child.expect_exact("again: ")
    child.sendintr()
    child.expect("interrupted; nothing was changed")
    finished(child, code=130)
    assert ((card.root / CREDENTIALS).read_bytes(), card.shadow("jupyter")) == before


def test_check_option_reports_the_problems(tmp_path: Path, wizard_program: Path) -> None:
    good, bad = tmp_path / "good.conf", tmp_path / "bad.conf"
    good.write_text("hostname = lab\njupyter_token = generate\n")
    bad.write_text("hostname = la b\n")
    result = subprocess.run([sys.executable, str(wizard_program), "--check", str(good)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == f"{good}: ok\n" and result.stderr == ""
    result = subprocess.run([sys.executable, str(wizard_program), "--check", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert "line 1: 'hostname': 'la b' is not a host name" in result.stderr


# Armbian's own first login, replaced at build time (customize.d/55-replace-armbian-firstlogin).


@pytest.mark.root
@pytest.mark.slow
def test_armbian_first_login_is_replaced(debian_rootfs: Path, tmp_path: Path,
                                         wizard_program: Path) -> None:
    from conftest import (
        UNSIGNED_BASE,
        debugfs,
        leftover_resources,
        make_base_image,
        root_partition,
        run_cli,
    )
    base = make_base_image(debian_rootfs, tmp_path)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name in ("50-install-firstboot.host", "55-replace-armbian-firstlogin.chroot"):
        shutil.copy2(REPO / "customize.d" / name, scripts / name)
    result = run_cli("--board", "orangepi5", "--base", base.path, "--cache-dir",
                     tmp_path / "cache", "--output", tmp_path / "out", "--compress", "none",
                     "--set", "image.headroom=256MiB", "--set", "customize.builtin=false",
                     "--customize", scripts, *UNSIGNED_BASE, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert leftover_resources(tmp_path) == []
    for line in ("removed /root/.not_logged_in_yet",
                 "removed /etc/systemd/system/getty@.service.d/override.conf",
                 "removed /etc/systemd/system/serial-getty@.service.d/override.conf",
                 "root: locked until first boot", "sshd: PermitRootLogin no"):
        assert line in result.stderr, line
    image = next((tmp_path / "out").glob("*.img"))
    part = root_partition(image, 4 << 20)

    def read(path: str) -> str:
        return debugfs(part, f"cat {path}").stdout

    def exists(path: str) -> bool:
        return "File not found" not in debugfs(part, f"stat {path}").stderr

    assert not exists("/root/.not_logged_in_yet")
    for unit in ("getty@.service.d", "serial-getty@.service.d"):
        assert not exists(f"/etc/systemd/system/{unit}")
    root_hash = next(line for line in read("/etc/shadow").splitlines()
                     if line.startswith("root:")).split(":")[1]
    assert root_hash == "!*", "Armbian's 1234 is gone, and nothing replaces it in the image"
    sshd = read("/etc/ssh/sshd_config")
    assert "\nPermitRootLogin yes" not in sshd and "# PermitRootLogin yes" in sshd
    assert "PermitRootLogin no" in read("/etc/ssh/sshd_config.d/10-orangepi-jupyter.conf")
    installed = tmp_path / "installed.pyz"
    debugfs(part, f"dump /usr/lib/orangepi-jupyter/firstboot.pyz {installed}")
    # The same bytes as a bundle made here from the same sources: the zipapp is reproducible.
    assert installed.read_bytes() == wizard_program.read_bytes()
    assert re.search(r"Type: regular\s+Mode:\s+0755\b",
                     debugfs(part, "stat /usr/lib/orangepi-jupyter/firstboot.pyz").stdout)
    assert "/usr/lib/orangepi-jupyter/firstboot.pyz" in \
        debugfs(part, "stat /usr/local/sbin/jupyter-setup").stdout


@pytest.mark.root
@pytest.mark.parametrize("end", ["\r", "\r\n"], ids=["CR", "CRLF"])
def test_terminals_that_end_lines_with_cr(card: Card, end: str) -> None:
    """picocom and screen send CR for Enter, pyserial's miniterm CR LF: one line end each.
    The echo of Enter is a line end, not "^M", and no prompt overwrites the answer before."""
    child = card.boot()
    child.expect("Press Enter to begin setup")
    child.send(end)
    for prompt, answer in (*PASSWORDS, ("Hostname [orangepipcplus]: ", "crlf-board"),
                           ("Time zone [Etc/UTC]: ", "")):
        child.expect_exact(prompt)
        assert "^M" not in child.before
        # Answers sent the moment the prompt shows, as a program or a paste does: a hidden
        # one is never echoed (the prompt appears only once echo is off).
        assert LOGIN not in child.before and JUPYTER not in child.before
        if prompt.startswith("Time zone"):
            assert re.search(r"^crlf-board\r*\n", child.before), child.before
        child.send(answer + end)
    child.expect("hashing the Jupyter password")
    assert LOGIN not in child.before and JUPYTER not in child.before
    finished(child)
    assert card.login_accepts(LOGIN)
    assert (card.root / "etc/hostname").read_text() == "crlf-board\n"


@pytest.mark.root
def test_ctrl_c_after_the_last_answer_cannot_lose_the_token(card: Card) -> None:
    child = card.begin()
    child.sendline(LOGIN)
    dialog(child, *PASSWORDS[1:])
    child.expect_exact("Hostname [orangepipcplus]: ")
    child.sendline("")
    child.expect_exact("Time zone [Etc/UTC]: ")
    child.sendline("")
    # Setup has started changing things: from here to the token on the screen, Ctrl-C waits.
    child.expect("hashing the Jupyter password")
    child.sendintr()
    child.sendintr()
    child.expect(r"Token: (\S+)")
    token = child.match.group(1)
    finished(child)
    assert card.credentials()["token"] == token


@pytest.mark.root
def test_a_failing_step_marks_nothing_done_and_asks_again(card: Card) -> None:
    child = card.begin(jupyter_python="/bin/false")
    child.sendline(LOGIN)
    dialog(child, *PASSWORDS[1:], *DEFAULTS)
    child.expect("Setup failed: /bin/false could not hash the Jupyter password")
    child.expect("Nothing is marked done: answer the questions again")
    child.expect("Press Enter to begin setup")
    assert child.isalive(), "the wizard stays: a getty must not take the line over"
    assert not (card.root / STAMP).exists() and not (card.root / CREDENTIALS).exists()
    child.terminate(force=True)


@pytest.mark.root
def test_a_line_of_noise_ends_the_session(card: Card) -> None:
    child = card.begin()
    for _ in range(NOISE_LIMIT - 1):
        os.write(child.child_fd, b"\x8f\xfe\x13\x1c\n")
        # One at a time: what is queued behind a noisy line is thrown away with it.
        child.expect("unreadable input ignored")
    os.write(child.child_fd, b"\x8f\xfe\x13\x1c\n")
    child.expect("Only noise on this line: setup stopped, nothing was changed")
    child.expect("Press Enter to begin setup")
    assert child.isalive(), "Ctrl-\\ and Ctrl-S in the noise neither kill nor freeze it"
    card.untouched()
    child.terminate(force=True)


@pytest.mark.root
def test_a_linked_ssh_directory_is_not_followed(card: Card, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (card.root / "home/jupyter/.ssh").symlink_to(elsewhere)
    card.preseed(f"login_password = '{LOGIN}'\njupyter_password = {JUPYTER}\n"
                 f"ssh_key = {ssh_public_key()}\n")
    child = card.boot()
    child.expect("is a symbolic link: not following it")
    child.expect("Nothing is marked done")
    child.terminate(force=True)
    info = elsewhere.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o755)
    assert list(elsewhere.iterdir()) == []
    assert not (card.root / STAMP).exists()


def test_a_hidden_prompt_shows_only_once_echo_is_off(tmp_path: Path) -> None:
    """A program or a paste answers the moment the prompt shows: the terminal must already
    have echo off by then (seen in clear on QEMU's serial console when the prompt came first).
    The prompt is written on a pty; the line's echo flag is read at that very moment."""
    import termios
    master, slave = os.openpty()
    try:
        console = Console(slave, slave, "pts")
        echo_when_prompted: list[bool] = []
        write = console.say

        def say(text: str = "", end: str = "\n") -> None:
            if text.startswith("Login password"):
                echo_when_prompted.append(bool(termios.tcgetattr(slave)[3] & termios.ECHO))
            write(text, end)

        console.say = say  # type: ignore[method-assign]
        wizard = Wizard(System(tmp_path, Settings(), PYTHON), console, first_boot=True)
        os.write(master, LOGIN.encode() + b"\r")
        assert wizard.ask("Login password for jupyter", lambda v: v, hidden=True) == LOGIN
        assert echo_when_prompted == [False]
        assert termios.tcgetattr(slave)[3] & termios.ECHO, "echo is back on afterwards"
    finally:
        os.close(master)
        os.close(slave)
