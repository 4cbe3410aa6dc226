"""An ext4 filesystem inside a disk image or on a card, read and written with debugfs.

Nothing is mounted: try-image needs no root for its trial disk, and flash-image writes a card's
preseed file while holding the card exclusively, where a mount would let the desktop's
automounter in.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from builder.errors import BuildError
from builder.run import run

if TYPE_CHECKING:
    # image.py reads superblocks with the function below: it imports this module.
    from builder.image import Partition, Table


def superblock(spec: str | Path) -> dict[str, str]:
    """The fields of an ext4 superblock as `dumpe2fs -h` prints them ({"Block size": "4096",
    "Filesystem UUID": ...}); empty when there is none. `spec` is a device, a file, or
    FILE?offset=N. (dumpe2fs's field names are not translated, and run() sets C anyway.)"""
    proc = run(["dumpe2fs", "-h", spec], capture=True, check=False)
    text = proc.stdout.decode(errors="replace")
    return dict(re.findall(r"^([A-Za-z][A-Za-z #/-]*):[ \t]+(.*?)[ \t]*$", text, re.M))


class Ext4:
    """An ext4 filesystem inside a disk image file, through debugfs's offset= syntax."""

    def __init__(self, disk: Path, partition: Partition) -> None:
        self.disk = disk
        self.partition = partition
        self.spec = f"{disk}?offset={partition.start}"

    def _debugfs(self, command: str, *, write: bool = False) -> subprocess.CompletedProcess[bytes]:
        argv = ["debugfs", *(["-w"] if write else []), "-R", command, self.spec]
        return run(argv, capture=True, check=False)

    def read(self, path: str) -> bytes | None:
        proc = self._debugfs(f"cat {path}")
        # debugfs prints its errors on stderr and exits 0: an absent file is empty stdout plus
        # "File not found by ext2_lookup" on stderr.
        if b"not found" in proc.stderr or proc.returncode != 0:
            return None
        return proc.stdout

    def exists(self, path: str) -> bool:
        return b"Inode:" in self._debugfs(f"stat {path}").stdout

    def listdir(self, path: str) -> list[str]:
        proc = self._debugfs(f"ls -p {path}")
        # -p: /inode/mode/uid/gid/name/size/ per entry.
        names = [line.split("/")[5] for line in proc.stdout.decode(errors="replace").splitlines()
                 if line.count("/") >= 6]
        return [n for n in names if n not in (".", "..")]

    def resolve(self, path: str, hops: int = 8) -> str:
        """`path` with symbolic links followed (Armbian's /boot/Image and uInitrd are links);
        debugfs's dump would copy the link, not the kernel."""
        for _ in range(hops):
            stat = self._debugfs(f"stat {path}").stdout.decode(errors="replace")
            if "Type: symlink" not in stat:
                return path
            target = re.search(r'Fast link dest: "([^"]*)"', stat)
            if target is None:
                link = self.read(path)     # a long link's target is in a data block
                if not link:
                    break
                destination = link.decode(errors="replace")
            else:
                destination = target.group(1)
            path = os.path.normpath(os.path.join(os.path.dirname(path), destination))
        raise BuildError(f"{path}: a symbolic link that leads nowhere in {self.disk.name}")

    def dump(self, path: str, target: Path) -> None:
        real = self.resolve(path)
        proc = self._debugfs(f"dump {real} {target}")
        if not target.exists() or b"not found" in proc.stderr or target.stat().st_size == 0:
            raise BuildError(f"{path} could not be read from {self.disk.name} (empty, or not "
                             f"a regular file)")

    def write(self, path: str, data: bytes, mode: int, work: Path) -> None:
        """Create or replace a file (owned by root)."""
        self.makedirs(os.path.dirname(path))
        source = work / "debugfs-write.tmp"
        source.write_bytes(data)
        try:
            self._debugfs(f"rm {path}", write=True)
            proc = self._debugfs(f"write {source} {path}", write=True)
        finally:
            source.unlink()
        self._debugfs(f"sif {path} mode 0{0o100000 | mode:o}", write=True)
        self._debugfs(f"sif {path} uid 0", write=True)
        self._debugfs(f"sif {path} gid 0", write=True)
        if self.read(path) != data:
            raise BuildError(f"could not write {path} into {self.disk}: "
                             f"{proc.stderr.decode(errors='replace').strip()}")

    def makedirs(self, path: str) -> None:
        parts = [p for p in path.split("/") if p]
        for depth in range(1, len(parts) + 1):
            directory = "/" + "/".join(parts[:depth])
            if not self.exists(directory):
                self._debugfs(f"mkdir {directory}", write=True)

    def symlink(self, path: str, target: str) -> None:
        self.makedirs(os.path.dirname(path))
        self._debugfs(f"symlink {path} {target}", write=True)
        if not self.exists(path):
            raise BuildError(f"could not create the link {path} in {self.disk}")

    def remove(self, path: str) -> None:
        self._debugfs(f"rm {path}", write=True)


def find_root_fs(disk: Path, table: Table) -> Ext4:
    """The partition holding the operating system: ext4 with /etc/os-release."""
    for part in sorted(table.partitions, key=lambda p: p.number):
        fs = Ext4(disk, part)
        if fs.exists("/etc/os-release"):
            return fs
    raise BuildError(f"{disk} has no ext4 partition with an operating system "
                     f"(/etc/os-release): not an image build-image made")
