"""A preseed file named on a command line (`--preseed FILE` of build-image, try-image and
flash-image, and `build-image --check-preseed FILE`): read and checked with the wizard's own
parser, so that a bad line stops the command at once rather than a card's first boot later.
Every problem of the file is reported, not only the first: one run to fix them all."""

from __future__ import annotations

from pathlib import Path

from builder.errors import UsageError
from builder.firstboot.answers import Answers, parse_preseed
from builder.firstboot.card import Settings


def load_preseed(path: Path, shown: str | None = None, settings: Settings | None = None, *,
                 option: str = "--preseed") -> tuple[bytes, Answers]:
    """The file's bytes and answers; `shown` is the path as the user wrote it, `option` what
    named it."""
    flag = f"{option} {shown or path}"
    try:
        data = path.expanduser().read_bytes()
    except OSError as exc:
        raise UsageError(f"{flag}: {exc.strerror}: give the path of an existing file") from None
    # Time zone names are checked against the host's tzdata: the same names as the image's.
    answers, problems = parse_preseed(data, Path("/"), settings or Settings())
    if len(problems) == 1:
        raise UsageError(f"{flag}: {problems[0]}: {FIX}")
    if problems:
        raise UsageError(f"{flag}: {len(problems)} problems: {FIX}", problems)
    return data, answers


FIX = "fix the file (the manual's \"First boot\" chapter lists the keys)"
