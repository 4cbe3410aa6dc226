"""This card's own settings: the preseed lines assembled from --preseed, --hostname,
--ssh-key and --wifi and checked with the wizard's own rules before the card is touched
(check_preseed), then written into the card's ext4 root with debugfs, nothing mounted, merged
with the preseed the image carries (personalise_card)."""

from __future__ import annotations

import getpass
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder import __version__
from builder.errors import BuildError
from builder.ext4 import Ext4, find_root_fs, superblock
from builder.firstboot.answers import (
    check_hostname,
    check_ssh_key,
    check_ssid,
    check_wifi_key,
    parse_preseed,
)
from builder.firstboot.card import PRESEED, Settings
from builder.image import Table, read_table
from builder.preseed import load_preseed

PRESEED_PATH = "/" + PRESEED
# Keys that replace each other: a per-card login password replaces the image's hash.
KEY_GROUPS = ({"login_password", "login_password_hash"},
              {"jupyter_password", "jupyter_password_hash"},
              {"wifi_ssid", "wifi_key"})


@dataclass(frozen=True)
class Preseed:
    """The lines this card gets, and the keys whose lines in the image's preseed they replace."""

    lines: tuple[tuple[str, str], ...] = ()
    replaces: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.lines)

    def text(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M")
        return "\n".join([f"# flash-image {__version__}, {stamp}: this card's own settings",
                          *(f"{key} = {value}" for key, value in self.lines)]) + "\n"


def check_preseed(*, preseed_file: Path | None, hostname: str | None,
                  ssh_keys: Sequence[Path], wifi: str | None) -> Preseed:
    """This card's preseed lines from --preseed, --hostname, --ssh-key and --wifi, each
    checked with the wizard's own rules; the flags win over the file's lines."""
    lines: list[tuple[str, str]] = []
    given: set[str] = set()
    if preseed_file is not None:
        data, _ = load_preseed(preseed_file)
        for raw in data.decode("utf-8-sig").splitlines():
            key, sep, value = raw.strip().partition("=")
            if sep and not raw.strip().startswith("#"):
                lines.append((key.strip().lower(), value.strip()))
    flags: list[tuple[str, str]] = []
    if hostname is not None:
        flags.append(("hostname", _checked("--hostname", hostname, check_hostname)))
    for path in ssh_keys:
        flags.extend(("ssh_key", _quoted(key)) for key in _ssh_keys(path))
    if wifi is not None:
        if _LINE_BREAK.search(wifi):
            raise BuildError(f"--wifi {wifi!r}: an SSID with a line break cannot be "
                             f"written to a preseed file")
        flags.append(("wifi_ssid", _quoted(_checked("--wifi", wifi, check_ssid))))
        key = _ask_wifi_key(wifi)
        if key:
            flags.append(("wifi_key", _quoted(key)))
    for key, _ in flags:
        given |= next((g for g in KEY_GROUPS if key in g), {key})
    lines = [(k, v) for k, v in lines if k not in given or k == "ssh_key"] + flags
    replaces = frozenset(k for key, _ in lines if key != "ssh_key"
                         for k in next((g for g in KEY_GROUPS if key in g), {key}))
    preseed = Preseed(tuple(lines), replaces)
    # The very lines the card will get, read back as the wizard will read them.
    _, problems = parse_preseed(preseed.text(), Path("/"), Settings())
    if problems:
        raise BuildError(f"this card's preseed would not be accepted by the wizard: "
                         f"{problems[0]}")
    return preseed


_LINE_BREAK = re.compile(r"[\r\n]")


def _checked(flag: str, value: str, check: Callable[[str], str], *,
             secret: bool = False) -> str:
    try:
        return check(value)
    except ValueError as exc:
        shown = "" if secret else f" {value!r}"
        raise BuildError(f"{flag}{shown}: {exc}") from None


def _quoted(value: str) -> str:
    """A value as a preseed line keeps it: quoted when spaces at its ends or a # after a
    space would be lost or misread."""
    if value != value.strip() or re.search(r"\s#", value) or value[:1] in "\"'":
        return f'"{value}"'
    return value


def _ssh_keys(path: Path) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise BuildError(f"--ssh-key {path}: {exc.strerror}") from None
    if "PRIVATE KEY" in text:
        raise BuildError(f"--ssh-key {path} is a private key: give the public one "
                         f"({path}.pub), and keep this one off every card")
    keys = [_checked(f"--ssh-key {path}: a line", line.strip(), check_ssh_key)
            for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not keys:
        raise BuildError(f"--ssh-key {path}: no key in it (give a .pub file)")
    return keys


def _ask_wifi_key(ssid: str) -> str:
    """Asked on the terminal, never echoed; from stdin when that is not a terminal."""
    if sys.stdin.isatty():
        key = getpass.getpass(f"Key of Wi-Fi network {ssid!r} (Enter: an open network): ")
    else:
        key = sys.stdin.readline().rstrip("\r\n")
    if key:
        _checked(f"the key of Wi-Fi network {ssid!r}", key, check_wifi_key,
                 secret=True)
    return key


# Writing it onto the card.


def personalise_card(card: Path, preseed: Preseed) -> str:
    """Write this card's preseed into its ext4 root (where the wizard reads it at first boot),
    merged with the one the image carries; `card` opens the card (Card.handle). Returns the
    path written."""
    table = read_table(card)
    fs, path = _preseed_location(card, table)
    old = fs.read(path) or b""
    kept = []
    for raw in old.decode("utf-8-sig", errors="replace").splitlines():
        key = raw.strip().partition("=")[0].strip().lower()
        if raw.strip().startswith("#") or key not in preseed.replaces:
            kept.append(raw)
    if kept and kept[-1].strip():
        kept.append("")
    text = "\n".join(kept) + ("\n" if kept else "") + preseed.text()
    _, problems = parse_preseed(text.encode(), Path("/"), Settings())
    if problems:
        raise BuildError(f"the preseed for the card does not check out ({problems[0]}); the "
                         f"image was written and verified, but the card has no preseed")
    with tempfile.TemporaryDirectory(prefix="flash-image.") as work:
        fs.write(path, text.encode(), 0o600, Path(work))
    return path


def _preseed_location(device: Path, table: Table) -> tuple[Ext4, str]:
    """The root filesystem's /boot/jupyter-firstboot.conf, or the file at the top of /boot's
    own partition when the image has one (an ext4 one: debugfs writes nothing else)."""
    root = find_root_fs(device, table)
    fstab = (root.read("/etc/fstab") or b"").decode(errors="replace")
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and fields[1].rstrip("/") == "/boot":
            for part in table.partitions:
                if part == root.partition:
                    continue
                fs = Ext4(device, part)
                if _matches(fs, fields[0]):
                    return fs, "/" + PRESEED_PATH.rsplit("/", 1)[1]
            raise BuildError(f"the image mounts /boot from {fields[0]}, which is not an ext4 "
                             f"partition on {device}: write jupyter-firstboot.conf onto it by "
                             f"hand (see README)")
    return root, PRESEED_PATH


def _matches(fs: Ext4, spec: str) -> bool:
    """Whether fstab's UUID=... or LABEL=... names this filesystem."""
    info = superblock(fs.spec)
    kind, _, value = spec.partition("=")
    return (kind == "UUID" and info.get("Filesystem UUID") == value) or \
        (kind == "LABEL" and info.get("Filesystem volume name") == value)
