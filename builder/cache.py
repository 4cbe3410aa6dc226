"""The download cache: verified downloads and decompressed base images, keyed by sha256.

    <cache>/partial/<key>.<name>         downloads in progress (kept to resume)
    <cache>/downloads/<sha256>/<name>    verified files as downloaded
    <cache>/images/<sha256>.img          decompressed raw base images (sparse)
    <cache>/images/<sha256>.json         what an entry is: its source, sizes, signature
    <cache>/urls/<key>.json              which sha256 a URL served, to reuse it offline
    <cache>/index/<key>.json             the last Armbian index read from each URL
    <cache>/locks/                       one flock per entry, so builds do not race

Everything is written under a temporary name and renamed only once verified: a file under its
final name is always complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from builder import log
from builder.errors import BuildError
from builder.files import locked

APP = "orangepi-jupyter"


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/orangepi-jupyter or ~/.cache/orangepi-jupyter of whoever runs the build
    (root's own under sudo, since sudo resets HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / APP


def key_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class CachedImage:
    """A decompressed base image in the cache and what it was made from."""

    path: Path
    sha256: str              # of the file as downloaded (the key)
    source: str              # URL or path it came from
    filename: str
    raw_size: int
    raw_mtime_ns: int
    signature: str | None    # fingerprint of the key that signed it, when checked

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.partial = root / "partial"
        self.downloads = root / "downloads"
        self.images = root / "images"
        self.urls = root / "urls"
        self.index = root / "index"
        self.locks = root / "locks"

    def prepare(self) -> None:
        try:
            for d in (self.partial, self.downloads, self.images, self.urls, self.index,
                      self.locks):
                d.mkdir(parents=True, exist_ok=True)
            probe = self.locks / f".probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise BuildError(
                f"cache directory {self.root} is not usable ({exc.strerror}): "
                f"pass --cache-dir DIR with a directory you can write"
            ) from None
        self.sweep()

    def sweep(self) -> None:
        """Remove half-written images left by builds that were killed (SIGKILL, power cut):
        an image whose lock nobody holds is not being written any more."""
        for tmp in self.images.glob(".*.img.tmp"):
            digest = tmp.name[1:].removesuffix(".img.tmp")
            with locked(self.locks / f"{digest}.lock", wait=False) as had:
                if not had:
                    continue  # another build is writing it right now
                log.info(f"removing {tmp}, left by a build that was killed")
                tmp.unlink(missing_ok=True)

    @contextmanager
    def lock(self, key: str, what: str) -> Iterator[None]:
        """Hold the entry `key` alone. The kernel drops an flock when its holder dies, so a
        killed build never leaves a lock that blocks the next one."""
        with locked(self.locks / f"{key}.lock",
                    on_wait=lambda: log.info(f"waiting for another build that is fetching "
                                             f"{what}")):
            yield

    # Which sha256 a URL served: lets a rerun find its image without asking the network.

    def sha_for_url(self, url: str) -> str | None:
        try:
            data = json.loads((self.urls / f"{key_of(url)}.json").read_text())
        except (OSError, ValueError):
            return None
        sha = data.get("sha256") if data.get("url") == url else None
        return sha if isinstance(sha, str) else None

    def remember_url(self, url: str, sha256: str) -> None:
        write_atomic(self.urls / f"{key_of(url)}.json",
                     json.dumps({"url": url, "sha256": sha256}).encode())

    # Entries.

    def download_path(self, sha256: str, filename: str) -> Path:
        return self.downloads / sha256 / filename

    def image_path(self, sha256: str) -> Path:
        return self.images / f"{sha256}.img"

    def image(self, sha256: str) -> CachedImage | None:
        """The entry for sha256 if it is complete and unchanged since it was written.

        Cheap on purpose (no re-hashing of gigabytes): the size and modification time recorded
        when the verified image was renamed into place must still match.
        It only reads: an entry that fails the check is replaced by the next build that takes
        its lock, never removed by a look (a dry run, a build waiting for the lock).
        """
        try:
            data = json.loads(self.image_record(sha256).read_text())
            # The path is where this cache keeps the entry now, whatever it was called when
            # written: a cache reached by another path (a symlink, a moved disk) still works.
            data["path"] = self.image_path(sha256)
            entry = CachedImage(**data)
            stat = entry.path.stat()
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if (entry.sha256 != sha256 or stat.st_size != entry.raw_size
                or stat.st_mtime_ns != entry.raw_mtime_ns):
            return None
        return entry

    def image_record(self, sha256: str) -> Path:
        return self.images / f"{sha256}.json"

    def store_image(self, entry: CachedImage) -> None:
        write_atomic(self.images / f"{entry.sha256}.json",
                     json.dumps(entry.to_json(), indent=2).encode())

    def drop_download(self, sha256: str, filename: str) -> None:
        path = self.download_path(sha256, filename)
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
