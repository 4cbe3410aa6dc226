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
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from builder import log
from builder.customize import render_templates
from builder.errors import BuildError
from builder.firstboot.card import SETUP_LABEL, SETUP_NAME
from builder.image import GPT_BACKUP_SECTORS, SECTOR, Partition, read_table
from builder.run import host_env, run

LABEL = SETUP_LABEL
SIZE = 8 << 20
MIB = 1 << 20
MBR_TYPE = "e"                                          # FAT16, LBA
GPT_TYPE = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"       # Microsoft basic data
TEMPLATES = Path(__file__).parent / "setup-partition"


def contents(context: Mapping[str, Any]) -> dict[str, bytes]:
    """The files of the setup partition, rendered, with the line ends Notepad expects."""
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
            env={**host_env(), "MTOOLS_SKIP_CHECK": "1"},
            what=f"copy {name} onto the setup partition")


def volume_id_for(name: str) -> str:
    """A FAT volume serial of the image's own (Windows shows it; nothing depends on it)."""
    return hashlib.sha256(name.encode()).hexdigest()[:8]
