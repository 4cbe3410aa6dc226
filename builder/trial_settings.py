"""The trial disk's first-boot settings, for try-image: where --preseed and --armbian-preset
go, and what the card's first boot will make of everything on the disk.

A person on any computer fills in the setup drive's file; Armbian Imager writes its presets
into /root/.not_logged_in_yet. try-image does the same on the trial disk: --preseed onto the
setup drive (in the template, as Notepad saves it: a BOM and CRLF), or into
/boot/jupyter-firstboot.conf when the image has no drive; --armbian-preset where Imager puts
it. Then it assembles, with the card's own code (setup_drive.assemble), the preseed the
wizard will read, so that --smoke knows the passwords the card will take, or knows that it
must answer the wizard itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuildError
from builder.ext4 import Ext4
from builder.firstboot.answers import Answers, parse_preseed
from builder.firstboot.armbian_preset import PRESET_FILE
from builder.firstboot.card import PRESEED, Settings
from builder.firstboot.setup_drive import SETUP_FILE, assemble, drive_settings, presets_from
from builder.guest_shell import Credentials
from builder.setup_partition import (
    find_setup_drive,
    read_setup_file,
    setup_file_text,
    write_setup_file,
)

PRESEED_PATH = "/" + PRESEED
PRESET_PATH = "/" + PRESET_FILE


@dataclass(frozen=True)
class Placed:
    changes: list[str]              # what was done to the trial disk, for the report
    credentials: Credentials | None  # the passwords the card will take, if all are known


def place(disk: Path, fs: Ext4, work: Path, user: str, preseed: bytes | None,
          preset: bytes | None, smoke: bool) -> Placed:
    """--preseed and --armbian-preset onto the trial disk, and the credentials the card's
    first boot will then have. The image's own preseed (hashes, unknown here) is set aside
    when the passwords would otherwise be unknown and nothing given asks for them."""
    changes = []
    drive = find_setup_drive(disk, fs.partition.number)
    if preseed is not None and drive is not None:
        write_setup_file(disk, drive[0], _as_notepad_saves(read_setup_file(disk, drive[0]),
                                                           preseed))
        changes.append(f"setup drive: {SETUP_FILE} from --preseed (as Notepad saves it: "
                       f"UTF-8 with a BOM, CRLF)")
    elif preseed is not None:
        fs.write(PRESEED_PATH, preseed, 0o600, work)
        changes.append(f"{PRESEED_PATH}: from --preseed (the image has no setup drive)")
    if preset is not None:
        fs.write(PRESET_PATH, preset, 0o600, work)
        changes.append(f"{PRESET_PATH}: from --armbian-preset, as Armbian Imager writes it")
    answers = assembled(disk, fs, drive, user)
    if fs.exists(PRESEED_PATH) and preseed is None and _partly_unknown(answers):
        # Its passwords (hashes) are unknown here: the wizard asks instead, and is answered.
        fs.remove(PRESEED_PATH)
        changes.append(f"{PRESEED_PATH}: the image's own preseed set aside (its passwords "
                       f"are unknown here); pass --preseed to try one")
        answers = assembled(disk, fs, drive, user)
    credentials = None
    if smoke:
        credentials = _credentials(answers, user, given=preseed is not None or
                                   preset is not None)
    return Placed(changes, credentials)


def _as_notepad_saves(template: bytes | None, preseed: bytes) -> bytes:
    """The drive's file with its comments kept and its settings replaced by the preseed's
    lines (a key given twice would be refused), as Windows' Notepad saves it: with a BOM."""
    return setup_file_text(template, preseed.decode("utf-8-sig"), bom=True)


def assembled(disk: Path, fs: Ext4, drive: tuple[int, int] | None, user: str) -> Answers:
    """What the card's first boot will read: the image's preseed, the presets and the setup
    drive's file, put together by the card's own code."""
    old = (fs.read(PRESEED_PATH) or b"").decode("utf-8-sig", errors="replace")
    presets, _ = presets_from(fs.read(PRESET_PATH) or b"", user, root_same=False)
    lines = None
    if drive is not None:
        data = read_setup_file(disk, drive[0])
        if data is not None:
            lines, _ = drive_settings(SETUP_FILE, data)
    text, _ = assemble(old, presets, lines)
    answers, problems = parse_preseed(text, Path("/"), Settings())
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BuildError(f"the trial card's first-boot settings would not all be taken: "
                         f"{problems[0]}{more}: fix --preseed or --armbian-preset")
    return answers


def _partly_unknown(answers: Answers) -> bool:
    """A password the card would take that the smoke cannot type: given only as a hash."""
    return bool((answers.login_hash and not answers.login_password) or
                (answers.jupyter_hash and not answers.jupyter_password))


def _credentials(answers: Answers, user: str, given: bool) -> Credentials | None:
    """The passwords for --smoke to log in with; None when the card has none and the wizard
    will ask (the smoke answers it)."""
    login, jupyter = answers.login_password, answers.jupyter_password
    if login and jupyter:
        token = answers.token if answers.token not in (None, "generate", "none") else None
        return Credentials(user, login, jupyter, token)
    if not (answers.has_login() or answers.has_jupyter()):
        return None
    what = "--preseed or --armbian-preset" if given else "the settings on the card"
    raise BuildError(f"--smoke logs in with the passwords, but {what} give the card only one "
                     f"of them in plain text (or a hash): give both login_password and "
                     f"jupyter_password, or neither (the smoke then answers the wizard)")
