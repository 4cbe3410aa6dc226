#!/usr/bin/python3
"""First boot of the appliance, on the card: the setup wizard on the serial console(s) and
the screen, the headless preseed file, and `jupyter-setup` to change things later.

This file runs inside the image with the image's own python3 (standard library only, Python
3.11+); the builder copies it to /usr/lib/orangepi-jupyter/firstboot.py and also imports it
to check a `--preseed` file before a build. Every path is taken relative to a root directory
(`--root`, "/" on the card), so tests run it against a temporary tree on a pseudo-terminal.

How first boot goes (one `jupyter-firstboot@<tty>.service` per console, ordered before that
console's getty and before jupyter.service):

  1. Each console shows a banner. A preseed file (PRESEED) is read and checked; problems are
     shown on every console. If it answers everything, whichever instance gets the lock
     first applies it and every console shows the result.
  2. Otherwise the console where someone presses Enter first owns the session (a lock in
     /run); the others say "setup is running on <tty>" and show the result when it is done.
  3. The owner asks what the preseed did not answer, then applies it all: login password,
     root, hostname, timezone, SSH key, Wi-Fi, Jupyter credentials (CREDENTIALS, 0600),
     then the stamp (STAMP) - only after everything else - then removes the preseed file and
     starts Jupyter.
  4. Nobody at any console and no preseed: Jupyter stays off and the wizard keeps waiting,
     or with `firstboot.unattended: token`, after `unattended_after` seconds a token is made
     and shown on the local consoles only.

Killed at any point, nothing is half-set: jupyter.service needs the stamp, and the stamp is
written last; the next boot runs the wizard again (the preseed is still there until the
stamp is).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import re
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import traceback
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Inside the image, relative to the root.
SETTINGS = "etc/orangepi-jupyter/firstboot.json"
PRESEED = "boot/jupyter-firstboot.conf"
STAMP = "var/lib/orangepi-jupyter/firstboot-done"
CREDENTIALS = "var/lib/jupyter/credentials.json"
RUN_DIR = "run/jupyter-firstboot"

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130

# Preseed keys. Secrets are never echoed back, and the file is removed once applied.
SECRET_KEYS = ("login_password", "login_password_hash", "jupyter_password",
               "jupyter_password_hash", "jupyter_token", "wifi_key")
KEYS = (*SECRET_KEYS, "hostname", "timezone", "ssh_key", "wifi_ssid")
REPEATABLE = ("ssh_key",)

# What the unit of a step is called in progress lines; also the names fault injection uses.
STEP_NAMES = ("login-password", "root-password", "hostname", "timezone", "ssh-key", "wifi",
              "jupyter-credentials", "stamp", "remove-preseed", "start-jupyter")
# Tests only: `ORANGEPI_JUPYTER_KILL_AFTER=<step>` makes the wizard SIGKILL itself right
# after that step, the way a power cut would stop it.
KILL_AFTER = "ORANGEPI_JUPYTER_KILL_AFTER"


class SetupError(Exception):
    """Something the person at the console (or the preseed's author) has to fix."""


class Garbage(Exception):
    """A line that no keyboard typed: bytes that are not text, or control characters (a
    floating UART receive pin, a wrong baud rate)."""


class AnswerTimeout(Exception):
    """Nobody answered in time."""


class TooNoisy(Exception):
    """Only noise came from the line, several times in a row."""


# Settings, written into the image by the builder from its configuration.


@dataclass(frozen=True)
class Settings:
    user: str = "jupyter"
    venv: str = "/opt/jupyter"
    port: int = 8888
    base_url: str = "/"
    board: str = "Orange Pi"
    consoles: tuple[dict[str, Any], ...] = ()     # the board's serial consoles: device, baud
    root_password: str = "locked"         # locked | same (as the login user's)
    min_password_length: int = 8
    answer_timeout: float = 300.0         # seconds a question waits before the session ends
    unattended: str = "wait"              # wait | token
    unattended_after: float = 900.0       # seconds with nobody at a console (token mode)

    @classmethod
    def load(cls, path: Path) -> Settings:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def baud(self, device: str) -> int | None:
        return next((int(c["baud"]) for c in self.consoles if c.get("device") == device), None)


# Checking answers: each returns the value to use, or raises ValueError with the reason.


HOSTNAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
TIMEZONE = re.compile(r"[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+){0,2}")
TOKEN = re.compile(r"[A-Za-z0-9_\-]{16,256}")
ARGON2 = re.compile(r"argon2:\$argon2(id|i|d)\$v=\d+\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]{11,}"
                    r"\$[A-Za-z0-9+/]{22,}")
SHA1 = re.compile(r"sha1:[0-9a-f]+:[0-9a-f]{40}")
CRYPT = re.compile(r"\$[a-z0-9]{1,4}\$[./A-Za-z0-9$=,]+")
SSH_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                 "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
                 "sk-ecdsa-sha2-nistp256@openssh.com")


def check_password(value: str, minimum: int) -> str:
    if not value:
        raise ValueError("is empty")
    if len(value) < minimum:
        raise ValueError(f"is shorter than {minimum} characters")
    if any(unicodedata.category(ch).startswith("C") for ch in value):
        raise ValueError("contains control characters")
    return value


def check_hostname(value: str) -> str:
    name = value.strip().lower()
    if not HOSTNAME.fullmatch(name):
        raise ValueError("is not a host name (letters, digits and '-', at most 63, not "
                         "starting or ending with '-')")
    return name


def check_timezone(value: str, root: Path) -> str:
    zone = value.strip()
    zoneinfo = root / "usr/share/zoneinfo"
    if not TIMEZONE.fullmatch(zone) or zone.split("/")[0] in ("posix", "right"):
        raise ValueError("is not a time zone name (e.g. Europe/Berlin, UTC)")
    if not zoneinfo.is_dir():
        raise ValueError("this image has no time zone data (tzdata): the time zone stays UTC")
    if not (zoneinfo / zone).is_file() or (zoneinfo / zone).read_bytes()[:4] != b"TZif":
        raise ValueError("is not a known time zone (e.g. Europe/Berlin, America/New_York, "
                         "UTC)")
    return zone


def check_token(value: str) -> str:
    token = value.strip()
    if token.lower() in ("generate", "none"):
        return token.lower()
    if not TOKEN.fullmatch(token):
        raise ValueError("must be 'generate', 'none', or 16-256 letters, digits, '-' and '_'")
    return token


def check_jupyter_hash(value: str) -> str:
    hashed = value.strip()
    if not (ARGON2.fullmatch(hashed) or SHA1.fullmatch(hashed)):
        raise ValueError("is not a Jupyter password hash (argon2:$argon2id$... as made by "
                         "jupyter_server.auth.passwd)")
    return hashed


def check_login_hash(value: str) -> str:
    hashed = value.strip()
    # libcrypt hashes a probe with the same method and salt: a whole hash gives a result of
    # its own length and prefix; a truncated one (no hash part, a short one) does not.
    probe = _crypt(b"probe", hashed.encode()).decode(errors="replace") if \
        CRYPT.fullmatch(hashed) else ""
    if not (probe and len(probe) == len(hashed) and "$" in hashed
            and probe[:hashed.rindex("$")] == hashed[:hashed.rindex("$")]
            and len(hashed) - hashed.rindex("$") > 20):
        raise ValueError("is not a whole crypt(3) hash ($y$..., $6$..., as made by "
                         "`mkpasswd -m yescrypt`)")
    return hashed


def check_ssh_key(value: str) -> str:
    parts = value.strip().split(None, 2)
    problem = ValueError("is not an SSH public key line (e.g. the contents of "
                         "~/.ssh/id_ed25519.pub)")
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise problem
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except binascii.Error:
        raise problem from None
    # The blob is a series of length-prefixed fields, the first of them the key's type: a
    # key cut short when pasted, or with the wrong type in front, does not pass.
    fields, offset = [], 0
    while offset + 4 <= len(blob):
        size = struct.unpack(">I", blob[offset:offset + 4])[0]
        fields.append(blob[offset + 4:offset + 4 + size])
        offset += 4 + size
    if offset != len(blob) or len(fields) < 2 or fields[0] != parts[0].encode():
        raise problem
    return " ".join(parts)


def check_ssid(value: str) -> str:
    if not 1 <= len(value.encode()) <= 32:
        raise ValueError("must be 1-32 bytes")
    return value


def check_wifi_key(value: str) -> str:
    if re.fullmatch(r"[0-9a-fA-F]{64}", value) or (
            8 <= len(value) <= 63 and all(" " <= ch <= "~" for ch in value)):
        return value
    raise ValueError("must be 8-63 printable ASCII characters (or 64 hex digits)")


# crypt(3) from the system's libcrypt: Python 3.13 dropped the crypt module.


def _libcrypt() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = (ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int)
    return lib


def _crypt(password: bytes, setting: bytes) -> bytes:
    lib = _libcrypt()
    if lib is None:
        raise SetupError("libcrypt is missing: cannot hash the login password")
    result: bytes | None = lib.crypt(password, setting)
    return result or b""


def hash_login_password(password: str) -> str:
    """yescrypt, Debian's default, with a salt from the kernel's random source."""
    lib = _libcrypt()
    if lib is None:
        raise SetupError("libcrypt is missing: cannot hash the login password")
    for prefix in (b"$y$", b"$6$"):
        setting = lib.crypt_gensalt(prefix, 0, None, 0)
        if setting:
            hashed = _crypt(password.encode(), setting)
            if hashed.startswith(prefix):
                return hashed.decode()
    raise SetupError("libcrypt offers neither yescrypt nor sha512crypt")


def hash_jupyter_password(password: str, python: str) -> str:
    """An argon2 hash in jupyter_server's format, made by the venv's Python; the password goes
    through a pipe, never the command line."""
    # jupyter_server.auth.passwd's own recipe (argon2id, 10 MiB, t=10, p=8, "argon2:" prefix)
    # through argon2-cffi, which jupyter_server requires: importing jupyter_server itself took
    # over two minutes on a busy emulated board. The tests check the result with
    # jupyter_server's passwd_check.
    code = ("import sys, argon2; print('argon2:' + argon2.PasswordHasher(memory_cost=10240, "
            "time_cost=10, parallelism=8).hash(sys.stdin.readline().rstrip('\\n')))")
    try:
        # -I and cwd /: run from a notebook user's directory, nothing there gets imported.
        result = subprocess.run([python, "-I", "-X", "utf8", "-c", code],
                                input=password + "\n", text=True, capture_output=True,
                                timeout=300, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"cannot run {python} to hash the Jupyter password: {exc}") from None
    if result.returncode != 0:
        raise SetupError(f"{python} could not hash the Jupyter password: "
                         f"{result.stderr.strip().splitlines()[-1:]}")
    return check_jupyter_hash(result.stdout.strip())


# The preseed file.


@dataclass
class Answers:
    """What setup will apply. None: not answered (yet)."""

    login_hash: str | None = None
    jupyter_hash: str | None = None
    token: str | None = None          # "generate", "none" or a token
    hostname: str | None = None
    timezone: str | None = None
    ssh_keys: list[str] = field(default_factory=list)
    wifi_ssid: str | None = None
    wifi_key: str | None = None
    # Plain passwords from a preseed, hashed only once the answers are applied.
    login_password: str | None = None
    jupyter_password: str | None = None

    def has_login(self) -> bool:
        return bool(self.login_hash or self.login_password)

    def has_jupyter(self) -> bool:
        return bool(self.jupyter_hash or self.jupyter_password)


def unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def parse_preseed(data: str | bytes, root: Path,
                  settings: Settings) -> tuple[Answers, list[str]]:
    """`key = value` lines; `#` starts a comment only at the beginning of a line, so a
    password may contain it. Quotes around a value keep its leading or trailing spaces, and
    are needed for a value with " #" in it (so a comment after a value is an error, not part
    of a password). Bytes are read as UTF-8 (a BOM, as Windows editors write, is allowed).
    Returns what is valid and one line per problem; a bad value is left unanswered, and a
    secret is never repeated in a problem."""
    answers, problems = Answers(), []
    seen: set[str] = set()
    if isinstance(data, str):
        data = data.encode()
    for number, raw_line in enumerate(data.split(b"\n"), 1):
        try:
            raw = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            problems.append(f"line {number}: not UTF-8 text (save the file as UTF-8)")
            continue
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip().lower()
        where = f"line {number}: {key!r}" if key else f"line {number}"
        if not sep or not key:
            problems.append(f"line {number}: not 'key = value'")
            continue
        value = value.strip()
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'"
        if not quoted and re.search(r"\s#", value):
            problems.append(f"{where}: a comment after a value is not allowed (put the comment "
                            f"on its own line, or the value in quotes if ' #' belongs to it)")
            continue
        value = unquote(value)
        if key not in KEYS:
            problems.append(f"{where}: unknown key (known: {', '.join(KEYS)})")
            continue
        if key in seen and key not in REPEATABLE:
            problems.append(f"{where}: given twice")
            continue
        seen.add(key)
        try:
            _preseed_value(answers, key, value, root, settings)
        except ValueError as exc:
            shown = "" if key in SECRET_KEYS else f" {value!r}"
            problems.append(f"{where}:{shown} {exc}")
    for plain, hashed in (("login_password", "login_password_hash"),
                          ("jupyter_password", "jupyter_password_hash")):
        if plain in seen and hashed in seen:
            problems.append(f"{plain} and {hashed} are both given: keep one")
    if "wifi_key" in seen and "wifi_ssid" not in seen:
        problems.append("wifi_key is given without wifi_ssid")
    return answers, problems


def _preseed_value(answers: Answers, key: str, value: str, root: Path,
                   settings: Settings) -> None:
    if key == "login_password":
        answers.login_password = check_password(value, settings.min_password_length)
    elif key == "login_password_hash":
        answers.login_hash = check_login_hash(value)
    elif key == "jupyter_password":
        answers.jupyter_password = check_password(value, settings.min_password_length)
    elif key == "jupyter_password_hash":
        answers.jupyter_hash = check_jupyter_hash(value)
    elif key == "jupyter_token":
        answers.token = check_token(value)
    elif key == "hostname":
        answers.hostname = check_hostname(value)
    elif key == "timezone":
        answers.timezone = check_timezone(value, root)
    elif key == "ssh_key":
        answers.ssh_keys.append(check_ssh_key(value))
    elif key == "wifi_ssid":
        answers.wifi_ssid = check_ssid(value)
    elif key == "wifi_key":
        answers.wifi_key = check_wifi_key(value)


# The system being set up: files under a root, and the live system when root is "/".


def _in_chroot() -> bool:
    """A chroot (the build, a test) shares the host's hostname and init: never touch them."""
    try:
        init, here = os.stat("/proc/1/root/."), os.stat("/")
    except OSError:
        return True
    return (init.st_dev, init.st_ino) != (here.st_dev, here.st_ino)


@dataclass
class System:
    root: Path
    settings: Settings
    jupyter_python: str
    # Live actions (hostname, systemctl, kernel log level) only on the running card, never
    # in a test's tree or in a chroot, where they would change the host.
    live: bool = False
    notes: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, root: Path, settings_path: Path | None = None,
             jupyter_python: str | None = None) -> System:
        settings = Settings.load(settings_path or root / SETTINGS)
        python = jupyter_python or str(root / settings.venv.lstrip("/") / "bin/python")
        live = root.resolve() == Path("/") and not _in_chroot()
        return cls(root, settings, python, live)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def done(self) -> bool:
        return self.path(STAMP).exists()

    def account(self, name: str) -> tuple[int, int, str]:
        for line in self.path("etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if len(fields) >= 7 and fields[0] == name:
                return int(fields[2]), int(fields[3]), fields[5]
        raise SetupError(f"there is no user {name} in this image")

    def run(self, *argv: str, stdin: str | None = None) -> None:
        try:
            result = subprocess.run(argv, input=stdin, text=True, capture_output=True,
                                    timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SetupError(f"{argv[0]}: {exc}") from None
        if result.returncode != 0:
            raise SetupError(f"{' '.join(argv[:2])} failed: {result.stderr.strip()}")

    def shadow_root(self) -> list[str]:
        """--root for the shadow tools (chpasswd, chage) when the card is not "/"."""
        root = self.root.resolve()
        return [] if root == Path("/") else ["--root", str(root)]

    def chpasswd(self, user: str, hashed: str) -> None:
        self.run("chpasswd", "--encrypted", *self.shadow_root(), stdin=f"{user}:{hashed}\n")

    def write(self, relative: str, data: str, mode: int = 0o644,
              owner: tuple[int, int] | None = None) -> None:
        write_atomically(self.path(relative), data.encode(), mode, owner)


def write_atomically(path: Path, data: bytes, mode: int,
                     owner: tuple[int, int] | None = None) -> None:
    """Write, fsync, then rename over the old file and fsync the directory: after a power
    cut the file is either the old one or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name, created exclusively: the user can write to some of these directories
    # (~/.ssh) and must not be able to plant a link or a FIFO there for us to write through.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if owner:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Applying answers.


@dataclass
class Outcome:
    token: str | None
    hostname: str
    temporary_login_password: str | None = None


def _step_done(name: str) -> None:
    if os.environ.get(KILL_AFTER) == name:
        os.kill(os.getpid(), signal.SIGKILL)


ISSUE = "etc/issue.d/jupyter-setup.issue"


def apply(system: System, answers: Answers, say: Callable[[str], None], first_boot: bool,
          remove_preseed: bool = True, temporary_login: bool = False) -> Outcome:
    """Apply everything, the stamp last. On a first boot every answer must be there; later
    (jupyter-setup, a new preseed) what is not answered stays as it is. With
    `temporary_login` the login password must be changed at the first login, and it and the
    token are shown before each console's login prompt until jupyter-setup runs again."""
    s = system.settings
    user = s.user
    uid, gid, home = system.account(user)
    if answers.login_password is not None:
        answers.login_hash = hash_login_password(answers.login_password)
    if answers.jupyter_password is not None:
        say("hashing the Jupyter password (a few seconds)...")
        answers.jupyter_hash = hash_jupyter_password(answers.jupyter_password,
                                                     system.jupyter_python)
    old = read_credentials(system)
    jupyter_hash = answers.jupyter_hash or old.get("hashed_password")
    if first_boot and not (answers.login_hash and jupyter_hash):
        raise SetupError("the login and Jupyter passwords are both needed")
    token = old.get("token") or None
    if answers.token == "none":
        token = None
    elif answers.token == "generate" or (answers.token is None and first_boot):
        token = secrets.token_urlsafe(32)
    elif answers.token:
        token = answers.token

    if answers.login_hash:
        system.chpasswd(user, answers.login_hash)
        if temporary_login:
            system.run("chage", "--lastday", "0", *system.shadow_root(), user)
        say(f"login password of {user}: set")
    _step_done("login-password")
    if answers.login_hash and s.root_password == "same":
        system.chpasswd("root", answers.login_hash)
        say("root password: the same as the login password")
    elif first_boot:
        system.chpasswd("root", "!*")
        say("root: locked (use sudo)")
    _step_done("root-password")
    hostname = read_hostname(system)
    if answers.hostname:
        hostname = set_hostname(system, answers.hostname)
        say(f"hostname: {hostname}")
    _step_done("hostname")
    if answers.timezone:
        set_timezone(system, answers.timezone)
        say(f"time zone: {answers.timezone}")
    _step_done("timezone")
    if answers.ssh_keys:
        added = add_ssh_keys(system, answers.ssh_keys, (uid, gid), home)
        say(f"SSH keys for {user}: {added} added")
    _step_done("ssh-key")
    if answers.wifi_ssid:
        say(set_wifi(system, answers.wifi_ssid, answers.wifi_key))
    _step_done("wifi")
    credentials: dict[str, str] = {"hashed_password": str(jupyter_hash)}
    if token:
        credentials["token"] = token
    system.write(CREDENTIALS, json.dumps(credentials, indent=1), 0o600, (uid, gid))
    say("Jupyter password and token: saved")
    # Made up on the card with nobody there: readable by root only (agetty shows it before
    # the login prompt on the board's own consoles), gone when jupyter-setup runs again.
    if temporary_login and answers.login_password:
        system.write(ISSUE, f"Jupyter token: {token}\nOne-time login password of {user}: "
                            f"{answers.login_password} (change it at the first login, then "
                            f"run sudo jupyter-setup)\n\n", 0o600)
    elif system.path(ISSUE).exists():
        system.path(ISSUE).unlink()
    _step_done("jupyter-credentials")
    system.write(STAMP, time.strftime("%Y-%m-%dT%H:%M:%S%z\n"), 0o644)
    _step_done("stamp")
    preseed = system.path(PRESEED)
    if remove_preseed and preseed.exists():
        preseed.unlink()
        sync_directory(preseed.parent)
        say(f"/{PRESEED}: applied and removed (it held secrets)")
    _step_done("remove-preseed")
    return Outcome(token, hostname)


def read_credentials(system: System) -> dict[str, str]:
    try:
        data = json.loads(system.path(CREDENTIALS).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_hostname(system: System) -> str:
    try:
        return system.path("etc/hostname").read_text().strip() or "localhost"
    except OSError:
        return "localhost"


def set_hostname(system: System, name: str) -> str:
    system.write("etc/hostname", name + "\n")
    hosts_path = system.path("etc/hosts")
    lines = hosts_path.read_text().splitlines() if hosts_path.exists() else \
        ["127.0.0.1\tlocalhost"]
    lines = [line for line in lines if not line.startswith("127.0.1.1")]
    lines.append(f"127.0.1.1\t{name}")
    system.write("etc/hosts", "\n".join(lines) + "\n")
    if system.live:
        system.run("hostname", name)
        # mDNS announces the new name only after a restart.
        subprocess.run(["systemctl", "try-restart", "avahi-daemon.service"],
                       capture_output=True, timeout=60, check=False)
    return name


def set_timezone(system: System, zone: str) -> None:
    system.write("etc/timezone", zone + "\n")
    link = system.path("etc/localtime")
    tmp = link.with_name(".localtime.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(f"/usr/share/zoneinfo/{zone}")
    os.replace(tmp, link)
    sync_directory(link.parent)


def add_ssh_keys(system: System, keys: Sequence[str], owner: tuple[int, int],
                 home: str) -> int:
    ssh = system.path(home.lstrip("/")) / ".ssh"
    authorized = ssh / "authorized_keys"
    # The home directory belongs to the user: a link there must not lead root's chown or
    # write elsewhere (~/.ssh -> /etc).
    for path in (ssh, authorized):
        if path.is_symlink():
            raise SetupError(f"{path} is a symbolic link: not following it (remove it, then "
                             f"run sudo jupyter-setup again)")
    ssh.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(ssh, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchown(fd, *owner)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    existing = authorized.read_text().splitlines() if authorized.exists() else []
    new = [key for key in keys if key not in existing]
    write_atomically(authorized, "".join(f"{line}\n" for line in [*existing, *new]).encode(),
                     0o600, owner)
    return len(new)


def set_wifi(system: System, ssid: str, key: str | None) -> str:
    """Whichever network manager the image has: Armbian's netplan, else NetworkManager."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", ssid)
    if system.path("usr/sbin/netplan").exists():
        network: dict[str, Any] = {"access-points": {ssid: {"password": key} if key else {}},
                                   "dhcp4": True, "dhcp6": True}
        plan = {"network": {"version": 2, "wifis": {"wlan0": network}}}
        system.write("etc/netplan/30-jupyter-wifi.yaml", json.dumps(plan, indent=2), 0o600)
        if system.live:
            subprocess.run(["netplan", "apply"], capture_output=True, timeout=120, check=False)
        return f"Wi-Fi {ssid}: configured (netplan)"
    if system.path("usr/sbin/NetworkManager").exists():
        security = (f"\n[wifi-security]\nkey-mgmt=wpa-psk\npsk={_keyfile(key)}\n" if key
                    else "")
        system.write(f"etc/NetworkManager/system-connections/{name}.nmconnection",
                     f"[connection]\nid={_keyfile(ssid)}\ntype=wifi\nautoconnect=true\n\n"
                     f"[wifi]\nmode=infrastructure\nssid={_keyfile(ssid)}\n{security}\n"
                     f"[ipv4]\nmethod=auto\n\n[ipv6]\nmethod=auto\n", 0o600)
        if system.live:
            subprocess.run(["nmcli", "connection", "reload"], capture_output=True, timeout=60,
                           check=False)
        return f"Wi-Fi {ssid}: configured (NetworkManager)"
    return f"Wi-Fi {ssid}: NOT configured: this image has neither netplan nor NetworkManager"


def _keyfile(value: str) -> str:
    """A value as NetworkManager's keyfile (GKeyFile) reads it back unchanged."""
    escaped = value.replace("\\", "\\\\")
    if escaped.startswith(" "):
        escaped = "\\s" + escaped[1:]
    return escaped


def start_jupyter(system: System, boot: bool) -> str:
    if not system.live:
        return "Jupyter: starts at the next boot (not started here: not a running card)"
    # At boot jupyter.service is ordered after this wizard: queue the start, do not wait
    # for it (that would wait for ourselves).
    argv = (["systemctl", "start", "--no-block", "jupyter.service"] if boot
            else ["systemctl", "restart", "jupyter.service"])
    system.run(*argv)
    return "Jupyter: starting (about a minute on this board)"


# Where to open Jupyter.


def addresses() -> list[str]:
    """Every non-loopback IPv4 and global/unique-local IPv6 address of the running system."""
    found: list[str] = []
    for _, name in socket.if_nameindex():
        if name == "lo":
            continue
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET,
                                                           socket.SOCK_DGRAM) as probe:
            packed = fcntl.ioctl(probe.fileno(), 0x8915,  # SIOCGIFADDR
                                 struct.pack("256s", name.encode()[:15]))
            found.append(socket.inet_ntoa(packed[20:24]))
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            hexed, _, _, scope, _, ifname = line.split()
            # Scope 0 is global (and unique-local); link-local needs a zone id browsers
            # do not accept.
            if scope == "00" and ifname != "lo":
                found.append(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(hexed)))
    return found


def wait_for_addresses(system: System, seconds: float = 30) -> list[str]:
    """At first boot the network may still be coming up (DHCP): wait a little for it."""
    deadline = time.monotonic() + (seconds if system.live else 0)
    while True:
        found = addresses()
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(1)


def urls(system: System, hostname: str, token: str | None) -> list[str]:
    s = system.settings
    query = f"?token={token}" if token else ""
    hosts = [f"[{a}]" if ":" in a else a for a in wait_for_addresses(system)]
    if system.path("usr/sbin/avahi-daemon").exists():
        hosts.append(f"{hostname}.local")
    return [f"http://{host}:{s.port}{s.base_url}lab{query}" for host in hosts]


def result_text(system: System, outcome: Outcome, found: list[str], with_token: bool) -> str:
    s = system.settings
    query = f"?token={outcome.token}" if outcome.token else ""
    shown = [url if with_token else url.removesuffix(query) for url in found]
    lines = ["", "Setup is complete.", ""]
    if shown:
        lines += ["Open Jupyter in a browser on the same network:"] + [f"    {u}" for u in shown]
    else:
        lines += ["No network address yet: connect the board to the network, then run",
                  "`jupyter-setup --status` to see where Jupyter is."]
    lines.append("")
    if outcome.token and with_token:
        lines.append(f"Token: {outcome.token}   (or log in with the Jupyter password)")
    elif outcome.token:
        lines.append("The token is shown on the console where setup ran.")
    if outcome.temporary_login_password and with_token:
        lines.append(f"Log in here as {s.user} with the one-time password "
                     f"{outcome.temporary_login_password} (you must change it), then run "
                     f"`sudo jupyter-setup` to set your own passwords.")
    else:
        lines.append(f"Log in as {s.user}. To change the passwords or make a new token later: "
                     f"sudo jupyter-setup")
    return "\n".join(lines) + "\n"


# The console.


class Console:
    """Line input with a timeout on a terminal (or a pipe), output as text."""

    def __init__(self, fd_in: int, fd_out: int, name: str) -> None:
        self.fd_in, self.fd_out, self.name = fd_in, fd_out, name
        self._buffer = b""
        self._after_cr = False        # a line ended with CR: an LF right after it is its end
        self.is_tty = os.isatty(fd_in)

    def say(self, text: str = "", end: str = "\n") -> None:
        data = (text + end).encode()
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(self.fd_out, data):]

    def drain(self, limit: float = 10) -> None:
        """Wait, a while at most, until what was written has left the line. When the wizard
        exits, systemd hangs its line up (TTYVHangup), which throws away what the UART has not
        sent yet: the result and the token, written last. (A line that never drains, flow
        control stuck, must not keep the getty away for ever.)"""
        if not os.isatty(self.fd_out):
            return

        def wait() -> None:
            with contextlib.suppress(OSError):
                termios.tcdrain(self.fd_out)

        waiting = threading.Thread(target=wait, daemon=True)
        waiting.start()
        waiting.join(limit)

    def read_line(self, timeout: float | None, hidden: bool = False, prompt: str = "") -> str:
        """One line without its end, after showing `prompt`. Raises AnswerTimeout, EOFError or
        Garbage."""
        saved = None
        if hidden and self.is_tty:
            saved = termios.tcgetattr(self.fd_in)
            quiet = termios.tcgetattr(self.fd_in)
            quiet[3] &= ~(termios.ECHO | termios.ECHONL)
            termios.tcsetattr(self.fd_in, termios.TCSANOW, quiet)
        # The prompt only once echo is off: a password sent the moment the prompt shows (a
        # paste, a program at the other end) was seen echoed in clear on a serial console.
        if prompt:
            self.say(prompt, end="")
        try:
            raw = self._read_raw(timeout)
        finally:
            if saved is not None:
                termios.tcsetattr(self.fd_in, termios.TCSANOW, saved)
                self.say()
        if saved is None and self._after_cr and self.is_tty:
            # The terminal's CR was echoed as a bare carriage return (no ECHOCTL "^M"):
            # the next line must not overwrite the answer.
            self.say()
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise Garbage from None
        if len(text) > 1024 or any(unicodedata.category(ch)[0] == "C" for ch in text):
            raise Garbage
        return text

    def _read_raw(self, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Terminals end lines with CR (picocom, screen), LF or CR LF (pyserial's
            # miniterm); the LF of a CR LF may come in a later read than its CR.
            if self._after_cr and self._buffer:
                self._buffer = self._buffer.removeprefix(b"\n")
                self._after_cr = False
            ends = [i for i in (self._buffer.find(b"\n"), self._buffer.find(b"\r")) if i >= 0]
            if ends:
                cut = min(ends)
                line, end = self._buffer[:cut], self._buffer[cut:cut + 1]
                self._buffer = self._buffer[cut + 1:]
                self._after_cr = end == b"\r"
                return line
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise AnswerTimeout
            ready, _, _ = select.select([self.fd_in], [], [], remaining)
            if not ready:
                raise AnswerTimeout
            try:
                chunk = os.read(self.fd_in, 4096)
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EBADF):   # hung up
                    raise EOFError from None
                raise
            if not chunk:
                if self._buffer:      # a last line without its end
                    line, self._buffer = self._buffer, b""
                    return line
                raise EOFError
            self._buffer += chunk

    def discard_input(self) -> None:
        self._buffer = b""
        self._after_cr = False
        if self.is_tty:
            with contextlib.suppress(termios.error):
                termios.tcflush(self.fd_in, termios.TCIFLUSH)


# The questions.


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


# First boot on one console, among several.


class Coordination:
    """What the wizards on different consoles share, in /run: a lock that the console
    running setup holds, that console's name, and the result to show everywhere."""

    def __init__(self, system: System, console: str) -> None:
        self.dir = system.path(RUN_DIR)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.console = console
        self._fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        self.owned = False

    def claim(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.owned = True
        (self.dir / "owner").write_text(self.console)
        return True

    def release(self) -> None:
        if self.owned:
            (self.dir / "owner").unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self.owned = False

    def owner(self) -> str:
        try:
            return (self.dir / "owner").read_text() or "another console"
        except OSError:
            return "another console"

    def publish(self, text: str) -> None:
        write_atomically(self.dir / "result", text.encode(), 0o600)

    def result(self) -> str | None:
        try:
            return (self.dir / "result").read_text()
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
    if (s.unattended == "token" and time.monotonic() - started > s.unattended_after
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


# Lines of noise in a row that end a session: a floating UART keeps sending them, and a
# session it started must not hold the other consoles off for ever.
NOISE_LIMIT = 5


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
            _step_done("start-jupyter")
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
        found = urls(system, outcome.hostname, outcome.token)
        shared.publish(result_text(system, outcome, found, with_token=temporary_login))
        console.say(result_text(system, outcome, found, with_token=True))
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
        found = urls(system, outcome.hostname, outcome.token)
        console.say(result_text(system, outcome, found, with_token=True))
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
    for url in urls(system, read_hostname(system), token):
        console.say(url)
    return EXIT_OK


def configure_line(fd: int, baud: int | None) -> None:
    """A serial line as a person types on it: cooked, echo, Ctrl-C, CR read as Enter."""
    if not os.isatty(fd):
        return
    attrs = termios.tcgetattr(fd)
    # CR stays CR and ends a line by itself (VEOL), so CR LF is one line end, not two.
    # No XON/XOFF: a stray Ctrl-S from a floating line would freeze our output.
    attrs[0] &= ~(termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    attrs[1] |= termios.OPOST | termios.ONLCR
    attrs[3] |= termios.ICANON | termios.ECHO | termios.ECHOE | termios.ISIG
    # Enter (CR) would echo as "^M" after every answer.
    attrs[3] &= ~termios.ECHOCTL
    attrs[6][termios.VEOL] = b"\r"
    # Only Ctrl-C signals: no quit (Ctrl-\) or suspend (Ctrl-Z) from noise.
    attrs[6][termios.VQUIT] = attrs[6][termios.VSUSP] = b"\x00"
    speed = getattr(termios, f"B{baud}", None) if baud else None
    if speed is not None:
        attrs[4] = attrs[5] = speed
    with contextlib.suppress(termios.error):
        termios.tcsetattr(fd, termios.TCSANOW, attrs)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="jupyter-setup",
        description="Set the passwords of this Jupyter workstation, make a new token, or "
                    "show where Jupyter is. Run as root (sudo).")
    p.add_argument("--preseed", metavar="FILE", type=Path,
                   help="apply a preseed file (same keys as /boot/jupyter-firstboot.conf)")
    p.add_argument("--rotate-token", action="store_true",
                   help="make a new Jupyter token; the old one stops working")
    p.add_argument("--status", action="store_true", help="show the URLs of Jupyter")
    p.add_argument("--check", metavar="FILE", type=Path,
                   help="only check a preseed file; print its problems")
    p.add_argument("--boot", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--console", metavar="TTY", help=argparse.SUPPRESS)
    p.add_argument("--baud", type=int, help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)
    p.add_argument("--settings", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--jupyter-python", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # Ctrl-C starts the questions over, so it must arrive as KeyboardInterrupt even when the
    # wizard was started by something that ignores SIGINT (a background job of a shell
    # without job control, nohup): Python then leaves it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    system = System.open(args.root, args.settings, args.jupyter_python)
    console = Console(0, 1, args.console or _tty_name())
    if args.check:
        try:
            _, problems = parse_preseed(args.check.read_bytes(), system.root, system.settings)
        except OSError as exc:
            console.say(f"jupyter-setup: {args.check}: {exc.strerror}")
            return EXIT_FAILED
        for problem in problems:
            console.say(f"{args.check}: {problem}")
        return EXIT_FAILED if problems else EXIT_OK
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


if __name__ == "__main__":
    sys.exit(main())
