"""The image file flash-image reads: its .sha256 checked, its raw (decompressed) size learnt,
the whole of it checked before the card is opened, and its raw bytes streamed front to back,
through a decompressor when it is compressed.

The raw size has one home here: raw_size reads what the file says (a raw image's length, a
complete .xz's index), measure_raw_size decompresses what does not say it (.zst, .gz), and
check_whole decompresses what nothing vouches for."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

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


S = TypeVar("S", bound=Source)     # flash-image's Request is a Source with more


def check_image_checksum(image: Path) -> bool:
    """The .sha256 build-image writes beside its image, checked before the card is touched:
    a corrupt or truncated download is refused without harming the card. True when it vouches
    for the file, False when there is none."""
    sums = image.with_name(image.name + ".sha256")
    if not sums.is_file():
        log.warn(f"no {sums.name} beside the image: it is checked by decompressing it whole "
                 f"before the card is touched, and by the bmap's checksums as it is written")
        return False
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
    return True


def raw_size(image: Path, suffix: str) -> int | None:
    """The decompressed size, where the file says it: a raw image, and xz (its index). An
    empty file, or an .xz whose index xz does not accept, is refused here."""
    if image.stat().st_size == 0:
        raise BuildError(f"{image} is empty: download or build it again")
    if suffix == ".img":
        return image.stat().st_size
    if suffix == ".img.xz":
        # A truncated or damaged .xz still gets a totals line, but xz exits 1: only a list
        # that xz itself accepts says the size.
        proc = run(["xz", "--robot", "--list", image], capture=True, check=False)
        for line in proc.stdout.decode(errors="replace").splitlines():
            fields = line.split("\t")
            if (proc.returncode == 0 and fields[0] == "totals" and len(fields) > 4
                    and fields[4].isdigit()):
                return int(fields[4])
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise BuildError(f"{image}: not a complete .xz file (xz --list: "
                         f"{detail[-1] if detail else 'no index'}): download it again")
    return None


def check_whole(source: S, vouched: bool) -> S:
    """The image's raw size, known, and the file found whole before the card is opened.

    A .sha256 that matches vouches for the file: only a size nothing says is measured. A file
    nothing vouches for is decompressed once, front to back, here: a truncated or corrupt one
    is refused now, not halfway through the write with the card's first MiB already gone. A
    raw .img has nothing to decompress; the bmap's checksums check it as it is written."""
    if source.suffix == ".img" or (vouched and source.size is not None):
        return source
    measured = measure_raw_size(source)
    if measured == 0:
        raise BuildError(f"{source.image} holds an empty image: download or build it again")
    if source.size is not None and measured != source.size:
        said = (f"its bmap {source.bmap.path.name}" if source.bmap is not None
                else "its index")
        raise BuildError(f"{source.image} decompresses to {measured} bytes, but {said} says "
                         f"{source.size}: it is truncated or not the image the bmap is for; "
                         f"download or build it again")
    return dataclasses.replace(source, size=measured)


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
