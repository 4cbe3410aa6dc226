"""This card's own settings: the preseed lines assembled from --preseed, --hostname,
--ssh-key and --wifi and checked with the wizard's own rules before the card is touched
(check_preseed), then written onto the card, nothing mounted (personalise_card): into
jupyter-firstboot.conf on its setup drive (mtools), after the template's comments, where a
card someone filled in on Windows has its settings too and the card takes them the same way
at first boot; on an image without a setup drive into its ext4 root with debugfs, merged with
the preseed the image carries. The user's own TLS certificate and key, if any, go into /boot
(ext4) either way."""

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
from builder.errors import BuildError, UsageError
from builder.ext4 import Ext4, find_root_fs, superblock
from builder.firstboot.answers import (
    check_hostname,
    check_ssh_key,
    check_ssid,
    check_wifi_key,
    parse_preseed,
    replaced_by,
)
from builder.firstboot.card import (
    PRESEED,
    SETUP_LABEL,
    TLS_GIVEN_CERT,
    TLS_GIVEN_KEY,
    Settings,
)
from builder.firstboot.setup_drive import SETUP_FILE, assemble, drive_settings
from builder.flash.certificate import GivenTls
from builder.image import Table, read_table
from builder.preseed import load_preseed
from builder.setup_partition import (
    find_setup_drive,
    read_setup_file,
    setup_file_text,
    write_setup_file,
)

RELEASE = "/etc/orangepi-jupyter-release"


@dataclass(frozen=True)
class Preseed:
    """The lines this card gets, and the keys whose lines in the image's preseed they replace."""

    lines: tuple[tuple[str, str], ...] = ()
    replaces: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.lines)

    def hostname(self) -> str | None:
        """The hostname these lines give the card, if they give one."""
        answers, _ = parse_preseed(self.text(), Path("/"), Settings())
        return answers.hostname

    def text(self, heading: str = "this card's own settings") -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M")
        return "\n".join([f"# flash-image {__version__}, {stamp}: {heading}",
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
            raise UsageError(f"--wifi {wifi!r}: an SSID with a line break cannot be "
                             f"written to a preseed file")
        flags.append(("wifi_ssid", _quoted(_checked("--wifi", wifi, check_ssid))))
        key = _ask_wifi_key(wifi)
        if key:
            flags.append(("wifi_key", _quoted(key)))
    for key, _ in flags:
        given |= replaced_by({key}) or {key}
    lines = [(k, v) for k, v in lines if k not in given or k == "ssh_key"] + flags
    replaces = replaced_by({key for key, _ in lines})
    preseed = Preseed(tuple(lines), replaces)
    # The very lines the card will get, read back as the wizard will read them.
    _, problems = parse_preseed(preseed.text(), Path("/"), Settings())
    if problems:
        raise UsageError(f"this card's preseed would not be accepted by the wizard: "
                         f"{problems[0]}")
    return preseed


_LINE_BREAK = re.compile(r"[\r\n]")


def _checked(flag: str, value: str, check: Callable[[str], str], *,
             secret: bool = False) -> str:
    try:
        return check(value)
    except ValueError as exc:
        shown = "" if secret else f" {value!r}"
        raise UsageError(f"{flag}{shown}: {exc}") from None


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
        raise UsageError(f"--ssh-key {path}: {exc.strerror}") from None
    if "PRIVATE KEY" in text:
        raise UsageError(f"--ssh-key {path} is a private key: give the public one "
                         f"({path}.pub), and keep this one off every card")
    keys = [_checked(f"--ssh-key {path}: a line", line.strip(), check_ssh_key)
            for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not keys:
        raise UsageError(f"--ssh-key {path}: no key in it (give a .pub file)")
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


@dataclass(frozen=True)
class Personalised:
    """What personalise_card wrote: where this card's settings are, said for a person
    ("/boot/jupyter-firstboot.conf", or the file on the setup drive), and whether that is the
    setup drive; the certificate and key (paths as the running card sees them); and the
    hostname the card will have at first boot as far as the card's files say."""

    preseed: str | None
    tls: tuple[str, str] | None
    hostname: str | None
    on_setup_drive: bool = False


# Where the settings are when they go onto the setup drive, as the log says it.
ON_SETUP_DRIVE = f"{SETUP_FILE} on the card's setup drive ({SETUP_LABEL})"
# The heading of this card's lines in the setup drive's file, under the template's comments.
DRIVE_HEADING = ("this card's own settings (change a value here, not above: a key given twice "
                 "is an error)")


def personalise_card(card: Path, preseed: Preseed, given_tls: GivenTls | None = None
                     ) -> Personalised:
    """Write this card's preseed where the card reads it at first boot, and the user's
    certificate and key into /boot; `card` opens the card (Card.handle). With a setup drive,
    the lines go into its file, alone: the card merges them over the image's preseed at first
    boot, as it merges a file someone filled in. Without one (an image built with
    image.setup_partition: false, or before the drive), into /boot/jupyter-firstboot.conf,
    merged here with the preseed the image carries."""
    table = read_table(card)
    root = find_root_fs(card, table)
    boot = _boot_location(card, table, root)
    if given_tls is not None:
        _check_serves_https(root)
    old = boot.fs.read(boot.path(PRESEED)) or b""
    text = old.decode("utf-8-sig", errors="replace")
    drive = find_setup_drive(card, root.partition.number) if preseed else None
    where = None
    with tempfile.TemporaryDirectory(prefix="flash-image.") as work:
        # Assembled here either way, before anything is written: checked as the card's wizard
        # will read it after the card's own merge, and for the hostname the card will have.
        if drive is not None:
            data = _setup_file(read_setup_file(card, drive[0]), preseed.text(DRIVE_HEADING))
            # The drive's lines as the card's first boot reads them from the very file.
            text = _assembled(text, drive_settings(SETUP_FILE, data)[0])
            write_setup_file(card, drive[0], data)
            where = ON_SETUP_DRIVE
        elif preseed:
            text = _assembled(text, preseed.text())
            boot.fs.write(boot.path(PRESEED), text.encode(), 0o600, Path(work))
            where = "/" + PRESEED
        if given_tls is not None:
            # The key last, so that no card holds a key without its certificate.
            boot.fs.write(boot.path(TLS_GIVEN_CERT), given_tls.cert_pem, 0o644, Path(work))
            boot.fs.write(boot.path(TLS_GIVEN_KEY), given_tls.key_pem, 0o600, Path(work))
    answers, _ = parse_preseed(text.encode(), Path("/"), Settings())
    hostname = answers.hostname or \
        (root.read("/etc/hostname") or b"").decode(errors="replace").strip() or None
    return Personalised(preseed=where,
                        tls=("/" + TLS_GIVEN_CERT, "/" + TLS_GIVEN_KEY) if given_tls else None,
                        hostname=hostname, on_setup_drive=drive is not None)


def _assembled(old: str, lines: str | None) -> str:
    """The preseed the card's wizard will read: the image's preseed with this card's lines
    over it, merged by the card's own rule (setup_drive.assemble, as try-image assembles
    it). Without Armbian's presets: flash-image writes none."""
    text, _ = assemble(old, None, lines)
    _, problems = parse_preseed(text.encode(), Path("/"), Settings())
    if problems:
        raise BuildError(f"the preseed for the card does not check out ({problems[0]}); the "
                         f"image was written and verified, but the card has no preseed")
    return text


def _setup_file(template: bytes | None, lines: str) -> bytes:
    """This card's lines after the template's comments in the setup drive's file, so that
    whoever opens the drive still reads what each key does; the whole file with Notepad's
    line ends, UTF-8 without a byte-order mark (try-image's, with one, differs in that only:
    tests/test_trial_settings.py)."""
    return setup_file_text(template, lines, bom=False)


def _check_serves_https(root: Ext4) -> None:
    """An image that serves plain HTTP would leave the user's key in /boot for good, and the
    user believing the card speaks HTTPS."""
    release = (root.read(RELEASE) or b"").decode(errors="replace")
    value = ""
    for line in release.splitlines():
        key, _, rest = line.partition("=")
        if key.strip() == "JUPYTER_TLS":
            value = rest.strip().strip('"')
    if value != "yes":
        said = f"JUPYTER_TLS={value}" if value else "no JUPYTER_TLS line (built before HTTPS)"
        raise BuildError(f"the image serves Jupyter over plain HTTP ({RELEASE} has {said}), "
                         f"so the card would not use --tls-cert/--tls-key: flash an image "
                         f"built with jupyter.tls: true, or leave them out")


@dataclass(frozen=True)
class _Boot:
    """The filesystem and directory the card's /boot is: the root's /boot, or the top of
    /boot's own partition."""

    fs: Ext4
    separate: bool

    def path(self, relative: str) -> str:
        """A path relative to the card's root (card.PRESEED, ...) within this filesystem."""
        return "/" + (relative.removeprefix("boot/") if self.separate else relative)


def _boot_location(device: Path, table: Table, root: Ext4) -> _Boot:
    """The root filesystem's /boot, or /boot's own partition when the image has one (an ext4
    one: debugfs writes nothing else)."""
    fstab = (root.read("/etc/fstab") or b"").decode(errors="replace")
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and fields[1].rstrip("/") == "/boot":
            for part in table.partitions:
                if part == root.partition:
                    continue
                fs = Ext4(device, part)
                if _matches(fs, fields[0]):
                    return _Boot(fs, separate=True)
            raise BuildError(f"the image mounts /boot from {fields[0]}, which is not an ext4 "
                             f"partition on {device}: write jupyter-firstboot.conf (and "
                             f"jupyter-tls.crt/.key) onto it by hand (docs/flashing.md)")
    return _Boot(root, separate=False)


def _matches(fs: Ext4, spec: str) -> bool:
    """Whether fstab's UUID=... or LABEL=... names this filesystem."""
    info = superblock(fs.spec)
    kind, _, value = spec.partition("=")
    return (kind == "UUID" and info.get("Filesystem UUID") == value) or \
        (kind == "LABEL" and info.get("Filesystem volume name") == value)
