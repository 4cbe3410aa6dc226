"""flash-image onto real loop devices (an SD card is a loop device here): bmap and full writes,
verification against the medium, per-card preseeds and TLS certificates, and every refusal.

Images are small ones made without root (an MBR, an Allwinner boot header at 8 KiB, an ext4
root from 4 MiB filled with mkfs.ext4 -d, and when asked the setup drive build-image adds
after it), with a real bmap from bmaptool.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pexpect
import pytest
from conftest import leftover_resources

from builder import setup_partition
from builder.boards import load_catalog
from builder.config import load_config
from builder.customize import template_context
from builder.errors import BuildError
from builder.firstboot import tls
from builder.firstboot.answers import hash_login_password, parse_preseed
from builder.firstboot.card import PRESEED, Settings
from builder.firstboot.setup_drive import boot_step
from builder.firstboot.system import System
from builder.flash.cli import check_request, finish_card, parser
from builder.flash.device import inspect_target, opened
from builder.flash.write import Mismatch, write_card

pytestmark = [pytest.mark.root, pytest.mark.slow]
FLASH_IMAGE = [sys.executable, "-m", "builder.flash"]
ROOT_OFFSET = 4 << 20
MIB = 1 << 20
KEY_A = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl "
         "a@laptop")
KEY_B = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHnCcbEq2L1ZB3C3X4b1g3rR5pLCpDGuGq5o9qNEPnxy "
         "b@laptop")


def template_files() -> dict[str, bytes]:
    """The setup drive's files as build-image makes them."""
    board, _ = load_catalog().lookup("orangepipc")
    return setup_partition.contents(template_context(load_config(), board))


def make_image(directory: Path, name: str = "card", *, size_mib: int = 24,
               files: dict[str, bytes] | None = None, boot_partition: bool = False,
               tail: int = 0, setup_drive: bool = False) -> Path:
    """X.img with X.img.bmap, X.img.zst (+ .sha256, as build-image writes) and X.img.xz. With
    `setup_drive`, the 8 MiB setup partition follows the root (from 24 MiB on)."""
    tree = directory / f"{name}.tree"
    files = {"etc/os-release": b"ID=debian\n", "boot/.keep": b"", "etc/hostname": b"orangepi\n",
             "etc/orangepi-jupyter-release": b"BOARD=orangepipc\nJUPYTER_USER=jupyter\n"
                                             b"JUPYTER_TLS=yes\n",
             "srv/data": os.urandom(3 * MIB), **(files or {})}
    for path, data in files.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_bytes(data)
    image = directory / f"{name}.img"
    with open(image, "wb") as f:
        f.truncate(size_mib * MIB)
    if boot_partition:
        layout = b"label: dos\nstart=8192, size=8192, type=83\nstart=16384, type=83\n"
        boot_tree = directory / f"{name}.boot"
        boot_tree.mkdir()
        (boot_tree / "boot.scr").write_bytes(b"script")
        subprocess.run(["sfdisk", "--quiet", str(image)], input=layout, check=True)
        subprocess.run(["mkfs.ext4", "-q", "-L", "armbi_boot", "-d", str(boot_tree), "-E",
                        f"offset={ROOT_OFFSET}", str(image), "4096k"], check=True)
        root_offset = 8 * MIB
        shutil.rmtree(boot_tree)
    else:
        subprocess.run(["sfdisk", "--quiet", str(image)],
                       input=b"label: dos\nstart=8192, type=83\n", check=True)
        root_offset = ROOT_OFFSET
    subprocess.run(["mkfs.ext4", "-q", "-L", "armbi_root", "-d", str(tree), "-E",
                    f"offset={root_offset}", str(image),
                    f"{(size_mib * MIB - root_offset) // 1024}k"], check=True)
    with open(image, "r+b") as f:
        f.seek(8 << 10)
        f.write(b"\x00\x00\x00\x00eGON.BT0" + os.urandom(4000))     # a boot loader
        if tail:
            f.seek(0, os.SEEK_END)
            f.write(os.urandom(tail))            # a size that is no multiple of a block
    if setup_drive:
        setup_partition.add_setup_partition(image, template_files(), "12345678")
    shutil.rmtree(tree)
    subprocess.run(["bmaptool", "-q", "create", "-o", f"{image}.bmap", str(image)], check=True)
    subprocess.run(["zstd", "-q", "-f", "-k", str(image)], check=True)
    subprocess.run(["xz", "-q", "-f", "-k", "-0", str(image)], check=True)
    zst = Path(f"{image}.zst")
    digest = subprocess.run(["sha256sum", str(zst)], capture_output=True, text=True,
                            check=True).stdout.split()[0]
    Path(f"{zst}.sha256").write_text(f"{digest}  {zst.name}\n")
    return image


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image(tmp_path_factory.mktemp("image"))


class Cards:
    """Loop devices over files, detached (and checked for) at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.devices: list[str] = []

    def new(self, size_mib: int = 32, *, partscan: bool = False, fill: bytes | None = None
            ) -> tuple[Path, Path]:
        backing = self.directory / f"card{len(self.devices)}"
        with open(backing, "wb") as f:
            if fill is not None:
                f.write(fill * (size_mib * MIB // len(fill)))
            f.truncate(size_mib * MIB)
        argv = ["losetup", "--find", "--show", *(["--partscan"] if partscan else []),
                str(backing)]
        device = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
        self.devices.append(device)
        return Path(device), backing

    def close(self) -> None:
        for device in self.devices:
            subprocess.run(["losetup", "--detach", device], capture_output=True)


@pytest.fixture
def cards(tmp_path: Path) -> Iterator[Cards]:
    made = Cards(tmp_path)
    yield made
    made.close()
    assert leftover_resources(tmp_path) == []


def flash(*args: str | Path, stdin: str | None = "", timeout: float = 120
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLASH_IMAGE, *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def error_of(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("flash-image: error")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def partitions_of(device: Path) -> Path:
    """The card's first partition node. This machine's kernel does not scan a loop device's
    table itself (partscan is set, yet no partitions appear): partx adds them."""
    subprocess.run(["partx", "--add", str(device)], capture_output=True)
    partition = Path(f"{device}p1")
    for _ in range(50):
        if partition.exists():
            return partition
        time.sleep(0.1)
    raise AssertionError(f"{partition} did not appear")


def head_of(path: Path, size: int = MIB) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def preseed_on(device: Path, offset: int = ROOT_OFFSET,
               path: str = "/boot/jupyter-firstboot.conf") -> tuple[str, str]:
    """The card's preseed file and its inode's mode and owner, read with debugfs."""
    spec = f"{device}?offset={offset}"
    text = subprocess.run(["debugfs", "-R", f"cat {path}", spec], capture_output=True,
                          text=True).stdout
    info = subprocess.run(["debugfs", "-R", f"stat {path}", spec], capture_output=True,
                          text=True, env={**os.environ, "DEBUGFS_PAGER": "cat"}).stdout
    return text, info


# Writing and verifying.


def test_bmap_and_full_writes_give_the_same_card(image: Path, cards: Cards) -> None:
    raw = image.read_bytes()
    results = {}
    for how, source, extra in (("bmap", f"{image}.zst", []), ("full", f"{image}.xz",
                                                                ["--no-bmap"]),
                               ("raw", str(image), ["--no-bmap"])):
        device, backing = cards.new()
        proc = flash(source, device, "--yes", "--force", *extra)
        assert proc.returncode == 0, proc.stderr
        assert "verified: the card holds the image" in proc.stderr
        results[how] = backing.read_bytes()
        assert results[how][: len(raw)] == raw, how
    assert results["bmap"] == results["full"] == results["raw"]


def test_bmap_writes_only_mapped_blocks_and_the_card_is_sound(image: Path, cards: Cards) -> None:
    """On a used card, the unmapped blocks keep what was there, and the filesystem written
    over them is still clean: the blocks skipped are ones it does not use."""
    device, backing = cards.new(fill=b"\xa5")
    proc = flash(f"{image}.zst", device, "--yes", "--force")
    assert proc.returncode == 0, proc.stderr
    sizes = re.search(r"wrote ([\d.]+) MiB of ([\d.]+) MiB", proc.stderr)
    assert sizes, proc.stderr
    assert float(sizes.group(1)) < float(sizes.group(2)) / 2
    card = backing.read_bytes()
    assert b"\xa5" * 4096 in card[ROOT_OFFSET:24 * MIB], "every block was written"
    assert card[:MIB] == image.read_bytes()[:MIB]
    fsck = subprocess.run(["e2fsck", "-fn", f"{device}?offset={ROOT_OFFSET}"],
                          capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_verify_reads_the_card_itself(image: Path, cards: Cards) -> None:
    """A byte changed on the medium after writing (behind the loop device's page cache) is
    found, and the range that holds it is named."""
    device, backing = cards.new()
    assert flash(f"{image}.zst", device, "--yes", "--force", "--no-verify").returncode == 0
    # The device's page cache holds the card as written: a read-back through it would pass.
    with open(device, "rb") as f:
        while f.read(MIB):
            pass
    offset = ROOT_OFFSET + 1234
    with open(backing, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))
    proc = flash(f"{image}.zst", device, "--verify-only")
    assert proc.returncode == 3, proc.stderr      # not sound: told apart from a failure (1)
    found = re.search(r"differs from the image in blocks? (\d+)(?:-(\d+))?", error_of(proc))
    assert found, error_of(proc)
    first, last = int(found.group(1)), int(found.group(2) or found.group(1))
    assert first * 4096 <= offset < (last + 1) * 4096
    proc = flash(f"{image}.xz", device, "--verify-only", "--no-bmap")
    assert proc.returncode == 3
    assert f"bytes {ROOT_OFFSET}-{ROOT_OFFSET + 4 * MIB - 1}" in error_of(proc)
    # The same card, rewritten: whole again.
    assert flash(f"{image}.zst", device, "--yes", "--force").returncode == 0
    assert flash(image, device, "--verify-only", "--no-bmap").returncode == 0


# Per-card settings.


def test_each_card_gets_its_own_preseed(tmp_path: Path, cards: Cards) -> None:
    login_hash = hash_login_password("image password")
    image = make_image(tmp_path, "preseeded", files={
        "boot/jupyter-firstboot.conf": (f"login_password_hash = {login_hash}\n"
                                        f"hostname = from-the-image\nssh_key = {KEY_A}\n"
                                        f"timezone = Europe/Berlin\n").encode()})
    own = tmp_path / "own.conf"
    own.write_text("jupyter_password = 'a long jupyter password'\nhostname = overridden\n")
    keys = tmp_path / "id_ed25519.pub"
    keys.write_text(f"{KEY_B}\n")
    hostnames = []
    for n in (1, 2):
        device, _ = cards.new()
        proc = flash(f"{image}.zst", device, "--yes", "--force", "--hostname", f"lab-pi-0{n}",
                     "--preseed", own, "--ssh-key", keys, "--wifi", "Lab WLAN #2",
                     stdin="correct horse battery\n")
        assert proc.returncode == 0, proc.stderr
        assert "are in /boot/jupyter-firstboot.conf, readable by root only" in proc.stderr
        text, info = preseed_on(device)
        assert re.search(r"Mode:\s+0600", info) and re.search(r"User:\s+0\s+Group:\s+0", info)
        answers, problems = parse_preseed(text, Path("/"), Settings())
        assert problems == []
        assert answers.login_hash == login_hash            # the image's, kept
        assert answers.timezone == "Europe/Berlin"
        assert answers.jupyter_password == "a long jupyter password"
        assert answers.ssh_keys == [KEY_A, KEY_B]
        assert (answers.wifi_ssid, answers.wifi_key) == ("Lab WLAN #2", "correct horse battery")
        assert "correct horse" not in proc.stderr + proc.stdout
        hostnames.append(answers.hostname)
    assert hostnames == ["lab-pi-01", "lab-pi-02"]
    assert setup_partition.find_setup_drive(image) is None, "an image without the drive"


IMAGE_PRESEED = "hostname = from-the-image\nssh_key = {key}\ntimezone = Europe/Berlin\n" \
                "login_password_hash = {hash}\n"


@pytest.fixture(scope="module")
def drive_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An image with a setup drive and a preseed of its own; and that preseed."""
    preseed = IMAGE_PRESEED.format(key=KEY_A, hash=hash_login_password("image password"))
    image = make_image(tmp_path_factory.mktemp("drive"), "drive", setup_drive=True,
                       files={"boot/jupyter-firstboot.conf": preseed.encode()})
    return image, preseed


def test_the_setup_drive_gets_this_cards_settings_and_the_card_takes_them(
        drive_image: tuple[Path, str], tmp_path: Path, cards: Cards) -> None:
    """With a setup drive, this card's lines go into its file after the template's comments,
    as if someone had filled it in on Windows; /boot keeps the image's preseed as it was. The
    card's own first-boot step, on a copy of the flashed card, then merges them over the
    image's: the card's lines win (the hostname), the image's others stay, SSH keys add up."""
    image, image_preseed = drive_image
    own = tmp_path / "own.conf"
    own.write_text("jupyter_password = 'a long jupyter password'\nhostname = overridden\n")
    keys = tmp_path / "id_ed25519.pub"
    keys.write_text(f"{KEY_B}\n")
    device, backing = cards.new(40)
    proc = flash(f"{image}.zst", device, "--yes", "--force", "--hostname", "lab-pi-05",
                 "--preseed", own, "--ssh-key", keys, "--wifi", "Lab WLAN #2",
                 stdin="correct horse battery\n")
    assert proc.returncode == 0, proc.stderr
    assert ("are in jupyter-firstboot.conf on the card's setup drive (JUPYTER-CFG), read and "
            "wiped at its first boot; until then they are plain text there, which anyone "
            "holding the card can read") in proc.stderr, proc.stderr
    assert "correct horse" not in proc.stderr + proc.stdout
    assert preseed_on(device)[0] == image_preseed
    drive = setup_partition.find_setup_drive(backing)
    assert drive == (24 * MIB, setup_partition.SIZE)
    data = setup_partition.read_setup_file(backing, drive[0])
    assert data is not None
    assert data.startswith(template_files()["jupyter-firstboot.conf"] + b"\r\n# flash-image ")
    assert data.count(b"\n") == data.count(b"\r\n") and data.endswith(b"\r\n")
    assert not data.startswith(b"\xef\xbb\xbf")
    answers, problems = parse_preseed(data, Path("/"), Settings())
    assert problems == []
    assert (answers.hostname, answers.jupyter_password, answers.ssh_keys, answers.wifi_ssid,
            answers.wifi_key) == ("lab-pi-05", "a long jupyter password", [KEY_B],
                                  "Lab WLAN #2", "correct horse battery")
    assert (answers.login_hash, answers.timezone) == (None, None), "the image's stay in /boot"
    # The first boot: the card's root as a directory holding the image's preseed, its disk a
    # copy of the card.
    card = tmp_path / "booted.img"
    shutil.copyfile(backing, card)
    root = tmp_path / "root"
    (root / "boot").mkdir(parents=True)
    (root / PRESEED).write_text(image_preseed)
    said: list[str] = []
    assert boot_step(System(root, Settings(), sys.executable), said.append, card, 1) == 0
    assert any("taken into /boot/jupyter-firstboot.conf" in line for line in said), said
    answers, problems = parse_preseed((root / PRESEED).read_bytes(), Path("/"), Settings())
    assert problems == []
    assert (answers.hostname, answers.jupyter_password, answers.ssh_keys, answers.wifi_ssid,
            answers.wifi_key) == ("lab-pi-05", "a long jupyter password", [KEY_A, KEY_B],
                                  "Lab WLAN #2", "correct horse battery")
    assert answers.login_hash and answers.login_hash in image_preseed
    assert answers.timezone == "Europe/Berlin"
    assert setup_partition.find_setup_drive(card) is None
    with open(card, "rb") as f:
        f.seek(drive[0])
        assert f.read(drive[1]) == bytes(drive[1]), "no password outlives the drive"


def test_the_setup_file_is_read_and_replaced_at_the_partitions_offset(
        drive_image: tuple[Path, str], image: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    shutil.copyfile(drive_image[0], disk)
    assert setup_partition.find_setup_drive(image) is None
    start, _ = setup_partition.find_setup_drive(disk) or (0, 0)
    assert start == 24 * MIB
    assert setup_partition.read_setup_file(disk, start) == \
        template_files()["jupyter-firstboot.conf"]
    setup_partition.write_setup_file(disk, start, b"hostname = lab-pi-06\r\n")
    assert setup_partition.read_setup_file(disk, start) == b"hostname = lab-pi-06\r\n"
    # Saved under an upper-case name (FAT does not tell them apart), then deleted.
    mtools = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    saved = tmp_path / "saved"
    saved.write_bytes(b"hostname = lab-pi-07\r\n")
    for argv in (["mdel", "-i", f"{disk}@@{start}", "::/jupyter-firstboot.conf"],
                 ["mcopy", "-i", f"{disk}@@{start}", str(saved), "::/JUPYTER-FIRSTBOOT.CONF"]):
        subprocess.run(argv, check=True, capture_output=True, env=mtools)
    assert setup_partition.read_setup_file(disk, start) == b"hostname = lab-pi-07\r\n"
    subprocess.run(["mdel", "-i", f"{disk}@@{start}", "::/JUPYTER-FIRSTBOOT.CONF"],
                   check=True, capture_output=True, env=mtools)
    assert setup_partition.read_setup_file(disk, start) is None
    with open(disk, "r+b") as f:
        f.seek(start)
        f.write(bytes(4096))                    # its boot sector gone: not FAT any more
    with pytest.raises(BuildError, match=r"setup partition of .*disk\.img \(at byte 25165824\) "
                                         r"cannot be read as FAT"):
        setup_partition.read_setup_file(disk, start)


def test_with_a_setup_drive_the_card_is_checked_as_its_first_boot_assembles_it(
        drive_image: tuple[Path, str], tmp_path: Path, cards: Cards) -> None:
    """flash-image puts this card's lines over the image's preseed by the card's own rule
    (setup_drive.assemble), read back from the very file it is about to write: the hostname
    it speaks of is the image's when the card gives none, and a result the wizard would
    refuse is said before the drive is written."""
    image, _ = drive_image
    cert, key = own_pair(tmp_path, "lab")
    keys = tmp_path / "id_ed25519.pub"
    keys.write_text(f"{KEY_B}\n")
    device, _ = cards.new(40)
    proc = flash(f"{image}.zst", device, "--yes", "--force", "--ssh-key", keys,
                 "--tls-cert", cert, "--tls-key", key)
    assert proc.returncode == 0, proc.stderr
    assert ("not from-the-image.local or from-the-image (the image's hostname)"
            in proc.stderr), proc.stderr
    refused = make_image(tmp_path, "refused", setup_drive=True,
                         files={"boot/jupyter-firstboot.conf": b"colour = blue\n"})
    device, backing = cards.new(40)
    proc = flash(f"{refused}.zst", device, "--yes", "--force", "--ssh-key", keys)
    assert proc.returncode != 0
    assert "the preseed for the card does not check out (line 1: 'colour': unknown key" in \
        error_of(proc)
    # The card is left unable to boot (its table is gone); the drive is still at 24 MiB.
    assert setup_partition.read_setup_file(backing, 24 * MIB) == \
        template_files()["jupyter-firstboot.conf"], "the drive as the image has it"


def test_a_separate_boot_partition_gets_the_preseed(tmp_path: Path, cards: Cards) -> None:
    image = make_image(tmp_path, "two", boot_partition=True,
                       files={"etc/fstab": b"LABEL=armbi_root / ext4 defaults 0 1\n"
                                           b"LABEL=armbi_boot /boot ext4 defaults 0 2\n"})
    device, _ = cards.new()
    proc = flash(f"{image}.zst", device, "--yes", "--force", "--hostname", "lab-pi-09")
    assert proc.returncode == 0, proc.stderr
    text, _ = preseed_on(device, ROOT_OFFSET, "/jupyter-firstboot.conf")
    assert "hostname = lab-pi-09" in text
    hidden, _ = preseed_on(device, 8 * MIB)
    assert hidden == ""


# The user's own TLS certificate.


def own_pair(directory: Path, name: str, hostname: str = "lab-pi-07", *,
             now: datetime | None = None) -> tuple[Path, Path]:
    """NAME.crt and NAME.key, made as the card makes its own (for 192.168.1.7 too)."""
    cert, key = tls.make(hostname, ["192.168.1.7"], now or datetime.now(UTC))
    (directory / f"{name}.crt").write_bytes(cert)
    (directory / f"{name}.key").write_bytes(key)
    return directory / f"{name}.crt", directory / f"{name}.key"


def secret_of(key: Path) -> str:
    """A line of the key's base64: it must never be shown."""
    return key.read_text().splitlines()[1]


def test_a_certificate_of_ones_own_goes_beside_the_preseed(tmp_path: Path,
                                                           cards: Cards) -> None:
    image = make_image(tmp_path, "own-tls", files={
        "boot/jupyter-firstboot.conf": b"timezone = Europe/Berlin\n"})
    cert, key = own_pair(tmp_path, "lab")
    keys = tmp_path / "id_ed25519.pub"
    keys.write_text(f"{KEY_B}\n")
    device, _ = cards.new()
    proc = flash(f"{image}.zst", device, "--yes", "--force", "--hostname", "lab-pi-07",
                 "--ssh-key", keys, "--tls-cert", cert, "--tls-key", key)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr, proc.stderr
    text, info = preseed_on(device, path="/boot/jupyter-tls.crt")
    assert text == cert.read_text()
    assert re.search(r"Mode:\s+0644", info) and re.search(r"User:\s+0\s+Group:\s+0", info)
    text, info = preseed_on(device, path="/boot/jupyter-tls.key")
    assert text == key.read_text()
    assert re.search(r"Mode:\s+0600", info) and re.search(r"User:\s+0\s+Group:\s+0", info)
    # The preseed beside them, with the image's lines and this card's.
    text, _ = preseed_on(device)
    answers, problems = parse_preseed(text, Path("/"), Settings())
    assert problems == []
    assert (answers.hostname, answers.timezone, answers.ssh_keys) == \
        ("lab-pi-07", "Europe/Berlin", [KEY_B])
    fingerprint = tls.pem_fingerprint(cert.read_bytes())
    assert re.search(r"lab\.crt is in /boot/jupyter-tls\.crt and its key in "
                     r"/boot/jupyter-tls\.key \(readable by root only\).*SHA-256 fingerprint "
                     + fingerprint, proc.stderr), proc.stderr
    assert secret_of(key) not in proc.stderr + proc.stdout
    # A card whose hostname the certificate does not name is warned about before it is
    # written, and still gets it.
    device, _ = cards.new()
    proc = flash(f"{image}.zst", device, "--yes", "--force", "--hostname", "lab-pi-08",
                 "--tls-cert", cert, "--tls-key", key)
    assert proc.returncode == 0, proc.stderr
    warning = (f"warning: --tls-cert {cert} names lab-pi-07.local, lab-pi-07, 192.168.1.7, "
               f"not lab-pi-08.local or lab-pi-08 (this card's hostname)")
    assert warning in proc.stderr, proc.stderr
    assert proc.stderr.index(warning) < proc.stderr.index("\nwrote ")
    assert preseed_on(device, path="/boot/jupyter-tls.key")[0] == key.read_text()
    assert "hostname = lab-pi-08" in preseed_on(device)[0]


def test_a_certificate_alone_goes_onto_a_separate_boot_partition(tmp_path: Path,
                                                                 cards: Cards) -> None:
    """No other per-card setting: the pair alone, and no preseed made for it. The image's
    hostname is known only once it is on the card; the warning about it comes then."""
    image = make_image(tmp_path, "two", boot_partition=True,
                       files={"etc/fstab": b"LABEL=armbi_root / ext4 defaults 0 1\n"
                                           b"LABEL=armbi_boot /boot ext4 defaults 0 2\n"})
    ends_soon = datetime.now(UTC) + timedelta(days=11 - tls.VALIDITY_DAYS)
    cert, key = own_pair(tmp_path, "company", "jupyter.example.org", now=ends_soon)
    device, _ = cards.new()
    proc = flash(f"{image}.zst", device, "--yes", "--force", "--tls-cert", cert,
                 "--tls-key", key)
    assert proc.returncode == 0, proc.stderr
    text, _ = preseed_on(device, ROOT_OFFSET, "/jupyter-tls.crt")
    assert text == cert.read_text()
    text, info = preseed_on(device, ROOT_OFFSET, "/jupyter-tls.key")
    assert text == key.read_text() and re.search(r"Mode:\s+0600", info)
    assert preseed_on(device, ROOT_OFFSET, "/jupyter-firstboot.conf")[0] == ""
    assert preseed_on(device, 8 * MIB, "/boot/jupyter-tls.key")[0] == ""
    assert "this card's settings" not in proc.stderr
    assert ("names jupyter.example.org.local, jupyter.example.org, 192.168.1.7, not "
            "orangepi.local or orangepi (the image's hostname)") in proc.stderr
    assert proc.stderr.index("the image's hostname") > proc.stderr.index("\nwrote ")
    assert re.search(rf"--tls-cert {cert} expires on \d{{4}}-\d\d-\d\d \(in (9|10) days\)",
                     proc.stderr), proc.stderr


def test_an_image_that_serves_plain_http_gets_no_key(tmp_path: Path, cards: Cards) -> None:
    """Known only once the image is on the card: the card is left unable to boot, rather
    than serving plain HTTP with the user's key lying in /boot for good."""
    cert, key = own_pair(tmp_path, "lab")
    for n, (release, said) in enumerate(((b"BOARD=orangepipc\nJUPYTER_TLS=no\n",
                                         "has JUPYTER_TLS=no"),
                                        (b"BOARD=orangepipc\n", "has no JUPYTER_TLS line"))):
        image = make_image(tmp_path, f"http{n}",
                           files={"etc/orangepi-jupyter-release": release})
        device, backing = cards.new()
        proc = flash(f"{image}.zst", device, "--yes", "--force", "--tls-cert", cert,
                     "--tls-key", key)
        assert proc.returncode == 1, proc.stderr
        error = error_of(proc)
        assert f"serves Jupyter over plain HTTP (/etc/orangepi-jupyter-release {said}" in error
        assert error.endswith("without a partition table (it will not boot): flash it again")
        assert head_of(backing) == bytes(MIB)
        assert preseed_on(device, path="/boot/jupyter-tls.key")[0] == ""
        assert preseed_on(device, path="/etc/os-release")[0] == "ID=debian\n"   # read at all


def test_bad_certificates_and_keys_are_refused_before_the_card_is_touched(
        image: Path, tmp_path: Path, cards: Cards) -> None:
    from cryptography.hazmat.primitives import serialization

    device, backing = cards.new(fill=b"old card")
    before = backing.read_bytes()
    now = datetime.now(UTC)
    cert, key = own_pair(tmp_path, "good")
    _, other_key = own_pair(tmp_path, "other")
    expired, expired_key = own_pair(tmp_path, "expired", now=now - timedelta(days=900))
    early, early_key = own_pair(tmp_path, "early", now=now + timedelta(days=10))
    der = tmp_path / "good.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(cert.read_text()))
    locked = tmp_path / "locked.key"
    locked.write_bytes(serialization.load_pem_private_key(key.read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"a passphrase")))
    both = tmp_path / "both.pem"
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    missing = tmp_path / "missing.crt"
    flashing = (f"{image}.zst", device, "--yes", "--force")
    cases = [
        ((*flashing, "--tls-cert", cert, "--tls-key", other_key),
         f"--tls-key {other_key}: the key is not the certificate's (they do not match); pass "
         f"the key the certificate was made for"),
        ((*flashing, "--tls-cert", expired, "--tls-key", expired_key),
         f"--tls-cert {expired}: the certificate expired on "
         f"{(now - timedelta(days=901 - tls.VALIDITY_DAYS)):%Y-%m-%d}; pass a renewed"),
        ((*flashing, "--tls-cert", early, "--tls-key", early_key),
         f"--tls-cert {early}: the certificate is not valid before "
         f"{(now + timedelta(days=9)):%Y-%m-%d}"),
        ((*flashing, "--tls-cert", der, "--tls-key", key),
         f"--tls-cert {der}: it is not a PEM certificate (-----BEGIN CERTIFICATE-----); "
         f"pass the certificate as PEM"),
        ((*flashing, "--tls-cert", cert, "--tls-key", der),
         f"--tls-key {der}: it is not a PEM private key"),
        ((*flashing, "--tls-cert", cert, "--tls-key", locked),
         f"--tls-key {locked}: the key has a passphrase"),
        ((*flashing, "--tls-cert", cert), f"--tls-cert {cert} needs --tls-key"),
        ((*flashing, "--tls-key", key), f"--tls-key {key} needs --tls-cert"),
        ((*flashing, "--tls-cert", key, "--tls-key", cert),
         f"--tls-cert {key} holds a private key, not a certificate: swap --tls-cert and "
         f"--tls-key"),
        ((*flashing, "--tls-cert", both, "--tls-key", key),
         f"--tls-cert {both} holds a private key as well"),
        ((*flashing, "--tls-cert", missing, "--tls-key", key),
         f"--tls-cert {missing}: cannot be read (No such file or directory)"),
        ((*flashing, "--tls-cert", cert, "--tls-key", "/dev/zero"),
         "--tls-key /dev/zero: larger than 1 MiB"),
        ((f"{image}.zst", device, "--verify-only", "--tls-cert", cert, "--tls-key", key),
         "--verify-only writes nothing: drop --tls-cert, --tls-key"),
    ]
    for args, message in cases:
        proc = flash(*args)
        assert proc.returncode == 2, (args, proc.stderr)        # what the flags name: usage
        assert message in error_of(proc), (args, proc.stderr)
        assert secret_of(key) not in proc.stderr + proc.stdout
        assert backing.read_bytes() == before, args


def test_the_confirmation_shows_the_certificates_fingerprint(image: Path, tmp_path: Path,
                                                             cards: Cards) -> None:
    cert, key = own_pair(tmp_path, "lab")
    device, backing = cards.new()
    child = pexpect.spawn(FLASH_IMAGE[0], [*FLASH_IMAGE[1:], f"{image}.zst", str(device),
                                           "--force", "--tls-cert", str(cert),
                                           "--tls-key", str(key)], encoding="utf-8", timeout=30)
    child.expect("About to write card.img.zst")
    child.expect(re.escape("this card gets your certificate lab.crt (lab-pi-07.local, "
                           "lab-pi-07, 192.168.1.7; valid until "))
    child.expect(re.escape(f"SHA-256 fingerprint: {tls.pem_fingerprint(cert.read_bytes())}"))
    child.expect("Type yes to go on: ")
    child.sendline("no")
    child.expect("not confirmed")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert backing.read_bytes() == bytes(32 * MIB)


# Refusals: one line, exit 1, and the card as it was.


def test_bad_input_is_refused_before_the_card_is_touched(image: Path, tmp_path: Path,
                                                         cards: Cards) -> None:
    device, backing = cards.new(fill=b"old card")
    before = backing.read_bytes()
    private = tmp_path / "id_ed25519"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEA\n")
    other = make_image(tmp_path, "other", size_mib=20)
    damaged = tmp_path / "damaged.bmap"
    damaged.write_text(Path(f"{image}.bmap").read_text().replace("<BlockSize> 4096",
                                                                 "<BlockSize> 4097"))
    corrupt = tmp_path / "corrupt.img.zst"
    data = bytearray(Path(f"{image}.zst").read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(data)
    shutil.copy(f"{image}.zst.sha256", f"{corrupt}.sha256")
    Path(f"{corrupt}.sha256").write_text(Path(f"{image}.zst.sha256").read_text()
                                         .replace(f"{image.name}.zst", corrupt.name))
    cases = [
        ((image, "/dev/no-such-card"), "no such device"),
        ((tmp_path / "missing.img.zst", device), "no such image file"),
        ((f"{image}.bmap", device), "not an .img, .img.xz, .img.gz or .img.zst file"),
        ((f"{image}.zst", backing, "--yes"), "is a regular file, not a card: pass --force"),
        ((f"{image}.zst", device, "--yes"), "is not a removable, USB or MMC disk (loop)"),
        ((f"{image}.zst", device, "--force"), "no terminal to confirm on: pass --yes"),
        ((f"{image}.zst", device, "--yes", "--force", "--hostname", "not_a_hostname!"),
         "--hostname 'not_a_hostname!'"),
        ((f"{image}.zst", device, "--yes", "--force", "--ssh-key", private),
         "is a private key"),
        ((f"{image}.zst", device, "--verify-only", "--hostname", "x"), "writes nothing"),
        ((f"{image}.xz", device, "--yes", "--force", "--bmap", f"{other}.bmap"),
         "belongs to another image"),
        ((f"{image}.zst", device, "--yes", "--force", "--bmap", damaged), "is damaged"),
        ((corrupt, device, "--yes", "--force"), "does not match corrupt.img.zst.sha256"),
    ]
    usage = ("--hostname", "is a private key", "writes nothing", "no terminal to confirm on",
             "no such image file", "not an .img", "is damaged", "no such device")
    for args, message in cases:
        proc = flash(*args)
        # A flag's value, or flags that do not go together: a usage error, as argparse's own.
        code = 2 if any(word in message for word in usage) else 1
        assert proc.returncode == code, (args, proc.stderr)
        assert message in error_of(proc), (args, proc.stderr)
        assert backing.read_bytes() == before, args


def test_a_card_too_small_and_a_partition_are_refused(image: Path, cards: Cards) -> None:
    small, _ = cards.new(16)
    proc = flash(f"{image}.zst", small, "--yes", "--force")
    assert proc.returncode == 1
    assert "holds 16.0 MiB" in error_of(proc) and "use a larger card" in error_of(proc)
    device, _ = cards.new(partscan=True)
    assert flash(f"{image}.zst", device, "--yes", "--force").returncode == 0
    partition = partitions_of(device)
    proc = flash(f"{image}.zst", partition, "--yes", "--force")
    assert proc.returncode == 1
    assert f"is partition 1 of {device}: give the whole card, {device}" in error_of(proc)


def test_a_card_in_use_is_refused_even_with_force(image: Path, tmp_path: Path,
                                                  cards: Cards) -> None:
    device, _ = cards.new(partscan=True)
    assert flash(f"{image}.zst", device, "--yes", "--force").returncode == 0
    partition = str(partitions_of(device))
    mountpoint = tmp_path / "media"
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", "ro", partition, mountpoint], check=True)
    try:
        proc = flash(f"{image}.zst", device, "--yes", "--force")
        assert proc.returncode == 1
        assert f"is mounted ({partition} on {mountpoint}): unmount it first" in error_of(proc)
        # The same card as the running system's /boot, in a mount namespace of its own.
        script = f"mount -o ro {partition} /boot && exec {' '.join(FLASH_IMAGE)} " \
                 f"{image}.zst {device} --yes --force"
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               script], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert "holds the running system (/boot is" in error_of(proc)
    finally:
        subprocess.run(["umount", mountpoint], check=True)
    swap, _ = cards.new()
    subprocess.run(["mkswap", "-q", str(swap)], check=True)
    subprocess.run(["swapon", str(swap)], check=True)
    try:
        proc = flash(f"{image}.zst", swap, "--yes", "--force")
        assert proc.returncode == 1
        assert f"holds swap in use ({swap})" in error_of(proc)
    finally:
        subprocess.run(["swapoff", str(swap)], check=True)


def test_confirmation_shows_the_card_and_no_writes_nothing(image: Path, cards: Cards) -> None:
    device, backing = cards.new(partscan=True)
    assert flash(f"{image}.zst", device, "--yes", "--force", "--no-verify").returncode == 0
    partitions_of(device)
    before = backing.read_bytes()
    child = pexpect.spawn(FLASH_IMAGE[0], [*FLASH_IMAGE[1:], f"{image}.zst", str(device),
                                           "--force"], encoding="utf-8", timeout=30)
    child.expect("About to write card.img.zst")
    child.expect(f"{device}p1 .*ext4 \"armbi_root\"")
    child.expect("Type yes to go on: ")
    child.sendline("no")
    child.expect("not confirmed")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert backing.read_bytes() == before


# Interruptions: the card never looks like a finished image.


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512 MiB raw image (mostly sparse): writing all of it takes a while."""
    image = make_image(tmp_path_factory.mktemp("big"), "big")
    with open(image, "r+b") as f:
        f.truncate(512 * MIB)
    return image


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_write_leaves_a_card_that_cannot_boot(big_image: Path, image: Path,
                                                             cards: Cards,
                                                             how: signal.Signals) -> None:
    device, backing = cards.new(512)
    assert flash(f"{image}.zst", device, "--yes", "--force", "--no-verify").returncode == 0
    assert head_of(backing)[510:512] == b"\x55\xaa"           # a card with a system on it
    proc = subprocess.Popen([*FLASH_IMAGE, str(big_image), str(device), "--yes", "--force",
                             "--no-bmap"], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    while line and not line.startswith("writing"):
        line = proc.stderr.readline()
    assert line.startswith("writing"), line
    proc.send_signal(how)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == (130 if how == signal.SIGINT else -signal.SIGKILL)
    if how == signal.SIGINT:
        assert "without a partition table (it will not boot)" in rest
        assert "interrupted by SIGINT" in rest
    assert head_of(backing) == bytes(MIB)
    assert subprocess.run(["sfdisk", "--dump", str(backing)], capture_output=True).returncode != 0


def damaged_copy(source: Path, directory: Path, damage: str, *, sums: bool) -> Path:
    """A copy of `source` truncated, with a flipped byte in the middle, or empty; with `sums`,
    beside it the .sha256 of the undamaged file (a download that went wrong)."""
    data = bytearray(source.read_bytes())
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    elif damage == "corrupt":
        for at in range(len(data) // 3, len(data) * 2 // 3, 4096):
            data[at] ^= 0xFF
    else:
        data = bytearray()
    suffix = "".join(source.suffixes[-2:])
    copy = directory / f"{damage}-{'sums' if sums else 'bare'}{suffix}"
    copy.write_bytes(data)
    if sums:
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        Path(f"{copy}.sha256").write_text(f"{digest}  {copy.name}\n")
    return copy


@pytest.mark.parametrize("sums", [True, False], ids=["with-sha256", "without-sha256"])
@pytest.mark.parametrize("damage", ["truncated", "corrupt", "empty"])
@pytest.mark.parametrize("suffix", [".xz", ".zst", ".gz"])
def test_a_damaged_image_leaves_the_card_as_it_was(image: Path, tmp_path: Path, cards: Cards,
                                                   suffix: str, damage: str,
                                                   sums: bool) -> None:
    """Every refusal comes before the card is opened: with a .sha256 the digest finds the
    damage; without one the file is decompressed whole first, with or without a bmap (whose
    size would otherwise let the write start)."""
    source = Path(f"{image}{suffix}")
    if not source.exists():
        subprocess.run(["gzip", "-k", "-f", "-1", str(image)], check=True)
    damaged = damaged_copy(source, tmp_path, damage, sums=sums)
    device, backing = cards.new(fill=b"old card")
    before = backing.read_bytes()
    for bmap in (["--bmap", f"{image}.bmap"], ["--no-bmap"]):
        proc = flash(damaged, device, "--yes", "--force", *bmap)
        assert proc.returncode == 1, (bmap, proc.stderr)
        error = error_of(proc)
        if damage == "empty":
            assert f"{damaged.name} is empty: download or build it again" in error, error
        elif suffix == ".xz" and damage == "truncated":      # its index is gone: found first
            assert "not a complete .xz file" in error, error
        elif sums:
            assert f"does not match {damaged.name}.sha256" in error, error
        else:
            assert re.search(r"the file is corrupt or truncated|it is truncated", error), error
        assert backing.read_bytes() == before, (bmap, proc.stderr)


def test_a_corrupt_write_still_leaves_an_unbootable_card(image: Path, tmp_path: Path,
                                                         cards: Cards) -> None:
    """A file its .sha256 vouches for is not decompressed twice: should it still be damaged
    (a .sha256 made from the damaged file), the decompressor finds it halfway through the
    write, and the card is left without its first MiB."""
    device, backing = cards.new()
    assert flash(f"{image}.zst", device, "--yes", "--force", "--no-verify").returncode == 0
    corrupt = damaged_copy(Path(f"{image}.zst"), tmp_path, "truncated", sums=False)
    digest = hashlib.sha256(corrupt.read_bytes()).hexdigest()
    Path(f"{corrupt}.sha256").write_text(f"{digest}  {corrupt.name}\n")
    proc = flash(corrupt, device, "--yes", "--force", "--bmap", f"{image}.bmap")
    assert proc.returncode == 1
    assert "corrupt or truncated" in error_of(proc)
    assert "without a partition table (it will not boot): flash it again" in error_of(proc)
    assert head_of(backing) == bytes(MIB)


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "flash-image"
    assert script.exists()
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--verify-only" in proc.stdout
    assert "--tls-cert FILE" in proc.stdout and "--tls-key FILE" in proc.stdout


def test_the_disk_of_the_running_system_is_refused() -> None:
    """Checked in-process, with the function that decides (it writes nothing), against the
    disk this machine's / is on: a refusal test that cannot harm the machine if it fails."""
    source = next((line.split(" - ")[1].split()[1]
                   for line in Path("/proc/self/mountinfo").read_text().splitlines()
                   if line.split()[4] == "/"), "")
    if not source.startswith("/dev/") or not Path(source).is_block_device():
        pytest.skip(f"/ is not on a block device here ({source or 'unknown'})")
    sysfs = Path(f"/sys/class/block/{Path(source).resolve().name}")
    disk = Path("/dev") / (sysfs.resolve().parent.name if (sysfs / "partition").exists()
                           else sysfs.name)
    with pytest.raises(BuildError, match=r"holds the running system \(/ is"):
        inspect_target(disk, force=True, writing=True)


def test_an_image_of_odd_size_is_written_whole(tmp_path: Path, cards: Cards) -> None:
    image = make_image(tmp_path, "odd", tail=1000)
    raw = image.read_bytes()
    assert len(raw) % 4096 == 1000
    for source, extra in ((image, ["--no-bmap"]), (f"{image}.zst", []),
                          (f"{image}.zst", ["--no-bmap"])):
        device, backing = cards.new()
        proc = flash(source, device, "--yes", "--force", *extra)
        assert proc.returncode == 0, proc.stderr
        assert backing.read_bytes()[: len(raw)] == raw, (source, extra)


def test_a_card_too_small_for_a_zst_without_bmap_is_refused_untouched(image: Path,
                                                                      cards: Cards) -> None:
    """A .zst made from a pipe does not say its size: it is measured first."""
    small, backing = cards.new(16, fill=b"old card")
    proc = flash(f"{image}.zst", small, "--yes", "--force", "--no-bmap")
    assert proc.returncode == 1
    assert "holds 16.0 MiB" in error_of(proc)
    assert backing.read_bytes() == b"old card" * (16 * MIB // 8)


def test_a_bad_wifi_key_is_refused_without_showing_it(image: Path, cards: Cards) -> None:
    device, backing = cards.new()
    proc = flash(f"{image}.zst", device, "--yes", "--force", "--wifi", "Lab", stdin="short7\r\n")
    assert proc.returncode == 2          # what was asked for cannot be: usage
    assert "the key of Wi-Fi network 'Lab': must be 8-63" in error_of(proc)
    assert "short7" not in proc.stderr + proc.stdout
    assert backing.read_bytes() == bytes(32 * MIB)


def bmap_version_1_3(image: Path, target: Path) -> Path:
    """The same map in bmaptool's format 1.3: SHA-1 under the names it had then."""
    import hashlib
    import xml.etree.ElementTree as ET

    root = ET.parse(f"{image}.bmap").getroot()
    raw = image.read_bytes()
    lines = ['<?xml version="1.0" ?>', '<bmap version="1.3">',
             f"<ImageSize> {len(raw)} </ImageSize>", "<BlockSize> 4096 </BlockSize>",
             f"<BlocksCount> {root.findtext('BlocksCount').strip()} </BlocksCount>",
             f"<MappedBlocksCount> {root.findtext('MappedBlocksCount').strip()} "
             f"</MappedBlocksCount>", f"<BmapFileSHA1> {'0' * 40} </BmapFileSHA1>",
             "<BlockMap>"]
    for element in root.iterfind("BlockMap/Range"):
        first, _, last = element.text.strip().partition("-")
        data = raw[int(first) * 4096:(int(last or first) + 1) * 4096]
        lines.append(f'<Range sha1="{hashlib.sha1(data).hexdigest()}"> '
                     f"{element.text.strip()} </Range>")
    text = "\n".join([*lines, "</BlockMap>", "</bmap>", ""])
    own = hashlib.sha1(text.encode()).hexdigest()
    target.write_text(text.replace("0" * 40, own, 1))
    return target


def test_a_version_1_3_bmap_is_read_with_its_sha1(image: Path, tmp_path: Path,
                                                  cards: Cards) -> None:
    old = bmap_version_1_3(image, tmp_path / "old.bmap")
    device, backing = cards.new()
    proc = flash(f"{image}.zst", device, "--yes", "--force", "--bmap", old)
    assert proc.returncode == 0, proc.stderr
    assert backing.read_bytes()[:24 * MIB] == image.read_bytes()
    with open(backing, "r+b") as f:
        f.seek(ROOT_OFFSET + 10)
        f.write(b"\xff\xfe")
    assert flash(f"{image}.zst", device, "--verify-only", "--bmap", old).returncode == 3


def test_an_image_that_is_not_its_bmaps_is_found_before_the_card_can_boot(
        image: Path, tmp_path: Path, cards: Cards) -> None:
    """A range whose checksum the image does not have is found while streaming, and named as
    the image's fault, before the first MiB makes the card bootable."""
    import hashlib

    text = Path(f"{image}.bmap").read_text()
    ranges = re.findall(r'chksum="([0-9a-f]{64})"', text)
    text = text.replace(ranges[-1], "0" * 64)
    own = re.search(r"<BmapFileChecksum> ([0-9a-f]{64})", text).group(1)
    text = text.replace(own, hashlib.sha256(text.replace(own, "0" * 64).encode()).hexdigest())
    wrong = tmp_path / "wrong.bmap"
    wrong.write_text(text)
    device, backing = cards.new()
    assert flash(f"{image}.zst", device, "--yes", "--force", "--no-verify").returncode == 0
    proc = flash(f"{image}.zst", device, "--yes", "--force", "--bmap", wrong)
    assert proc.returncode == 1
    assert "card.img.zst does not match wrong.bmap in block" in error_of(proc)
    assert "without a partition table" in error_of(proc)
    assert head_of(backing) == bytes(MIB)


def test_a_card_that_fails_verification_is_left_unable_to_boot(image: Path,
                                                               cards: Cards) -> None:
    """Between the write and the read-back (in-process, with flash-image's own steps), the
    medium loses a byte: the mismatch is reported, and the card's first MiB is zeroed again."""
    device, backing = cards.new()
    args = parser().parse_args([f"{image}.zst", str(device), "--force", "--yes"])
    request = check_request(args)
    target = inspect_target(device, force=True, writing=True)
    with opened(target, write=True) as card:
        written = write_card(request, card)
        assert head_of(backing) == image.read_bytes()[:MIB]
        with open(backing, "r+b") as f:
            f.seek(ROOT_OFFSET + 2 * MIB)
            f.write(b"\x00\xff")
        with pytest.raises(Mismatch, match="without a partition table"):
            finish_card(request, card, written)
    assert head_of(backing) == bytes(MIB)


def test_a_personalisation_that_fails_after_the_write_leaves_no_bootable_card(
        tmp_path: Path, cards: Cards) -> None:
    image = make_image(tmp_path, "lost", boot_partition=True,
                       files={"etc/fstab": b"LABEL=no-such-label /boot ext4 defaults 0 2\n"})
    device, backing = cards.new()
    proc = flash(f"{image}.zst", device, "--yes", "--force", "--hostname", "lab-pi-03")
    assert proc.returncode == 1
    assert "mounts /boot from LABEL=no-such-label" in error_of(proc)
    assert "without a partition table" in error_of(proc)
    assert head_of(backing) == bytes(MIB)


def test_a_card_changed_after_it_was_checked_is_not_written(image: Path, tmp_path: Path,
                                                            cards: Cards) -> None:
    """Another medium in the same slot (here: the loop device given another file) between
    the checks and the write: same device number, same size, another disk sequence."""
    device, _ = cards.new()
    target = inspect_target(device, force=True, writing=True)
    other = tmp_path / "other-card"
    other.write_bytes(b"another card" * (32 * MIB // 12) + bytes(32 * MIB % 12))
    subprocess.run(["losetup", "--detach", str(device)], check=True)
    subprocess.run(["losetup", str(device), str(other)], check=True)
    with pytest.raises(BuildError, match="not the disk it was when it was checked"), \
            opened(target, write=True):
        pass
    assert other.read_bytes()[:12] == b"another card"


def test_a_regular_file_in_dev_is_never_written() -> None:
    stray = Path("/dev/flash-image-test-stray")
    stray.write_bytes(b"x" * 1024)
    try:
        with pytest.raises(BuildError, match="regular file in /dev"):
            inspect_target(stray, force=True, writing=True)
    finally:
        stray.unlink()


def test_a_read_only_card_and_an_empty_reader_are_refused(image: Path, tmp_path: Path) -> None:
    """A card whose lock switch is on (a read-only loop device) and a reader with no card in
    it (a loop device with no file: size 0)."""
    backing = tmp_path / "locked"
    backing.write_bytes(bytes(32 * MIB))
    device = subprocess.run(["losetup", "--find", "--show", "--read-only", str(backing)],
                            capture_output=True, text=True, check=True).stdout.strip()
    try:
        proc = flash(f"{image}.zst", device, "--yes", "--force")
        assert proc.returncode == 1
        assert "is read-only (an SD card's lock switch" in error_of(proc)
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)
    empty = subprocess.run(["losetup", "--find"], capture_output=True, text=True,
                           check=True).stdout.strip()
    proc = flash(f"{image}.zst", empty, "--yes", "--force")
    assert proc.returncode == 1
    assert f"{empty} has no medium (an empty card reader?)" in error_of(proc)
    assert backing.read_bytes() == bytes(32 * MIB)
