"""try-image's first-boot settings on the trial disk (builder/trial_settings.py): --preseed
onto the setup drive as Notepad saves it, --armbian-preset where Armbian Imager writes it,
and the passwords --smoke will log in with, assembled by the card's own code from everything
on the disk. Real image files, debugfs and mtools."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from test_tryimage import make_image

from builder import setup_partition, trial_settings
from builder.boards import load_catalog
from builder.config import load_config
from builder.customize import template_context
from builder.errors import BuildError
from builder.ext4 import find_root_fs
from builder.firstboot.answers import hash_login_password, parse_preseed
from builder.firstboot.card import Settings
from builder.firstboot.setup_drive import SETUP_FILE, decode, drive_settings
from builder.flash import personalise
from builder.image import read_table

BOARD = "orangepizeroplus2-h5"
LOGIN, JUPYTER = "trial login pässword", "trial jupyter pw"


@functools.cache
def image_preseed() -> bytes:
    from jupyter_server.auth import passwd
    return (f"login_password_hash = {hash_login_password('image-login-1')}\n"
            f"jupyter_password_hash = {passwd('image-jupyter-1')}\n"
            f"jupyter_token = image-token-0123456789abcdef\nhostname = from-image\n").encode()


def disk_with(tmp_path: Path, preseed: bytes | None = None, drive: bool = True) -> Path:
    files = {"boot/jupyter-firstboot.conf": preseed} if preseed else {}
    disk = make_image(tmp_path / "disk.img", BOARD, files)
    if drive:
        board, _ = load_catalog().lookup(BOARD)
        setup_partition.add_setup_partition(
            disk, setup_partition.contents(template_context(load_config(), board)), "0badcafe")
    return disk


def place(disk: Path, tmp_path: Path, preseed: bytes | None = None,
          preset: bytes | None = None, smoke: bool = True) -> trial_settings.Placed:
    fs = find_root_fs(disk, read_table(disk))
    return trial_settings.place(disk, fs, tmp_path, "jupyter", preseed, preset, smoke)


def drive_file(disk: Path) -> bytes:
    start, _ = setup_partition.find_setup_drive(disk) or (0, 0)
    data = setup_partition.read_setup_file(disk, start)
    assert data is not None
    return data


def test_a_preseed_goes_onto_the_drive_as_notepad_saves_it(tmp_path: Path) -> None:
    """The template's comments kept, the preseed's lines after them, a BOM and CRLF; the
    image's own preseed stays on the card, under the drive's lines, as on a real card."""
    disk = disk_with(tmp_path, image_preseed())
    placed = place(disk, tmp_path, f"login_password = {LOGIN}\njupyter_password = {JUPYTER}\n"
                   f"hostname = trial-pc\n".encode())
    data = drive_file(disk)
    assert data.startswith(b"\xef\xbb\xbf# Jupyter workstation") and data.count(b"\r\n") == \
        data.count(b"\n")
    answers, problems = parse_preseed(decode(data), Path("/"), Settings())
    assert problems == [] and answers.login_password == LOGIN and answers.hostname == "trial-pc"
    assert "#wifi_ssid =" in decode(data), "the template's explanations stay"
    fs = find_root_fs(disk, read_table(disk))
    assert fs.read("/boot/jupyter-firstboot.conf") == image_preseed()
    assert placed.credentials is not None
    assert (placed.credentials.login_password, placed.credentials.jupyter_password,
            placed.credentials.token) == (LOGIN, JUPYTER, "image-token-0123456789abcdef")
    assert any(c.startswith("setup drive: jupyter-firstboot.conf from --preseed")
               for c in placed.changes)


def test_unknown_hashes_are_set_aside_so_the_smoke_answers(tmp_path: Path) -> None:
    disk = disk_with(tmp_path, image_preseed())
    placed = place(disk, tmp_path)
    assert placed.credentials is None
    assert find_root_fs(disk, read_table(disk)).read("/boot/jupyter-firstboot.conf") is None
    assert any("the image's own preseed set aside" in c for c in placed.changes)


def test_armbian_presets_give_both_passwords_and_land_where_imager_writes(
        tmp_path: Path) -> None:
    disk = disk_with(tmp_path, image_preseed())
    preset = f'PRESET_USER_NAME="jupyter"\nPRESET_USER_PASSWORD="{LOGIN}"\n'.encode()
    placed = place(disk, tmp_path, preset=preset)
    assert placed.credentials is not None
    assert placed.credentials.login_password == placed.credentials.jupyter_password == LOGIN
    fs = find_root_fs(disk, read_table(disk))
    assert fs.read("/root/.not_logged_in_yet") == preset
    assert fs.read("/boot/jupyter-firstboot.conf") == image_preseed(), "kept: fully known"


def test_a_flashed_card_mixes_the_drive_the_presets_and_the_image(tmp_path: Path) -> None:
    """As the appliance's armhf smoke has it: flash-image put the Jupyter password on the
    drive, Armbian's presets give the login password, the image's preseed the token."""
    disk = disk_with(tmp_path, image_preseed())
    start, _ = setup_partition.find_setup_drive(disk) or (0, 0)
    setup_partition.write_setup_file(disk, start, drive_file(disk) +
                                     f"jupyter_password = {JUPYTER}\r\n".encode())
    placed = place(disk, tmp_path, preset=f"PRESET_USER_PASSWORD='{LOGIN}'\n".encode())
    assert placed.credentials is not None
    assert (placed.credentials.login_password, placed.credentials.jupyter_password,
            placed.credentials.token) == (LOGIN, JUPYTER, "image-token-0123456789abcdef")


def test_without_a_drive_the_preseed_replaces_the_images(tmp_path: Path) -> None:
    disk = disk_with(tmp_path, image_preseed(), drive=False)
    text = f"login_password = {LOGIN}\njupyter_password = {JUPYTER}\n".encode()
    placed = place(disk, tmp_path, text)
    assert find_root_fs(disk, read_table(disk)).read("/boot/jupyter-firstboot.conf") == text
    assert placed.credentials is not None and placed.credentials.token is None


@pytest.mark.parametrize("preseed, message", [
    (b"login_password = only-the-login-1\n", "only one of them in plain text"),
    (b"login_password = short\n", "shorter than"),
])
def test_settings_the_smoke_cannot_use_are_refused(tmp_path: Path, preseed: bytes,
                                                   message: str) -> None:
    disk = disk_with(tmp_path)
    with pytest.raises(BuildError, match=message):
        place(disk, tmp_path, preseed)


@functools.cache
def drive_template() -> bytes:
    board, _ = load_catalog().lookup(BOARD)
    return setup_partition.contents(template_context(load_config(), board))[
        "jupyter-firstboot.conf"]


@pytest.mark.parametrize("template", [
    "built", None, b"", b"# one\n\n# two\n", b"\xef\xbb\xbf# one\r\n#hostname =\r\n\r\n",
    b"# explained\r\nhostname = from-the-template\r\n# more\r\n", b"# lone\rCR\r\n"],
    ids=["built", "none", "empty", "lf", "bom-blank-end", "a-setting", "lone-cr"])
def test_flash_image_and_try_image_write_the_drive_alike_but_for_the_bom(
        template: bytes | str | None) -> None:
    """One rule for the drive's file (setup_partition.setup_file_text): what flash-image
    writes and what try-image writes from the same template and lines differ in try-image's
    BOM alone, and the card reads the same settings from either."""
    data = drive_template() if template == "built" else template
    assert not isinstance(data, str)
    lines = (f"# flash-image 0, 2024-01-01 00:00: this card's own settings\n"
             f"hostname = lab-pi-01\nlogin_password = {LOGIN}\njupyter_password = {JUPYTER}\n")
    flashed = personalise._setup_file(data, lines)
    tried = trial_settings._as_notepad_saves(data, lines.encode())
    assert tried == b"\xef\xbb\xbf" + flashed and not flashed.startswith(b"\xef\xbb\xbf")
    assert flashed.endswith(b"\r\n") and flashed.count(b"\n") == flashed.count(b"\r\n")
    assert b"from-the-template" not in flashed, "the template's settings give way to the lines"
    taken, _ = drive_settings(SETUP_FILE, tried)
    answers, problems = parse_preseed(taken or "", Path("/"), Settings())
    assert problems == [] and (answers.hostname, answers.login_password) == ("lab-pi-01", LOGIN)
