"""A preseed file named on a command line (`--preseed FILE` of build-image, try-image and
flash-image): read and checked with the wizard's own parser, so that a bad line stops the
command at once rather than a card's first boot later."""

from __future__ import annotations

from pathlib import Path

from builder.errors import BuildError
from builder.firstboot.answers import Answers, parse_preseed
from builder.firstboot.card import Settings


def load_preseed(path: Path, shown: str | None = None,
                 settings: Settings | None = None) -> tuple[bytes, Answers]:
    """The file's bytes and answers; `shown` is the path as the user wrote it."""
    flag = f"--preseed {shown or path}"
    try:
        data = path.expanduser().read_bytes()
    except OSError as exc:
        raise BuildError(f"{flag}: {exc.strerror}: give the path of an existing file") from None
    # Time zone names are checked against the host's tzdata: the same names as the image's.
    answers, problems = parse_preseed(data, Path("/"), settings or Settings())
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BuildError(f"{flag}: {problems[0]}{more}: fix the file (README: \"Headless "
                         f"first boot\" lists the keys)")
    return data, answers
