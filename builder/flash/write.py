"""The image onto the card and back: write_card streams the raw image onto the card (only the
bmap's ranges when there is one, each checked against the bmap as it streams) with the card's
first MiB zeroed first and written last, so that a card interrupted at any point has no
partition table and cannot boot as a half-written system; verify_card reads what was written
back from the card itself (O_DIRECT, not the page cache) and compares it with the bmap's
checksums or with digests taken while writing."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import mmap
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder import log
from builder.errors import BuildError, Interrupted
from builder.flash.bmap import BlockMap, Range
from builder.flash.device import Card
from builder.flash.source import CHUNK, Source, raw_stream, read_into, skip
from builder.log import human_size

HEAD = 1 << 20            # zeroed first, written last
CARD_LEFT_INVALID = ("the card was left without a partition table (it will not boot): "
                     "flash it again")


@dataclass
class Written:
    size: int = 0                                   # the raw image's size, as streamed
    bytes: int = 0                                  # written to the card
    seconds: float = 0.0
    checks: list[Range] = field(default_factory=list)


def write_card(source: Source, card: Card | None) -> Written:
    """Stream the image onto the card (card None: only take the digests of a raw image, for
    --verify-only without a bmap)."""
    bmap = source.bmap
    total = bmap.mapped if bmap else source.size
    result = Written()
    head = bytearray(min(HEAD, source.size) if source.size else HEAD)
    started = time.monotonic()
    what = "writing" if card else "reading"
    view = memoryview(bytearray(CHUNK))
    try:
        if card is not None:
            invalidate(card)
        with raw_stream(source) as stream, log.progress(f"{what} {source.image.name}",
                                                        total) as bar:
            position = 0
            ranges = bmap.ranges if bmap else (Range(0, 1 << 62, None, ""),)
            for wanted in ranges:
                skipped = skip(stream, wanted.start - position, view)
                position += skipped
                if position < wanted.start:
                    break
                digest = hashlib.new(wanted.algorithm)
                while position < wanted.end:
                    n = read_into(stream, view[: min(CHUNK, wanted.end - position)])
                    if n == 0:
                        break
                    _check_fits(card, position + n)
                    data = view[:n]
                    if bmap is None:
                        # Without a bmap, each 4 MiB is checked on its own: a mismatch is
                        # then named to within 4 MiB.
                        result.checks.append(Range(position, position + n,
                                                   hashlib.sha256(data).hexdigest(), ""))
                    else:
                        digest.update(data)
                    if card is not None:
                        if position < HEAD:
                            keep = min(n, HEAD - position)
                            head[position:position + keep] = data[:keep]
                            if n > keep:
                                card.write(data[keep:], position + keep)
                        else:
                            card.write(data, position)
                    position += n
                    bar.update(n)
                if bmap is not None and position == wanted.end:
                    result.checks.append(_checked_range(source, bmap, wanted, digest))
            # The rest is read too: the decompressor's exit code says whether the image was
            # whole, and the size must match the bmap's.
            if stream.seekable():
                position = stream.seek(0, io.SEEK_END)
            while n := read_into(stream, view):
                position += n
            result.size = position
        if bmap is not None and position != bmap.image_size:
            raise BuildError(f"{source.image.name} holds {position} bytes, but {bmap.path.name} "
                             f"is for {bmap.image_size}: it belongs to another image")
        if card is not None:
            card.sync()
            card.write(bytes(head[:min(HEAD, position)]), 0)
            card.sync()
    except BuildError as exc:
        if card is None:
            raise
        raise BuildError(f"{exc}; {CARD_LEFT_INVALID}") from None
    except Interrupted:
        if card is not None:
            log.warn(CARD_LEFT_INVALID)
        raise
    result.bytes = card.written if card else 0
    result.seconds = time.monotonic() - started
    return result


def _checked_range(source: Source, bmap: BlockMap, wanted: Range,
                   digest: hashlib._Hash) -> Range:
    """A range as streamed, against the bmap's checksum, before the card's first MiB makes
    it bootable: an image that is not the bmap's is found here, not blamed on the card."""
    found = digest.hexdigest()
    if wanted.digest is None:
        return dataclasses.replace(wanted, digest=found)
    if found != wanted.digest:
        raise BuildError(f"{source.image.name} does not match {bmap.path.name} in "
                         f"{wanted.describe()}: the image is corrupt or the bmap is another "
                         f"build's (pass the right --bmap, or --no-bmap)")
    return wanted


def invalidate(card: Card) -> None:
    """Zero the card's first MiB (partition table, boot loader) before anything else, and the
    last one where an old GPT keeps its backup copy."""
    zeros = bytes(HEAD)
    card.write(zeros, 0)
    if card.target.is_disk and card.target.size >= 2 * HEAD:
        card.write(zeros, card.target.size - HEAD)
    card.sync()
    card.written = 0


def _check_fits(card: Card | None, end: int) -> None:
    if card is not None and card.target.is_disk and end > card.target.size:
        raise BuildError(f"the image is larger than {card.target.path} "
                         f"({human_size(card.target.size)}): use a larger card")


# Verifying.


class Mismatch(BuildError):
    """The card does not hold the image."""


def verify_card(source: Path, shown: Path, checks: Sequence[Range], *,
                just_written: bool) -> float:
    """Read every range back from the card itself and compare its digest; returns seconds."""
    hint = ("the card did not keep what was written (failing, or a fake capacity?): do not use "
            "it" if just_written else "it holds another image, was changed (booted, "
            "personalised) since, or is failing")
    started = time.monotonic()
    total = sum(r.end - r.start for r in checks)
    view = memoryview(mmap.mmap(-1, CHUNK))     # page-aligned, as O_DIRECT needs
    fd, direct = _open_uncached(source)
    try:
        with log.progress(f"verifying {shown}", total) as bar:
            for wanted in checks:
                digest = hashlib.new(wanted.algorithm)
                position = wanted.start
                while position < wanted.end:
                    n = min(CHUNK, wanted.end - position)
                    try:
                        got = _pread(fd, view, position, n, direct)
                    except OSError as exc:
                        raise Mismatch(f"reading {shown} back failed at byte {position} "
                                       f"({exc.strerror}): the card may be failing") from None
                    digest.update(view[:got])
                    bar.update(got)
                    position += n
                    if got < n:
                        break
                if digest.hexdigest() != wanted.digest:
                    raise Mismatch(f"{shown} differs from the image in "
                                   f"{wanted.describe()}: {hint}")
    finally:
        os.close(fd)
    return time.monotonic() - started


def _open_uncached(path: Path) -> tuple[int, bool]:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), True
    except OSError as exc:
        if exc.errno != errno.EINVAL:       # a file system without O_DIRECT (tmpfs)
            raise
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd, False


def _pread(fd: int, view: memoryview, offset: int, length: int, direct: bool) -> int:
    """Read `length` bytes at `offset`; O_DIRECT reads whole 4 KiB blocks, so the length is
    rounded up and the extra dropped."""
    ask = -(-length // 4096) * 4096 if direct else length
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:ask]], offset + got)
        if n <= 0:
            break
        got += n
    return min(got, length)
