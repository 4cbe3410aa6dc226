"""The image files this project reads and writes: which suffix is which compression, and
decompressing one into a sparse raw image. Shared by build-image (base images), try-image
(trial disks) and flash-image, without the rest of any of them."""

from __future__ import annotations

import os
from pathlib import Path

from builder import log
from builder.errors import BuildError
from builder.run import spawn

# File suffix → decompressing command (reads stdin, writes stdout). Separate processes, not
# Python's lzma: xz decompresses the multi-block files Armbian publishes on every core.
COMPRESSIONS: dict[str, list[str]] = {
    ".img": ["cat"],
    ".img.xz": ["xz", "--decompress", "--stdout", "--threads=0"],
    ".img.gz": ["gzip", "--decompress", "--stdout"],
    ".img.zst": ["zstd", "--decompress", "--stdout", "--quiet"],
}


def listed(suffixes: list[str]) -> str:
    """".img, .img.xz or .img.zst": what is accepted, for messages, from the table."""
    return suffixes[0] if len(suffixes) == 1 else f"{', '.join(suffixes[:-1])} or {suffixes[-1]}"


# Every kind of image file this project reads, for messages: ".img, .img.xz, ... or .img.zst".
KINDS = listed(list(COMPRESSIONS))


# How each compressed format's files start. Checked before a decompressor is started: a file
# named for another format, or no compressed file at all, is refused as such, not as "corrupt
# or truncated" by the decompressor. zstd's may begin with a skippable frame (magic
# 0x184D2A50 to 0x184D2A5F, little-endian) instead of a data frame.
MAGIC: dict[str, tuple[bytes, ...]] = {
    ".img.xz": (b"\xfd7zXZ\x00",),
    ".img.gz": (b"\x1f\x8b",),
    ".img.zst": (b"\x28\xb5\x2f\xfd", *(bytes([0x50 + i, 0x2A, 0x4D, 0x18]) for i in range(16))),
}


def format_of(head: bytes) -> str | None:
    """The suffix of the compressed format whose magic bytes `head` starts with."""
    for suffix, magics in MAGIC.items():
        if head.startswith(magics):
            return suffix
    return None


def image_suffix(name: str) -> str:
    lowered = name.lower()
    for suffix in sorted(COMPRESSIONS, key=len, reverse=True):
        if lowered.endswith(suffix):
            return suffix
    raise BuildError(
        f"base image {name!r} is not an {KINDS} file: "
        f"give --base armbian, or a path or URL to a disk image"
    )


def built_image_suffix(image: Path) -> str:
    """The suffix of an image build-image wrote, named on try-image's or flash-image's command
    line; a missing file or one that is no image is refused with one line."""
    if not image.is_file():
        raise BuildError(f"{image}: no such image file (give the {KINDS} file build-image "
                         f"wrote)")
    try:
        return image_suffix(image.name)
    except BuildError:
        raise BuildError(f"{image.name}: not an {KINDS} file (give the image build-image "
                         f"wrote)") from None


ZEROS = bytes(1 << 20)


def decompress_sparse(compressed: Path, suffix: str, target: Path, name: str) -> int:
    """Decompress into `target` with a progress bar, skipping runs of zeros (a sparse file);
    returns the size written."""
    size = compressed.stat().st_size
    with open(compressed, "rb") as src, open(target, "wb") as out, \
            log.progress(f"decompressing {name}", size) as bar, \
            spawn(COMPRESSIONS[suffix], stdin=src,
                  what=f"decompress {compressed}: the file is corrupt or truncated") as proc:
        assert proc.stdout is not None
        written = 0
        seen = 0
        while chunk := proc.stdout.read(len(ZEROS)):
            if chunk == ZEROS[: len(chunk)]:
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
            written += len(chunk)
            # The decompressor shares our file description of src, so its read position is
            # how far it has come.
            position = os.lseek(src.fileno(), 0, os.SEEK_CUR)
            bar.update(position - seen)
            seen = position
        out.truncate(written)
        out.flush()
        os.fsync(out.fileno())
    return written
