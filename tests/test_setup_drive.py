"""The setup drive: the FAT partition build-image adds after the root partition
(builder/setup_partition.py), filled in the way people on Windows and macOS fill it in, then
read, taken, wiped and removed by the card's first boot (builder/firstboot/setup_drive.py),
the card's zipapp running against a temporary card and a disk image file (as on the card,
nothing is mounted: sfdisk and mtools at the partition's offset)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from firstboot_card import JUPYTER, LOGIN, Card, finished

from builder import setup_partition
from builder.boards import load_catalog
from builder.config import load_config
from builder.customize import template_context
from builder.firstboot.card import PRESEED
from builder.firstboot.setup_drive import DONE, NOTE

MIB = 1 << 20
MTOOLS = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def template_files() -> dict[str, bytes]:
    board, _ = load_catalog().lookup("orangepipcplus")
    return setup_partition.contents(template_context(load_config(), board))


def make_disk(path: Path, label: str = "dos", files: dict[str, bytes] | None = None) -> Path:
    """A disk as build-image leaves it: a root partition ending the file, then the setup
    partition with `files` (the template by default)."""
    root_end = 40 * MIB
    with open(path, "wb") as f:
        # A GPT keeps its backup in the last 33 sectors, after the root, as shrink leaves it.
        f.truncate(root_end + (33 * 512 if label == "gpt" else 0))
    subprocess.run(["sfdisk", "--quiet", str(path)], check=True,
                   input=f"label: {label}\nstart=2048, size={root_end // 512 - 2048}\n"
                   .encode())
    setup_partition.add_setup_partition(path, files or template_files(), "12345678")
    return path


def drive_offset(disk: Path) -> int:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True,
                                      check=True).stdout)["partitiontable"]
    return int(table["partitions"][-1]["start"]) * 512


def put(disk: Path, name: str, data: bytes, tmp: Path) -> None:
    """Save a file on the drive as an editor would (replacing one of that name)."""
    source = tmp / "upload"
    source.write_bytes(data)
    subprocess.run(["mcopy", "-o", "-i", f"{disk}@@{drive_offset(disk)}", str(source),
                    f"::/{name}"], check=True, env=MTOOLS, capture_output=True)


def partitions(disk: Path) -> list[int]:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True,
                                      check=True).stdout)["partitiontable"]
    return [int(p["node"].rsplit(str(disk), 1)[1]) for p in table["partitions"]]


def take(card: Card, disk: Path) -> str:
    return finished(card.wizard("--setup-drive", "--disk", str(disk), "--root-partition", "1"))


def filled(login: str = LOGIN, jupyter: str = JUPYTER, end: str = "\r\n") -> str:
    """The template as someone fills it in: two lines uncommented, a comment kept."""
    text = template_files()["jupyter-firstboot.conf"].decode().replace("\r\n", "\n")
    text = text.replace("#login_password =", f"login_password = '{login}'")
    text = text.replace("#jupyter_password =", f"jupyter_password = '{jupyter}'")
    text = text.replace("#timezone = UTC", "timezone = Europe/Berlin")
    return text.replace("\n", end)


@pytest.mark.root
@pytest.mark.parametrize("label", ["dos", "gpt"])
@pytest.mark.parametrize("saved", ["notepad-utf8", "notepad-unicode", "notepad-ansi",
                                   "textedit-cr"])
def test_a_filled_in_drive_answers_the_wizard_and_is_gone(card: Card, tmp_path: Path,
                                                          label: str, saved: str) -> None:
    """Saved by Notepad (UTF-8 with a BOM and CRLF, "Unicode" UTF-16, "ANSI" Windows-1252)
    or an old Mac editor (CR line ends), with macOS's ._ sibling beside it: the wizard gets
    the answers, the partition is zeroed and gone, and a later boot does not look again."""
    disk = make_disk(tmp_path / "card.img", label)
    login = "fenêtre-à-ï-2024" if saved == "notepad-ansi" else LOGIN
    text = filled(login, end="\r" if saved == "textedit-cr" else "\r\n")
    data = {"notepad-utf8": b"\xef\xbb\xbf" + text.encode(),
            "notepad-unicode": text.encode("utf-16"),
            "notepad-ansi": text.encode("cp1252"),
            "textedit-cr": text.encode()}[saved]
    put(disk, "jupyter-firstboot.conf", data, tmp_path)
    put(disk, "._jupyter-firstboot.conf", b"\x00\x05\x16\x07Mac OS X", tmp_path)
    start, size = drive_offset(disk), setup_partition.SIZE
    output = take(card, disk)
    assert "jupyter_password, login_password, timezone taken into /boot/jupyter-firstboot.conf" \
        in output, output
    assert partitions(disk) == [1], "the root is the last partition: it can grow"
    with open(disk, "rb") as f:
        f.seek(start)
        assert f.read(size) == bytes(size), "no password outlives the drive"
    assert (card.root / DONE).exists()
    preseed = (card.root / PRESEED).read_text()
    assert preseed.startswith("# from jupyter-firstboot.conf on the setup drive\n")
    # The wizard at the console: the note with its banner, and nobody needs to answer.
    output = finished(card.boot())
    assert "setup drive found (JUPYTER-CFG, partition 2)" in output
    assert "Setup is complete" in output
    assert card.login_accepts(login)
    assert os.readlink(card.root / "etc/localtime") == "/usr/share/zoneinfo/Europe/Berlin"
    assert take(card, disk) == "", "done once: a later boot does not look again"


@pytest.mark.root
def test_an_unedited_drive_changes_nothing_and_still_goes(card: Card, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "card.img")
    output = take(card, disk)
    assert "jupyter-firstboot.conf on the setup drive was not filled in: the wizard asks " \
           "everything" in output
    assert not (card.root / PRESEED).exists()
    assert partitions(disk) == [1]
    assert "was not filled in" in (card.root / NOTE).read_text()
    child = card.boot()
    child.expect("was not filled in")
    child.expect("Press Enter to begin setup")
    child.terminate(force=True)
    card.untouched()


@pytest.mark.root
def test_notepads_save_as_beside_the_template_is_the_one_taken(card: Card,
                                                               tmp_path: Path) -> None:
    """Notepad's "Save as" adds .txt and leaves the template as it was; Windows also adds a
    folder of its own. The filled-in copy is taken, and the other file is said."""
    disk = make_disk(tmp_path / "card.img")
    put(disk, "jupyter-firstboot.conf.txt", filled().encode(), tmp_path)
    subprocess.run(["mmd", "-i", f"{disk}@@{drive_offset(disk)}", "::/System Volume Information"],
                   check=True, env=MTOOLS)
    output = take(card, disk)
    assert "jupyter-firstboot.conf.txt on the setup drive: jupyter_password, login_password, " \
           "timezone taken" in output
    assert "jupyter-firstboot.conf on the setup drive was not used (only one file is: " \
           "jupyter-firstboot.conf.txt)" in output
    assert "login_password" in (card.root / PRESEED).read_text()


@pytest.mark.root
def test_the_drive_goes_over_what_the_image_preseed_says(card: Card, tmp_path: Path) -> None:
    """An image's own preseed (or flash-image's) stays where the drive says nothing, and
    gives way where it does."""
    card.preseed("hostname = from-the-image\ntimezone = America/New_York\n")
    disk = make_disk(tmp_path / "card.img")
    put(disk, "jupyter-firstboot.conf", filled().encode(), tmp_path)
    take(card, disk)
    finished(card.boot())
    assert (card.root / "etc/hostname").read_text() == "from-the-image\n"
    assert os.readlink(card.root / "etc/localtime") == "/usr/share/zoneinfo/Europe/Berlin"


@pytest.mark.root
@pytest.mark.parametrize("fault", ["reformatted", "rich-text", "no-file", "too-short"])
def test_a_drive_that_cannot_answer_is_said_and_the_wizard_asks(card: Card, tmp_path: Path,
                                                                fault: str) -> None:
    disk = make_disk(tmp_path / "card.img")
    start = drive_offset(disk)
    if fault == "reformatted":             # by a Linux user, as ext4: not FAT any more
        other = tmp_path / "ext4"
        subprocess.run(["mkfs.ext4", "-q", str(other), "8M"], check=True)
        with open(disk, "r+b") as f:
            f.seek(start)
            f.write(other.read_bytes())
    elif fault == "rich-text":             # TextEdit's default
        put(disk, "jupyter-firstboot.conf", b"{\\rtf1\\ansi login_password = x}", tmp_path)
    elif fault == "no-file":
        subprocess.run(["mdel", "-i", f"{disk}@@{start}", "::/jupyter-firstboot.conf"],
                       check=True, env=MTOOLS)
    else:
        put(disk, "jupyter-firstboot.conf", filled(login="short").encode(), tmp_path)
    output = take(card, disk)
    said = {"reformatted": "is not a FAT drive any more (ext4: reformatted?)",
            "rich-text": "was saved as rich text (RTF): save it as plain text",
            "no-file": "the setup drive has no jupyter-firstboot.conf",
            "too-short": "taken into /boot/jupyter-firstboot.conf"}[fault]
    assert said in output, output
    assert partitions(disk) == [1], "the root can grow whatever happened to the drive"
    child = card.boot()
    if fault == "too-short":
        child.expect("'login_password': is shorter than 8 characters")
        child.expect("setup asks for the rest")
    child.expect("Press Enter to begin setup")
    child.terminate(force=True)


@pytest.mark.root
@pytest.mark.parametrize("layout", ["no-drive", "big-data-partition", "ext4-after-root"])
def test_a_partition_that_is_not_the_setup_drive_is_left_alone(card: Card, tmp_path: Path,
                                                               layout: str) -> None:
    """Never made, deleted by the person, or someone's own partition after the root: the
    card touches none of it."""
    disk = tmp_path / "card.img"
    with open(disk, "wb") as f:
        f.truncate(200 * MIB)
    second = {"no-drive": "", "big-data-partition": f"start={100 * MIB // 512}, type=c\n",
              "ext4-after-root": f"start={100 * MIB // 512}, size={8 * MIB // 512}, type=83\n"
              }[layout]
    subprocess.run(["sfdisk", "--quiet", str(disk)], check=True,
                   input=f"label: dos\nstart=2048, size={90 * MIB // 512}\n{second}".encode())
    before = disk.read_bytes()
    assert take(card, disk) == ""
    assert disk.read_bytes() == before
    assert (card.root / DONE).exists()
