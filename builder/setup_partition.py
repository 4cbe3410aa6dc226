"""The setup partition: a small FAT partition after the root partition that Windows, macOS and
Linux show as a drive once the image is flashed, holding jupyter-firstboot.conf (every key,
commented out, explained) and README.txt. Someone without a serial cable, a screen or a way to
read ext4 fills the file in there; at first boot the card reads it before anything else,
applies it, wipes the partition and removes it, so the root partition grows to the card
(builder/firstboot/setup_drive.py).

The filesystem is made in a file of its own (mkfs.fat -C), filled with mtools (nothing is
mounted) and copied into the image after the root partition, which shrink-image has just
made the last one. The partition table gets an entry for it: MBR type 0x0e (FAT16, LBA), or
on GPT a Microsoft basic data partition named SETUP_NAME, which Windows also mounts.

After that, on a finished image or a flashed card, find_setup_drive, read_setup_file and
write_setup_file reach the file through mtools at the partition's offset: a card's partitions
need not be known to the kernel (a loop device without partition scanning, a card held
exclusively by flash-image), and nothing is mounted.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from builder import log
from builder.errors import BuildError
from builder.ext4 import find_root_fs
from builder.firstboot.card import SETUP_LABEL, SETUP_NAME, SetupError
from builder.firstboot.setup_drive import SETUP_FILE, find_drive
from builder.image import GPT_BACKUP_SECTORS, SECTOR, Partition, read_table
from builder.run import host_env, last_line, run

LABEL = SETUP_LABEL
SIZE = 8 << 20
MIB = 1 << 20
MBR_TYPE = "e"                                          # FAT16, LBA
GPT_TYPE = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"       # Microsoft basic data
TEMPLATES = Path(__file__).parent / "setup-partition"


def contents(context: Mapping[str, Any]) -> dict[str, bytes]:
    """The files of the setup partition, rendered, with the line ends Notepad expects."""
    # Here, not at the top: flash-image and try-image use this module's readers and writer
    # and must not load the build's templating (tests/test_imports.py).
    from builder.customize import render_templates

    rendered = render_templates([TEMPLATES], context)
    return {path.name.removesuffix(".j2"): text.replace("\r\n", "\n").replace("\n", "\r\n")
            .encode() for path, text in rendered.items()}


def add_setup_partition(image: Path, files: Mapping[str, bytes], volume_id: str) -> Partition:
    """Append the setup partition to `image`, right after its last partition (the root,
    after shrink-image), holding `files`; the file grows by SIZE (and the backup GPT)."""
    table = read_table(image)
    if table.label == "dos" and len(table.partitions) >= 4:
        raise BuildError(f"{image.name} already has four primary partitions: there is no room "
                         f"for the setup partition (set image.setup_partition: false)")
    start = -(-table.last.end // MIB) * MIB
    end = start + SIZE
    with tempfile.TemporaryDirectory(prefix="setup-partition.") as work:
        fat = Path(work) / "setup.fat"
        make_fat(fat, files, volume_id, start // SECTOR)
        if table.label == "gpt":
            # The backup GPT sits at the end of the file: the table is written anew for the
            # longer file, with the setup partition after the others (as shrink does).
            dump = run(["sfdisk", "--dump", image], capture=True).stdout.decode()
            dump = "\n".join(line for line in dump.splitlines()
                             if not line.startswith(("last-lba:", "device:")))
            with open(image, "r+b") as f:
                f.truncate(end + GPT_BACKUP_SECTORS * SECTOR)
            entry = (f"start={start // SECTOR}, size={SIZE // SECTOR}, type={GPT_TYPE}, "
                     f'name="{SETUP_NAME}"')
            run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", "--wipe", "never",
                 "--wipe-partitions", "never", image],
                input=f"{dump}\n{entry}\n".encode(), capture=True,
                what=f"add the setup partition to the GPT of {image}")
        else:
            with open(image, "r+b") as f:
                f.truncate(end)
            run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", "--append", image],
                input=f"start={start // SECTOR}, size={SIZE // SECTOR}, type={MBR_TYPE}\n"
                .encode(), capture=True, what=f"add the setup partition to {image}")
        with open(fat, "rb") as source, open(image, "r+b") as target:
            target.seek(start)
            target.write(source.read())
    added = next(p for p in read_table(image).partitions if p.start == start)
    log.info(f"setup partition {added.number} ({LABEL}, {SIZE >> 20} MiB, FAT): "
             f"{', '.join(files)}")
    return added


def make_fat(path: Path, files: Mapping[str, bytes], volume_id: str, hidden: int) -> None:
    """A FAT16 filesystem of SIZE in `path` holding `files`. `hidden` is the partition's
    first sector, which the boot sector records."""
    # One sector per cluster: FAT16 needs at least 4085 clusters, which 8 MiB gives only so.
    run(["mkfs.fat", "-C", "-F", "16", "-s", "1", "-n", LABEL, "-i", volume_id, "-h", str(hidden),
         str(path), str(SIZE // 1024)], capture=True, what="make the setup partition's FAT")
    source = path.parent / "files"
    source.mkdir()
    for name, data in files.items():
        (source / name).write_bytes(data)
        run(["mcopy", "-i", str(path), "-o", str(source / name), f"::{name}"], capture=True,
            env=_mtools_env(), what=f"copy {name} onto the setup partition")


def volume_id_for(name: str) -> str:
    """A FAT volume serial of the image's own (Windows shows it; nothing depends on it)."""
    return hashlib.sha256(name.encode()).hexdigest()[:8]


# On a finished image or a flashed card.


def find_setup_drive(disk: Path, root_number: int | None = None) -> tuple[int, int] | None:
    """Where the setup partition of `disk` (an image file, or a whole card) is: its start and
    size in bytes. None when there is none: an image built with image.setup_partition: false
    or before there was a setup drive, or a card that has booted. The card's own rule decides
    (setup_drive.find_drive), so host and card never disagree on what the drive is.
    `root_number`, the root partition's number, when the caller has found it already."""
    if root_number is None:
        root_number = find_root_fs(disk, read_table(disk)).partition.number
    try:
        drive = find_drive(disk, root_number)
    except SetupError as exc:
        raise BuildError(f"{exc}: is {disk} a disk image or a card?") from None
    return (drive.start, drive.size) if drive is not None else None


def read_setup_file(disk: Path, start: int) -> bytes | None:
    """The bytes of jupyter-firstboot.conf on the setup partition at byte `start` of `disk`,
    as they are (line ends, encoding); None when the partition has no such file."""
    listing = run(["mdir", "-b", "-i", _on(disk, start), "::/"], capture=True, check=False,
                  env=_mtools_env())
    if listing.returncode != 0:
        raise BuildError(f"the setup partition of {disk} (at byte {start}) cannot be read as "
                         f"FAT ({last_line(listing.stderr) or 'mdir failed'}): write the "
                         f"image again, or build it again if this persists")
    # FAT names are case-insensitive: an editor may have saved it as JUPYTER-FIRSTBOOT.CONF.
    names = [line.removeprefix("::/") for line in
             listing.stdout.decode(errors="replace").splitlines()]
    name = next((n for n in names if n.lower() == SETUP_FILE), None)
    if name is None:
        return None
    return run(["mcopy", "-n", "-i", _on(disk, start), f"::/{name}", "-"], capture=True,
               env=_mtools_env(), what=f"read {SETUP_FILE} from the setup partition of "
                                       f"{disk}").stdout


def write_setup_file(disk: Path, start: int, data: bytes) -> None:
    """Replace jupyter-firstboot.conf on the setup partition at byte `start` of `disk` with
    `data` (bytes as given: the caller chooses the line ends), and read it back."""
    # The file may hold passwords: on the host it exists only in a directory of mode 0700,
    # while mcopy copies it.
    with tempfile.TemporaryDirectory(prefix="setup-file.") as work:
        source = Path(work) / SETUP_FILE
        source.write_bytes(data)
        run(["mcopy", "-o", "-i", _on(disk, start), str(source), f"::/{SETUP_FILE}"],
            capture=True, env=_mtools_env(),
            what=f"write {SETUP_FILE} onto the setup partition of {disk}")
    if read_setup_file(disk, start) != data:
        raise BuildError(f"{SETUP_FILE} on the setup partition of {disk} does not read back "
                         f"as written: the disk may be failing (write it again)")


def setup_file_text(template: bytes | None, lines: str, *, bom: bool) -> bytes:
    """jupyter-firstboot.conf as flash-image and try-image write it: the template's comments
    (and blank lines), so that whoever opens the drive still reads what each key does, a
    blank line, then `lines`; every line end CRLF, as Notepad expects. The template's own
    settings (it gives none) are dropped: `lines` are the card's settings, and a key given
    twice is refused at first boot. `bom`: a UTF-8 byte-order mark first, as Windows'
    Notepad saves the file (try-image imitates that person); flash-image writes none."""
    text = (template or b"").decode("utf-8-sig", errors="replace").replace("\r\n", "\n")
    kept = [line for line in text.splitlines()
            if not line.strip() or line.lstrip().startswith("#")]
    if kept and kept[-1].strip():
        kept.append("")
    body = [*kept, *lines.replace("\r\n", "\n").splitlines()]
    return ("\ufeff" if bom else "").encode() + "".join(f"{line}\r\n" for line in body).encode()


def _on(disk: Path, start: int) -> str:
    """mtools' name for the filesystem at byte `start` of `disk`."""
    return f"{disk}@@{start}"


def _mtools_env() -> dict[str, str]:
    # As on the card (setup_drive): mtools' checks of a floppy's geometry are for floppies, and
    # a FAT that another system wrote on a card's partition need not pass them.
    return {**host_env(), "MTOOLS_SKIP_CHECK": "1"}
