"""The setup drive at first boot: the small FAT partition after the root partition
(builder/setup_partition.py made it) that someone edited on Windows, macOS or Linux. Before
anything else of first boot (jupyter-setup-drive.service, before the root filesystem grows),
the card reads its jupyter-firstboot.conf, puts what it says into /boot/jupyter-firstboot.conf
(the preseed the wizard reads and checks, so its problems show on the consoles as a preseed's
do), wipes the partition and removes it from the partition table, so that Armbian's resize or
the Debian base's grows the root partition over it.

Whatever was done to the drive, the card still sets up: a drive reformatted (not FAT any
more), emptied, or with a file in an encoding or under a name an editor chose, is read where
it can be and said where it cannot; the partition goes either way, and the wizard asks what
is missing. Steps, each safe to cut by a power loss: the preseed written atomically (read
again next time: the same), the partition taken out of the kernel's view (nothing written),
zeroed (next time: nothing to read, removed), its entry removed from the table (next time: no
drive; the resize, which runs until it has, grows the root).

Everything works on a disk and the offsets of its partitions, through sfdisk and mtools,
nothing mounted: on the card the disk is the root's block device; in the tests, an image file.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.files import sync_directory
from builder.firstboot import armbian_preset
from builder.firstboot.answers import merge_preseed, preseed_keys
from builder.firstboot.card import PRESEED, RUN_DIR, SETUP_LABEL, SETUP_NAME, SetupError
from builder.firstboot.system import System, write_atomically

SETUP_FILE = "jupyter-firstboot.conf"
# What the console banner shows about the drive, for this boot only; and that it was looked
# for, so that later boots do not look again (the root has grown over where it was).
NOTE = f"{RUN_DIR}/setup-drive"
DONE = "var/lib/orangepi-jupyter/setup-drive-done"
# No setup drive is bigger: a partition past the root that is, is someone's data.
MAX_SIZE = 64 << 20
# MBR types a FAT partition has (FAT12, FAT16 <32M, FAT16, FAT32, FAT32 LBA, FAT16 LBA) and
# Microsoft basic data on GPT, which is also what Windows gives exFAT and NTFS.
FAT_TYPES = {"1", "4", "6", "b", "c", "e", "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"}
_MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C.UTF-8"}


@dataclass(frozen=True)
class Drive:
    disk: Path          # the whole disk (or an image file)
    number: int         # its partition number
    start: int          # bytes
    size: int
    device: Path | None = None  # the partition's own node, where the kernel has one

    @property
    def image(self) -> str:
        """mtools' name for the drive's filesystem: the partition's node on the card, else
        the disk at the partition's offset. The node first, because armhf's mtools reads an
        @@offset past 2 GiB wrongly ("non DOS media"), and on a card the drive lies after
        the root, gigabytes in."""
        return str(self.device) if self.device else f"{self.disk}@@{self.start}"


def find_drive(disk: Path, root_number: int, running: bool = False) -> Drive | None:
    """The setup drive of `disk`: the partition right after the root, the last one, small,
    with a FAT (or Windows) partition type. None when there is none (never made, deleted).
    `running`: on the booted card, whose kernel read this very table, the partition's own
    node may be used (a host's view of a card just written may be stale)."""
    table = _table(disk)
    sector = int(table.get("sectorsize", 512))
    parts = sorted(({"number": int(re.sub(r".*?(\d+)$", r"\1", p["node"])),
                     "start": int(p["start"]) * sector, "size": int(p["size"]) * sector,
                     "type": str(p.get("type", "")).lower(), "name": p.get("name", "")}
                    for p in table.get("partitions", [])), key=lambda p: p["start"])
    numbers = [p["number"] for p in parts]
    if root_number not in numbers or numbers.index(root_number) != len(parts) - 2:
        return None
    last = parts[-1]
    if last["size"] > MAX_SIZE or not (last["type"] in FAT_TYPES or
                                       last["name"] == SETUP_NAME):
        return None
    return Drive(disk, last["number"], last["start"], last["size"],
                 _partition_node(disk, last["number"]) if running else None)


def _partition_node(disk: Path, number: int) -> Path | None:
    """/dev/<disk>p<number> (or however the kernel named it), when `disk` is a block device
    whose partitions the kernel knows."""
    try:
        if not stat.S_ISBLK(os.stat(disk).st_mode):
            return None
    except OSError:
        return None
    sysfs = Path("/sys/class/block") / Path(os.path.realpath(disk)).name
    for part in sysfs.glob("*/partition"):
        if part.read_text().strip() == str(number) and (Path("/dev") / part.parent.name).exists():
            return Path("/dev") / part.parent.name
    return None


def _table(disk: Path) -> dict[str, Any]:
    result = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        raise SetupError(f"cannot read the partition table of {disk}: {result.stderr.strip()}")
    table: dict[str, Any] = json.loads(result.stdout)["partitiontable"]
    return table


def _mtools(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=60,
                          env={**os.environ, **_MTOOLS_ENV})


def read_setup_files(drive: Drive) -> tuple[dict[str, bytes], str]:
    """The settings files on the drive by name, under the names editors give them:
    JUPYTER-FIRSTBOOT.CONF, jupyter-firstboot.conf.txt (Notepad's "Save as"),
    "jupyter-firstboot (1).conf" (a browser's download), never macOS's ._ files; and what to
    say when there are none."""
    probe = subprocess.run(["blkid", "--probe", "--output", "value", "--match-tag", "TYPE",
                            "--offset", str(drive.start), str(drive.disk)],
                           capture_output=True, text=True, timeout=60)
    kind = probe.stdout.strip()
    listing = _mtools("mdir", "-b", "-i", drive.image, "::/") if kind == "vfat" else None
    if listing is None or listing.returncode != 0:
        return {}, (f"the setup drive is not a FAT drive any more ({kind or 'nothing known'}"
                    f": reformatted?): its settings were not read")
    names = [line.removeprefix("::/").rstrip("/") for line in
             listing.stdout.decode(errors="replace").splitlines() if line.startswith("::/")]
    found: dict[str, bytes] = {}
    for name in names:
        if name.startswith(".") or not re.fullmatch(
                r"jupyter-firstboot(\s*\(\d+\))?\.(conf|txt)(\.txt)?", name, re.IGNORECASE):
            continue
        copied = _mtools("mcopy", "-n", "-i", drive.image, f"::/{name}", "-")
        if copied.returncode == 0:
            found[name] = copied.stdout
    if not found:
        return {}, f"the setup drive has no {SETUP_FILE}: nothing was read from it"
    return found, ""


def choose(files: dict[str, bytes]) -> str:
    """The file to take: one that was filled in before one that was not (Notepad's "Save
    as" leaves the template beside the edited copy), then the template's own name."""
    def filled(name: str) -> bool:
        try:
            return bool(preseed_keys(decode(files[name])))
        except SetupError:
            return True         # taken, so that its problem is said
    return min(files, key=lambda n: (not filled(n), n.lower() != SETUP_FILE, len(n), n))


def decode(data: bytes) -> str:
    """The settings as text, whatever the editor saved: UTF-8 with or without a BOM, UTF-16
    with its BOM (Notepad's "Unicode"), else Windows-1252 (Notepad's "ANSI"); any line end.
    SetupError for a file that is not plain text (a word processor's)."""
    if data.startswith(b"{\\rtf"):
        raise SetupError("it was saved as rich text (RTF): save it as plain text (TextEdit: "
                         "Format > Make Plain Text)")
    if data.startswith(b"PK\x03\x04") or data.startswith(b"\xd0\xcf\x11\xe0"):
        raise SetupError("it was saved as a word processor's document: save it as plain text")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("cp1252", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")


def drive_settings(name: str, data: bytes) -> tuple[str | None, str]:
    """The drive file's setting lines (comments and blank lines dropped), None when it has
    none or cannot be read; and what to say."""
    try:
        text = decode(data)
    except SetupError as exc:
        return None, f"{name} on the setup drive was not used: {exc}"
    if not preseed_keys(text):
        return None, f"{name} on the setup drive was not filled in: the wizard asks everything"
    body = "\n".join(line for line in text.splitlines()
                     if line.strip() and not line.strip().startswith("#"))
    return (f"# from {name} on the setup drive\n{body}\n",
            f"{name} on the setup drive: {', '.join(sorted(preseed_keys(text)))} taken "
            f"into /{PRESEED}")


def read_presets(system: System) -> tuple[armbian_preset.Taken | None, list[str]]:
    """Armbian's presets in /root/.not_logged_in_yet (Armbian Imager writes them there), as
    preseed lines; None when there are none."""
    path = system.path(armbian_preset.PRESET_FILE)
    try:
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
    except OSError:
        data = b""
    return presets_from(data, system.settings.user, system.settings.root_password == "same")


def presets_from(data: bytes, user: str,
                 root_same: bool) -> tuple[armbian_preset.Taken | None, list[str]]:
    """The presets file's bytes as preseed lines, and what to say; None for an empty file."""
    if not data.strip():
        return None, []
    where = f"Armbian presets (/{armbian_preset.PRESET_FILE})"
    try:
        text = decode(data)
    except SetupError as exc:
        return None, [f"{where}: not read: {exc}"]
    values, problems = armbian_preset.parse(text)
    taken = armbian_preset.take(values, user, root_same)
    said = [f"{where}: {p}" for p in [*problems, *taken.said]]
    if taken.lines:
        keys = ", ".join(dict.fromkeys(k for k, _ in taken.lines))
        said.insert(0, f"{where}: {keys} taken into /{PRESEED}")
    return taken, said


def assemble(old: str, presets: armbian_preset.Taken | None,
             drive_lines: str | None) -> tuple[str, list[str]]:
    """The preseed the wizard reads, from what the presets and the drive say: the image's
    preseed `old` (every card shares it) first, Armbian's presets over it, the drive's file
    over both. The presets' user password is Jupyter's too, unless the drive gives Jupyter
    one. The text, and what to say. try-image assembles it the same way on the host."""
    said: list[str] = []
    merged = old
    if presets is not None and presets.lines:
        jupyter_given = bool(preseed_keys(drive_lines or "") &
                             {"jupyter_password", "jupyter_password_hash"})
        merged = merge_preseed(merged, f"# from Armbian's presets\n"
                                       f"{presets.preseed(jupyter_given)}")
        if presets.password is not None and not jupyter_given:
            said.append("Armbian presets: the user password is Jupyter's password too (no "
                        "jupyter_password on the setup drive)")
    if drive_lines:
        merged = merge_preseed(merged, drive_lines)
    return merged, said


def take_settings(system: System, presets: armbian_preset.Taken | None,
                  drive_lines: str | None) -> list[str]:
    """assemble()'s preseed written where the wizard reads it; what to say."""
    preseed = system.path(PRESEED)
    old = preseed.read_text(errors="replace") if preseed.exists() else ""
    merged, said = assemble(old, presets, drive_lines)
    if merged != old:
        write_atomically(preseed, merged.encode(), 0o600)
    return said


def forget_presets(system: System) -> None:
    """The presets file overwritten and removed: its passwords are in plain text."""
    path = system.path(armbian_preset.PRESET_FILE)
    if path.is_file() and not path.is_symlink():
        with open(path, "r+b") as f:
            f.write(bytes(f.seek(0, os.SEEK_END)))
            f.flush()
            os.fsync(f.fileno())
        path.unlink()
        sync_directory(path.parent)


def wipe(drive: Drive) -> None:
    """Zeros over the whole partition: the passwords in it do not outlive it on the card."""
    zeros = bytes(1 << 20)
    with open(drive.disk, "r+b") as disk:
        disk.seek(drive.start)
        left = drive.size
        while left:
            left -= disk.write(zeros[:min(left, len(zeros))])
        disk.flush()
        os.fsync(disk.fileno())


def forget(drive: Drive) -> str:
    """The partition out of the kernel's view of the disk, before anything writes to the disk
    (the root is on it, so the kernel cannot read the whole table again, and the resize could
    not grow the root over a partition the kernel still has). Writing to the disk makes udev
    probe its partitions, which holds them open for a moment: so first, and retried. What to
    say when it could not be done (the next boot's kernel reads the table without it)."""
    if not stat.S_ISBLK(os.stat(drive.disk).st_mode):
        return ""
    sysfs = Path("/sys/class/block") / drive.disk.name

    def present() -> bool:
        return any((part / "partition").read_text().strip() == str(drive.number)
                   for part in sysfs.glob(f"{drive.disk.name}*") if (part / "partition").exists())

    for _ in range(20):
        subprocess.run(["partx", "--delete", "--nr", str(drive.number), str(drive.disk)],
                       capture_output=True, timeout=60, check=False)
        if not present():
            return ""
        subprocess.run(["udevadm", "settle", "--timeout=5"], capture_output=True, timeout=30,
                       check=False)
        time.sleep(0.5)
    return (f"the kernel still holds partition {drive.number}: the root filesystem grows at "
            f"the next boot")


def remove(drive: Drive) -> None:
    """The partition's entry out of the table."""
    result = subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet",
                             "--delete", str(drive.disk), str(drive.number)],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise SetupError(f"cannot remove the setup drive (partition {drive.number}) from "
                         f"{drive.disk}: {result.stderr.strip()}")


def take_first_settings(system: System, disk: Path | None,
                        root_number: int | None) -> list[str]:
    """The whole of it, in the order above; what to show on the consoles. The preseed is
    written before either source goes, so that a power cut in between reads both again.
    Without a disk (the root is not on a partition) only the presets."""
    presets, said = read_presets(system)
    drive, lines = None, None
    try:
        drive = find_drive(disk, root_number, running=True) if disk and root_number else None
    except (SetupError, OSError, subprocess.SubprocessError, ValueError) as exc:
        said.append(f"the setup drive could not be looked for ({exc}): the wizard asks "
                    f"instead")
    if drive is not None:
        said.append(f"setup drive found ({SETUP_LABEL}, partition {drive.number})")
        files, problem = read_setup_files(drive)
        if problem:
            said.append(problem)
        if files:
            name = choose(files)
            lines, what = drive_settings(name, files[name])
            said.append(what)
            said += [f"{other} on the setup drive was not used (only one file is: {name})"
                     for other in files if other != name]
    said += take_settings(system, presets, lines)
    # Always: while it exists, a root login shell (sudo -i) would start Armbian's first login.
    forget_presets(system)
    if presets is not None:
        said.append(f"/{armbian_preset.PRESET_FILE}: taken and removed (it held passwords)")
    if drive is not None:
        held = forget(drive)
        wipe(drive)
        remove(drive)
        said.append(held or "the setup drive was wiped and removed: the root filesystem grows "
                            "into it")
    return said


def root_disk() -> tuple[Path, int]:
    """The running card's root partition: its whole disk and its number."""
    name = Path(os.path.realpath(f"/sys/dev/block/{os.major(os.stat('/').st_dev)}:"
                                 f"{os.minor(os.stat('/').st_dev)}"))
    try:
        number = int((name / "partition").read_text())
    except OSError:
        raise SetupError("the root filesystem is not on a partition: no setup drive") from None
    return Path("/dev") / name.parent.name, number


def note(system: System, lines: list[str]) -> None:
    """What the consoles' wizard shows with its banner, this boot."""
    if lines:
        path = system.path(NOTE)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(path, "".join(f"{line}\n" for line in lines).encode(), 0o600)
        sync_directory(path.parent)


def boot_step(system: System, say: Callable[[str], None], disk: Path | None = None,
              root_number: int | None = None) -> int:
    """jupyter-setup-drive.service: the setup drive taken (on the running card, the root's
    disk; `disk` and `root_number` for a test's image), what happened said and left for the
    wizard's banner, and DONE marked so that later boots do not look again. Never fails the
    boot: a problem is said, and the wizard asks what is missing."""
    try:
        if disk is None or root_number is None:
            try:
                disk, root_number = root_disk()
            except SetupError:
                disk = root_number = None
        lines = take_first_settings(system, disk, root_number)
    except (SetupError, OSError, subprocess.SubprocessError, ValueError) as exc:
        lines = [f"the setup drive could not be taken ({exc}): the wizard asks instead"]
    for line in lines:
        say(f"jupyter-setup-drive: {line}")
    note(system, lines)
    system.write(DONE, "the setup drive was looked for at first boot\n", 0o644)
    return 0
