"""The exact command lines behind growing, shrinking and a chroot session, without root: the
one subprocess layer (run) is replaced by a recorder that answers as the real programs do,
so this logic is covered on any machine, and a change to a command line shows here first.
(The same steps run for real, on loop devices, in test_engine.py.)"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from builder import chroot, ext4, image, mount
from builder.ledger import Ledger

MIB = 1 << 20
SECTORS_PER_MIB = MIB // 512


class Programs:
    """Stands in for run(): records each argv and answers like the program would, from a
    partition table and a filesystem it keeps up to date."""

    def __init__(self, image_file: Path, start_mib: int, size_mib: int) -> None:
        self.image_file = image_file
        self.start, self.size = start_mib * SECTORS_PER_MIB, size_mib * SECTORS_PER_MIB
        self.calls: list[list[str]] = []
        self.mounted: list[str] = []

    def __call__(self, argv: Sequence[str | os.PathLike[str]], *, env: Any = None,
                 input: bytes | None = None, capture: bool = False, check: bool = True,
                 what: str | None = None) -> subprocess.CompletedProcess[bytes]:
        args = [os.fspath(a) for a in argv]
        self.calls.append(args)
        out = b""
        if args[:2] == ["sfdisk", "--json"]:
            out = json.dumps({"partitiontable": {"label": "dos", "sectorsize": 512, "partitions": [
                {"node": f"{self.image_file}1", "start": self.start, "size": self.size,
                 "type": "83"}]}}).encode()
        elif args[0] == "sfdisk" and "-N" in args:
            spec = (input or b"").decode().strip(", \n")
            end = os.path.getsize(self.image_file) // 512
            self.size = end - self.start if spec == "+" else int(spec)
        elif args[:2] == ["dumpe2fs", "-h"]:
            out = (b"Filesystem volume name:   armbi_root\nBlock count:              262144\n"
                   b"Free blocks:              200000\nBlock size:               4096\n")
        elif args[:2] == ["resize2fs", "-P"]:
            out = b"Estimated minimum size of the filesystem: 60000\n"
        elif args[0] == "mount":
            self.mounted.append(args[-1])
        elif args[0] == "umount":
            self.mounted.remove(args[-1])
        return subprocess.CompletedProcess(args, 0, out, b"")


@contextmanager
def fake_loop(ledger: Ledger, image_file: Path, offset: int, size: int,
              read_only: bool = False) -> Iterator[str]:
    yield f"/dev/loop7:{offset // MIB}M+{size // MIB}M"


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Programs:
    """A 1 GiB image file (sparse) whose one partition starts at 4 MiB."""
    image_file = tmp_path / "image.img"
    with open(image_file, "wb") as f:
        f.truncate(1024 * MIB)
    programs = Programs(image_file, 4, 1020)
    for module in (image, ext4):
        monkeypatch.setattr(module, "run", programs)
    monkeypatch.setattr(image, "loop_device", fake_loop)
    return programs


def test_growing_runs_exactly_these(disk: Programs, tmp_path: Path) -> None:
    table = image.read_table(disk.image_file)
    root = image.RootFs(table.partitions[0], "armbi_root")
    grown = image.grow(Ledger(tmp_path / "state"), disk.image_file, table, root, 512 * MIB)
    path = str(disk.image_file)
    assert disk.calls == [
        ["sfdisk", "--json", path],
        ["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", "-N", "1", path],
        ["sfdisk", "--json", path],
        ["e2fsck", "-f", "-y", "/dev/loop7:4M+1532M"],
        ["resize2fs", "/dev/loop7:4M+1532M"],
    ]
    assert grown.size == 1532 * MIB and os.path.getsize(disk.image_file) == 1536 * MIB


def test_shrinking_runs_exactly_these(disk: Programs, tmp_path: Path) -> None:
    """The filesystem to what resize2fs -P says plus the free space asked for, in whole MiB;
    then the partition and the file."""
    partition = image.read_table(disk.image_file).partitions[0]
    disk.calls.clear()
    size = image.shrink(Ledger(tmp_path / "state"), disk.image_file, partition, 64 * MIB)
    path = str(disk.image_file)
    # 60000 blocks of 4 KiB (234.4 MiB) + 64 MiB, rounded up to whole MiB: 299 MiB.
    assert disk.calls == [
        ["e2fsck", "-f", "-y", "/dev/loop7:4M+1020M"],
        ["dumpe2fs", "-h", "/dev/loop7:4M+1020M"],
        ["resize2fs", "-P", "/dev/loop7:4M+1020M"],
        ["resize2fs", "/dev/loop7:4M+1020M", f"{299 * 1024}K"],
        ["sfdisk", "--json", path],
        ["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", "-N", "1", path],
    ]
    assert size == (4 + 299) * MIB == os.path.getsize(disk.image_file)
    assert disk.size == 299 * SECTORS_PER_MIB


def test_a_chroot_session_mounts_exactly_these_and_unmounts_in_reverse(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    for directory in ("etc", "usr/sbin", "var/cache/apt/archives", "tmp"):
        (root / directory).mkdir(parents=True)
    programs = Programs(tmp_path / "unused.img", 4, 4)
    monkeypatch.setattr(mount, "run", programs)
    monkeypatch.setattr(mount, "_mount_points", lambda: list(programs.mounted))
    # Host facts the session asks for first: the kernel runs arm64 programs, device nodes
    # can be made, the CPU model works.
    monkeypatch.setattr(chroot, "binfmt_status",
                        lambda arch: chroot.Binfmt(True, "/usr/bin/qemu-aarch64-static", ""))
    monkeypatch.setattr(chroot, "populate_dev", lambda dev: None)
    monkeypatch.setattr(chroot, "_checked_emulation", lambda session, emulation: emulation)
    work, apt = tmp_path / "work", tmp_path / "apt" / "trixie-arm64"
    work.mkdir()
    emulation = chroot.Emulation("cortex-a53", "arm64 programs run as cortex-a53")
    with chroot.chroot_session(Ledger(tmp_path / "state"), root, "arm64", apt_cache=apt,
                               apt_proxy="http://127.0.0.1:3142", env={},
                               emulation=emulation, quick_apt=False,
                               binds={"/tmp/build-image": work}) as session:
        mounts = list(programs.calls)
        assert session.env["QEMU_CPU"] == "cortex-a53" and session.env["LC_ALL"] == "C.UTF-8"
        assert (root / "usr/sbin/policy-rc.d").read_text().endswith("exit 101\n")
        assert (root / chroot.PROXY_CONF).read_text() == \
            'Acquire::http::Proxy "http://127.0.0.1:3142";\n'
        assert b"AllowUnauthenticated \"false\"" in (root / chroot.SIGNED_APT_CONF).read_bytes()
        # Every program in the image: namespaces of its own, its own /proc.
        assert chroot.contained(root, ["dpkg", "-l"]) == [
            "unshare", "--mount", "--pid", "--fork", "--kill-child", "--ipc", "--uts",
            f"--mount-proc={root}/proc", "chroot", str(root), "dpkg", "-l"]
    r = str(root)
    assert mounts == [
        ["mount", "-t", "sysfs", "-o", "nosuid,nodev,noexec,ro", "sysfs", f"{r}/sys"],
        ["mount", "-t", "tmpfs", "-o", "mode=755,nosuid,size=16m", "tmpfs", f"{r}/dev"],
        ["mount", "-t", "devpts", "-o", "gid=5,mode=620,ptmxmode=666", "devpts",
         f"{r}/dev/pts"],
        ["mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", f"{r}/dev/shm"],
        ["mount", "-t", "tmpfs", "-o", "mode=755,nosuid,nodev", "tmpfs", f"{r}/run"],
        ["mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", f"{r}/tmp"],
        ["mount", "--bind", str(apt), f"{r}/var/cache/apt/archives"],
        ["mount", "--bind", str(work), f"{r}/tmp/build-image"],
    ]
    unmounts = programs.calls[len(mounts):]
    assert unmounts == [["umount", call[-1]] for call in reversed(mounts)]
    assert programs.mounted == []
    # What the session put in place is gone again.
    assert not (root / "usr/sbin/policy-rc.d").exists()
    assert not (root / chroot.PROXY_CONF).exists()
    assert not (root / chroot.SIGNED_APT_CONF).exists()
