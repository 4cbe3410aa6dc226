"""--base debian: a bootable base made from Debian's packages, cached; then a whole build on
it for an armhf board (the engine's other architecture)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BUILD_CACHE, engine_capable, leftover_resources, root_partition, run_cli
from conftest import debugfs as run_debugfs

pytestmark = [pytest.mark.root, pytest.mark.slow]

BOARD = "orangepipcplus"   # armhf, H3: the board QEMU's orangepi-pc machine stands in for
CACHE = BUILD_CACHE


@pytest.fixture(scope="module")
def debian_base() -> Path:
    reason = engine_capable()
    if reason:
        pytest.skip(reason)
    result = run_cli("--board", BOARD, "--base", "debian", "--fetch-only", "--cache-dir",
                     CACHE, timeout=3000)
    assert result.returncode == 0, result.stderr
    assert leftover_resources(CACHE) == []
    assert not list((CACHE / "work").glob("build-*"))
    return Path(result.stdout.splitlines()[-1])


def debugfs(image: Path, offset: int, command: str) -> str:
    return run_debugfs(root_partition(image, offset), command).stdout


def test_layout_is_armbians(debian_base: Path, tmp_path: Path) -> None:
    image = tmp_path / "base.img"
    subprocess.run(["cp", "--sparse=always", str(debian_base), str(image)], check=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True,
                                      check=True).stdout)["partitiontable"]
    assert table["label"] == "dos"
    (part,) = table["partitions"]
    assert part["start"] == 8192 and part.get("bootable") is True
    with open(image, "rb") as f:
        f.seek(8 << 10)
        spl = f.read(16)
    assert spl[4:12] == b"eGON.BT0", "Allwinner's boot ROM looks for this SPL header at 8 KiB"
    probe = subprocess.run(["blkid", "--probe", "--offset", str(4 << 20), "--output",
                            "export", str(image)], capture_output=True, text=True).stdout
    fields = dict(line.split("=", 1) for line in probe.splitlines() if "=" in line)
    assert fields["TYPE"] == "ext4" and fields["LABEL"] == "debian_root"
    uuid = fields["UUID"]
    extlinux = debugfs(image, 4 << 20, "cat /boot/extlinux/extlinux.conf")
    assert f"root=UUID={uuid}" in extlinux and "console=ttyS0,115200" in extlinux
    assert f"UUID={uuid}" in debugfs(image, 4 << 20, "cat /etc/fstab")
    for key in ("kernel", "initrd", "fdt"):
        path = re.search(rf"^\s*{key} (\S+)", extlinux, re.MULTILINE)
        assert path, key
        stat = debugfs(image, 4 << 20, f"stat {path.group(1)}")
        assert "Type: regular" in stat, (key, path.group(1))
    initrd = re.search(r"initrd (\S+)", extlinux)
    assert initrd
    size = int(re.search(r"Size: (\d+)", debugfs(image, 4 << 20, f"stat {initrd.group(1)}"))
               .group(1))  # type: ignore[union-attr]
    assert size < 20 << 20, "MODULES=list keeps the initramfs small"
    assert debugfs(image, 4 << 20, "cat /etc/machine-id") == ""
    assert "sun8i-h3-orangepi-pc-plus.dtb" in extlinux
    # It grows to the card at first boot, and carries no leftover packages.
    wants = debugfs(image, 4 << 20, "ls /etc/systemd/system/multi-user.target.wants")
    assert "grow-root-filesystem.service" in wants
    assert "growpart" in debugfs(image, 4 << 20, "cat /usr/local/sbin/grow-root-filesystem")
    assert ".deb" not in debugfs(image, 4 << 20, "ls /var/cache/apt/archives")


def test_base_is_reused(debian_base: Path) -> None:
    started = time.monotonic()
    result = run_cli("--board", BOARD, "--base", "debian", "--fetch-only", "--cache-dir",
                     CACHE)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.splitlines()[-1]) == debian_base
    assert "Debian base in cache" in result.stderr and "debootstrap" not in result.stderr
    assert time.monotonic() - started < 30


# A whole build on this base, for this board and an arm64 one: test_appliance.py.
