"""What an answer may be, and the preseed file that gives answers: the checks of each value,
the login and Jupyter password hashes, the Answers record and the `key = value` format of
/boot/jupyter-firstboot.conf.

The host imports this module alone (builder/preseed.py, flash-image) to check a preseed file
as the card will: it must not import the console, wizard or session code.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import ipaddress
import re
import struct
import subprocess
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from builder.firstboot.card import Settings, SetupError

# Preseed keys. Secrets are never echoed back, and the file is removed once applied.
SECRET_KEYS = ("login_password", "login_password_hash", "jupyter_password",
               "jupyter_password_hash", "jupyter_token", "wifi_key")
KEYS = (*SECRET_KEYS, "hostname", "timezone", "locale", "ssh_key", "ssh_key_url", "wifi_ssid",
        "wifi_country", "address", "gateway", "dns")
REPEATABLE = ("ssh_key", "ssh_key_url")
# Keys that replace each other when one preseed's lines go over another's: a login password
# replaces a login hash, a new Wi-Fi network its old key. SSH keys add up.
KEY_GROUPS = ({"login_password", "login_password_hash"},
              {"jupyter_password", "jupyter_password_hash"},
              {"wifi_ssid", "wifi_key"},
              {"address", "gateway", "dns"})


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


def check_key_url(value: str) -> str:
    """Where the login's SSH keys are published (https://github.com/NAME.keys), fetched when
    the answers are applied: Armbian Imager's PRESET_USER_KEY is such a URL."""
    url = value.strip()
    if not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", url):
        raise ValueError("is not an http(s) URL (e.g. https://github.com/NAME.keys)")
    return url


def check_ssid(value: str) -> str:
    if not 1 <= len(value.encode()) <= 32:
        raise ValueError("must be 1-32 bytes")
    return value


def check_locale(value: str, root: Path) -> str:
    """A locale the image can generate: in glibc's list of supported ones where the list is
    (Debian's locales package; a host checking a preseed may lack it), else of the usual form."""
    name = value.strip()
    if not re.fullmatch(r"[a-z]{2,3}_[A-Z]{2}(\.[A-Za-z0-9-]+)?(@[a-z]+)?|C\.UTF-8", name):
        raise ValueError("is not a locale name (e.g. en_US.UTF-8, de_DE.UTF-8)")
    supported = root / "usr/share/i18n/SUPPORTED"
    if supported.is_file():
        names = {line.split()[0] for line in supported.read_text(errors="replace").splitlines()
                 if line.strip() and not line.startswith("#")}
        if name not in names and name != "C.UTF-8":
            near = sorted(n for n in names if n.split(".")[0] == name.split(".")[0])
            hint = f" (this one has: {', '.join(near[:4])})" if near else ""
            raise ValueError(f"is not a locale this image can make{hint}")
    return name


def check_country(value: str) -> str:
    code = value.strip().upper()
    if not re.fullmatch(r"[A-Z]{2}", code):
        raise ValueError("is not a two-letter country code (e.g. DE, US, GB)")
    return code


def check_address(value: str) -> str:
    """An IPv4 address with its prefix length (192.168.1.50/24), or with a dotted mask
    (192.168.1.50/255.255.255.0, as Armbian's presets give it): the address, not the network."""
    try:
        interface = ipaddress.IPv4Interface(value.strip())
    except ValueError:
        raise ValueError("is not an IPv4 address with its prefix (e.g. 192.168.1.50/24)") \
            from None
    if "/" not in value or interface.network.prefixlen in (0, 32) or \
            interface.ip in (interface.network.network_address,
                             interface.network.broadcast_address):
        raise ValueError("is not a host's address with its network's prefix (e.g. "
                         "192.168.1.50/24)")
    return interface.with_prefixlen


def check_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError("is not an IP address (e.g. 192.168.1.1)") from None


def check_dns(value: str) -> list[str]:
    """Name servers separated by spaces or commas (Armbian Imager writes "8.8.8.8, 1.1.1.1")."""
    servers = [s for s in re.split(r"[\s,;]+", value.strip()) if s]
    if not servers:
        raise ValueError("names no server (e.g. 1.1.1.1 9.9.9.9)")
    return [check_ip(server) for server in servers]


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
    ssh_key_urls: list[str] = field(default_factory=list)
    wifi_ssid: str | None = None
    wifi_key: str | None = None
    wifi_country: str | None = None
    locale: str | None = None
    # A static IPv4 address: on the Wi-Fi network when one is given, else on the wired ports.
    address: str | None = None
    gateway: str | None = None
    dns: list[str] = field(default_factory=list)
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


# What str.splitlines breaks lines at besides \n and \r, which cannot be inside a value here.
_BREAKS = re.compile("[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


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
        if _BREAKS.search(value):
            # The setup drive's reader takes a lone CR (old Mac editors) as a line end, so it
            # splits lines as str.splitlines does: a value with any of those breaks would be
            # read there as two lines.
            problems.append(f"{where}: holds a line break or page break inside the value "
                            f"(e.g. U+2028, form feed): remove it")
            continue
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
    if ("gateway" in seen or "dns" in seen) and "address" not in seen:
        problems.append("gateway or dns is given without address (the static address they "
                        "go with)")
    if answers.address and answers.gateway and \
            ipaddress.ip_address(answers.gateway) not in \
            ipaddress.IPv4Interface(answers.address).network:
        problems.append(f"gateway {answers.gateway} is not in the network of address "
                        f"{answers.address}")
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
    elif key == "ssh_key_url":
        answers.ssh_key_urls.append(check_key_url(value))
    elif key == "wifi_ssid":
        answers.wifi_ssid = check_ssid(value)
    elif key == "wifi_key":
        answers.wifi_key = check_wifi_key(value)
    elif key == "wifi_country":
        answers.wifi_country = check_country(value)
    elif key == "locale":
        answers.locale = check_locale(value, root)
    elif key == "address":
        answers.address = check_address(value)
    elif key == "gateway":
        answers.gateway = check_ip(value)
    elif key == "dns":
        answers.dns = check_dns(value)


def replaced_by(keys: set[str] | frozenset[str]) -> frozenset[str]:
    """The keys whose lines a preseed giving `keys` replaces in another."""
    return frozenset(k for key in keys if key not in REPEATABLE
                     for k in next((g for g in KEY_GROUPS if key in g), {key}))


def preseed_keys(text: str) -> set[str]:
    return {line.partition("=")[0].strip().lower() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#") and "=" in line}


def merge_preseed(old: str, new: str) -> str:
    """`old` with `new`'s lines after it, each of `new`'s keys replacing `old`'s lines of
    that key (and of its group); comments stay."""
    replaced = replaced_by(preseed_keys(new))
    kept = [raw for raw in old.splitlines()
            if raw.strip().startswith("#") or
            raw.strip().partition("=")[0].strip().lower() not in replaced]
    if kept and kept[-1].strip():
        kept.append("")
    return "\n".join(kept) + ("\n" if kept else "") + new.rstrip("\n") + "\n"
