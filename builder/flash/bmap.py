"""The block map beside an image (bmaptool's format, versions 1.0 to 2.x): which ranges of the
raw image hold data, and the checksum each must have. flash-image writes only those ranges and
verifies the card against their checksums."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuildError


@dataclass(frozen=True)
class Range:
    """Bytes [start, end) of the image, with the digest they must have."""

    start: int
    end: int
    digest: str | None          # None: a bmap without checksums; taken while writing
    name: str
    algorithm: str = "sha256"   # hashlib's name

    def describe(self) -> str:
        span = (f"bytes {self.start}-{self.end - 1}, "
                f"MiB {self.start / 2**20:.1f}-{self.end / 2**20:.1f}")
        return f"{self.name} ({span})" if self.name else span


@dataclass(frozen=True)
class BlockMap:
    path: Path
    image_size: int
    block_size: int
    ranges: tuple[Range, ...]

    @property
    def mapped(self) -> int:
        return sum(r.end - r.start for r in self.ranges)


def bmap_beside(image: Path) -> Path | None:
    """bmaptool's names for the map of X.img.xz: X.img.xz.bmap, X.img.bmap, X.bmap."""
    stem = image.name
    candidates = [stem]
    for end in (".xz", ".zst", ".gz", ".img"):
        if stem.endswith(end):
            stem = stem[: -len(end)]
            candidates.append(stem)
    for name in candidates:
        path = image.with_name(name + ".bmap")
        if path.is_file():
            return path
    return None


def read_bmap(path: Path) -> BlockMap:
    """A bmap file (bmaptool's format 1.x or 2.x), its own checksum verified."""
    try:
        text = path.read_bytes()
        root = ET.fromstring(text)
    except OSError as exc:
        raise BuildError(f"{path}: {exc.strerror}") from None
    except ET.ParseError as exc:
        raise BuildError(f"{path}: not a bmap file ({exc}): pass --no-bmap to write "
                         f"every block") from None

    def field(name: str) -> str:
        value = root.findtext(name)
        if value is None:
            raise BuildError(f"{path}: no <{name}> in it: not a bmap file (pass --no-bmap)")
        return value.strip()

    try:
        version = tuple(int(part) for part in (root.get("version") or "").split(".")[:2])
    except ValueError:
        version = ()
    if root.tag != "bmap" or not (1, 0) <= version < (3, 0):
        raise BuildError(f"{path}: not a bmap file of a version flash-image knows (1.x, 2.x): "
                         f"pass --no-bmap")
    # bmaptool's formats: 1.4 and later name their checksum type; 1.3 has SHA-1 only, under
    # other names; older ones have no checksums (what was written is digested instead).
    if version >= (1, 4):
        checksum, attribute, own = field("ChecksumType"), "chksum", "BmapFileChecksum"
    elif version == (1, 3):
        checksum, attribute, own = "sha1", "sha1", "BmapFileSHA1"
    else:
        checksum, attribute, own = "sha256", "", ""
    if checksum not in ("sha1", "sha256"):
        raise BuildError(f"{path}: unknown checksum type {checksum!r} (pass --no-bmap)")
    expected = root.findtext(own) if own else None
    if expected is not None:
        # The file's checksum is taken with its own value replaced by zeros.
        blank = text.replace(expected.strip().encode(), b"0" * len(expected.strip()), 1)
        if hashlib.new(checksum, blank).hexdigest() != expected.strip():
            raise BuildError(f"{path} is damaged (its own checksum does not match): fetch it "
                             f"again with the image, or pass --no-bmap")
    try:
        image_size, block_size = int(field("ImageSize")), int(field("BlockSize"))
        blocks = int(field("BlocksCount"))
    except ValueError:
        raise BuildError(f"{path}: ImageSize, BlockSize or BlocksCount is not a number") from None
    if block_size <= 0 or blocks != -(-image_size // block_size):
        raise BuildError(f"{path}: {blocks} blocks of {block_size} bytes do not make an "
                         f"image of {image_size} bytes: the file is damaged")
    ranges: list[Range] = []
    last = -1
    for element in root.iterfind("BlockMap/Range"):
        text_range = (element.text or "").strip()
        first_s, _, last_s = text_range.partition("-")
        try:
            first, final = int(first_s), int(last_s or first_s)
        except ValueError:
            raise BuildError(f"{path}: bad range {text_range!r}: the file is damaged") from None
        if first <= last or final < first or final >= blocks:
            raise BuildError(f"{path}: range {text_range} overlaps or leaves the image: the "
                             f"file is damaged")
        last = final
        name = f"blocks {first}-{final}" if final > first else f"block {first}"
        digest = element.get(attribute) if attribute else None
        ranges.append(Range(first * block_size, min((final + 1) * block_size, image_size),
                            digest.strip().lower() if digest else None, name, checksum))
    return BlockMap(path, image_size, block_size, tuple(ranges))
