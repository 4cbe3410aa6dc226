"""The image file flash-image reads: its .sha256 checked, its raw (decompressed) size learnt,
and its raw bytes streamed front to back, through a decompressor when it is compressed.

The raw size has one home here: raw_size reads what the file says (a raw image's length, an
.xz's index), measure_raw_size decompresses what does not say it (.zst, .gz)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from builder import log
from builder.compression import COMPRESSIONS
from builder.errors import BuildError
from builder.files import sha256_of
from builder.flash.bmap import BlockMap
from builder.run import run, spawn

CHUNK = 4 << 20           # one read from the image, one write to the card


@dataclass(frozen=True)
class Source:
    """An image to write, and what is known of it before it is read."""

    image: Path
    suffix: str                 # a key of COMPRESSIONS
    size: int | None            # the raw image's size, when the file or bmap tells it
    bmap: BlockMap | None


def check_image_checksum(image: Path) -> None:
    """The .sha256 build-image writes beside its image, checked before the card is touched:
    a corrupt or truncated download is refused without harming the card."""
    sums = image.with_name(image.name + ".sha256")
    if not sums.is_file():
        log.warn(f"no {sums.name} beside the image: its integrity is checked only by the "
                 f"decompressor and the bmap")
        return
    words = sums.read_text(errors="replace").split()
    if not words or len(words[0]) != 64:
        raise BuildError(f"{sums}: not a sha256sum line (`<64 hex digits>  <name>`)")
    if len(words) > 1 and words[1].lstrip("*") != image.name:
        raise BuildError(f"{sums} is for {words[1].lstrip('*')}, not {image.name}")
    with log.progress(f"checking {image.name}", image.stat().st_size) as bar:
        digest = sha256_of(image, progress=bar.update)
    if digest != words[0].lower():
        raise BuildError(f"{image} does not match {sums.name} (corrupt or truncated): download "
                         f"or build it again; the card was not touched")
    log.info(f"{image.name}: sha256 matches {sums.name}")


def raw_size(image: Path, suffix: str) -> int | None:
    """The decompressed size, where the file says it: a raw image, and xz (its index)."""
    if suffix == ".img":
        return image.stat().st_size
    if suffix == ".img.xz":
        proc = run(["xz", "--robot", "--list", image], capture=True, check=False)
        for line in proc.stdout.decode(errors="replace").splitlines():
            fields = line.split("\t")
            if fields[0] == "totals" and len(fields) > 4 and fields[4].isdigit():
                return int(fields[4])
        raise BuildError(f"{image}: not a complete .xz file (xz --list: "
                         f"{proc.stderr.decode(errors='replace').strip()}): download it again")
    return None


def measure_raw_size(source: Source) -> int:
    """A .zst or .gz with no bmap does not say how large it is: decompress it once (seconds
    for zstd), so that a card too small is refused before it is touched."""
    size = 0
    view = memoryview(bytearray(CHUNK))
    with raw_stream(source) as stream, log.progress(f"measuring {source.image.name}",
                                                    None) as bar:
        while n := read_into(stream, view):
            size += n
            bar.update(n)
    return size


@contextmanager
def raw_stream(source: Source) -> Iterator[IO[bytes]]:
    """The raw image, read front to back: the file itself, or a decompressor's output."""
    with open(source.image, "rb") as src:
        if source.suffix == ".img":
            yield src
            return
        what = f"decompress {source.image}: the file is corrupt or truncated"
        with spawn(COMPRESSIONS[source.suffix], stdin=src, what=what) as proc:
            assert proc.stdout is not None
            yield proc.stdout


def read_into(stream: IO[bytes], view: memoryview) -> int:
    """Fill `view` from the stream (a pipe gives less than asked); less only at its end."""
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def skip(stream: IO[bytes], count: int, scratch: memoryview) -> int:
    """Pass over `count` bytes (a seek on a file, reads into `scratch` on a pipe); returns how
    many there were."""
    if count <= 0:
        return 0
    if stream.seekable():
        stream.seek(count, io.SEEK_CUR)
        return count
    skipped = 0
    while skipped < count:
        n = read_into(stream, scratch[: min(len(scratch), count - skipped)])
        if not n:
            break
        skipped += n
    return skipped
