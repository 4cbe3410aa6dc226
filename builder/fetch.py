"""Where the base image is fetched: resolved, downloaded, verified, decompressed and cached.

A base is one of
  - Armbian's image for the board, found in Armbian's index (`--base armbian`, the default);
  - an http(s) URL of an .img, .img.xz, .img.gz or .img.zst file (`--base URL`);
  - a local file of the same kinds (`--base PATH`); a raw .img is used in place, read-only.

A download becomes a cache entry only after its sha256 (and, with a keyring, its signature)
has been checked, and its decompressed image only once decompression finished: anything that
stops half-way leaves a `.part` to resume, or nothing.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder import log
from builder.armbian import ArmbianImage
from builder.cache import Cache, CachedImage, key_of
from builder.compression import decompress_sparse, image_suffix
from builder.download import Http, disk_full_error, forget_partial
from builder.errors import BuildError
from builder.verify import (
    BadSignature,
    check_digest,
    keyring_fingerprints,
    parse_sha_file,
    sha256_file,
    verify_signature,
)


@dataclass(frozen=True)
class BaseSource:
    """The base image a build starts from, before anything is downloaded."""

    location: str                 # URL or local path of the file as published
    filename: str
    suffix: str                   # a key of compression.COMPRESSIONS
    sha256: str | None            # expected digest, when given by the user
    sha256_url: str | None        # where the publisher's digest is, to fetch before download
    signature_url: str | None     # detached .asc, checked when a keyring is given
    size: int | None              # of the file as published, when the index says
    label: str                    # for people: "Armbian 26.5.1 trixie current minimal ..."
    armbian: ArmbianImage | None = None
    kind: str = "file"            # "file": downloaded or local; "debian": built (debian.py)

    @property
    def is_remote(self) -> bool:
        return "://" in self.location

    @property
    def used_in_place(self) -> bool:
        return self.kind == "file" and not self.is_remote and self.suffix == ".img"


def source_from_armbian(image: ArmbianImage) -> BaseSource:
    return BaseSource(
        location=image.url,
        filename=image.filename,
        suffix=image_suffix(image.filename),
        sha256=None,
        sha256_url=image.sha_url,
        signature_url=image.asc_url,
        size=image.size,
        label=image.label,
        armbian=image,
    )


def location_name(location: str) -> str:
    """The file name in a path or URL (without a URL's ?query or #fragment)."""
    if "://" in location:
        return urllib.parse.unquote(urllib.parse.urlsplit(location).path.rsplit("/", 1)[-1])
    return Path(location).name


def source_from_location(location: str, sha256: str | None) -> BaseSource:
    """A base given as --base PATH or --base URL. The file must exist now, not after a
    download or two."""
    if "://" in location:
        name = location_name(location)
        suffix = image_suffix(name)
        return BaseSource(location=location, filename=name, suffix=suffix, sha256=sha256,
                          sha256_url=None, signature_url=location + ".asc", size=None,
                          label=f"{name} from {urllib.parse.urlsplit(location).netloc}")
    path = Path(location).expanduser().absolute()
    suffix = image_suffix(path.name)
    if not path.is_file():
        raise BuildError(f"base image {path} not found: check the path given to --base")
    if not os.access(path, os.R_OK):
        raise BuildError(f"base image {path} is not readable: check its permissions")
    return BaseSource(location=str(path), filename=path.name, suffix=suffix, sha256=sha256,
                      sha256_url=None, signature_url=str(path) + ".asc",
                      size=path.stat().st_size, label=f"local file {path}")


@dataclass(frozen=True)
class Trust:
    """What a signature must be made by: any key of the user's keyring."""

    keyring: Path
    fingerprints: frozenset[str]

    @classmethod
    def load(cls, keyring: Path) -> Trust:
        return cls(keyring, frozenset(keyring_fingerprints(keyring)))

    def check_known_signer(self, fingerprint: str, filename: str) -> None:
        """A signature checked earlier was made by `fingerprint`: it verifies with this
        keyring exactly when the keyring holds that key. No file needs reading."""
        if fingerprint not in self.fingerprints:
            raise BuildError(f"signature of {filename} is by key {fingerprint}, which is not in "
                             f"{self.keyring}: add Armbian's key to the keyring "
                             f"(or check --gpg-keyring)")


def publisher_sha256(source: BaseSource, http: Http) -> str | None:
    """The digest the download must have: the user's, or the one in the publisher's .sha."""
    if source.sha256:
        return source.sha256
    if source.sha256_url:
        data = http.get_bytes(source.sha256_url, f"the checksum of {source.filename}")
        return parse_sha_file(data, source.sha256_url)
    return None


def cached_image(source: BaseSource, cache: Cache) -> CachedImage | None:
    """The cache entry a remote source produced before, found without the network."""
    digest = source.sha256 or cache.sha_for_url(source.location)
    return cache.image(digest) if digest else None


def fetch_base_image(source: BaseSource, *, cache: Cache, http: Http, trust: Trust | None,
                     offline: bool = False) -> CachedImage:
    """The verified, decompressed base image; downloaded only if the cache lacks it."""
    if source.used_in_place:
        return _use_local_raw_image(source)
    cache.prepare()
    downloaded = False
    if source.is_remote:
        entry = cached_image(source, cache)
        if entry is not None and (trust is None or entry.signature):
            if trust is not None and entry.signature:
                trust.check_known_signer(entry.signature, source.filename)
            log.info(f"base image in cache: {entry.path}")
            return entry
        if offline:
            why = "was never checked against a keyring" if entry else "is not in the cache"
            raise BuildError(f"--offline: {source.filename} {why} ({cache.root}): run once "
                             f"with network access")
        digest, compressed, signature = _download(source, cache=cache, http=http, trust=trust)
        downloaded = True
    else:
        compressed = Path(source.location)
        digest = sha256_file(compressed, source.filename)
        if source.sha256:
            check_digest(digest, source.sha256, source.filename, removed=None)
        signature = _check_local_signature(compressed, trust)
    with cache.lock(digest, source.filename):
        entry = cache.image(digest)
        if entry is None:
            if cache.image_record(digest).exists():
                log.warn(f"cached image {cache.image_path(digest)} changed since it was "
                         f"verified; making it again")
            try:
                entry = _decompress(compressed, source, digest, signature, cache)
            except BuildError as exc:
                if not downloaded:
                    raise
                # Kept, the file would fail every later build the same way.
                cache.drop_download(digest, source.filename)
                raise BuildError(f"{exc}; the download was removed, rerun to fetch it "
                                 f"again") from None
        else:
            log.info(f"base image in cache: {entry.path}")
        if signature and entry.signature != signature:
            entry = dataclasses.replace(entry, signature=signature)
            cache.store_image(entry)
    if source.is_remote:
        # Only now, with an image that decompressed, may a later build skip the network.
        cache.remember_url(source.location, digest)
    return entry


def _use_local_raw_image(source: BaseSource) -> CachedImage:
    path = Path(source.location)
    digest = sha256_file(path) if source.sha256 else ""
    if source.sha256:
        check_digest(digest, source.sha256, source.filename, removed=None)
    stat = path.stat()
    log.info(f"base image used in place (it is only read): {path}")
    return CachedImage(path=path, sha256=digest, source=str(path), filename=path.name,
                       raw_size=stat.st_size, raw_mtime_ns=stat.st_mtime_ns, signature=None)


def _check_local_signature(path: Path, trust: Trust | None) -> str | None:
    if trust is None:
        return None
    asc = path.with_name(path.name + ".asc")
    if not asc.is_file():
        raise BuildError(f"--gpg-keyring given but {asc} does not exist: put the image's "
                         f"detached signature next to it")
    return verify_signature(path, asc, trust.keyring)


def _download(source: BaseSource, *, cache: Cache, http: Http, trust: Trust | None
              ) -> tuple[str, Path, str | None]:
    """Download (or find in the cache) the file as published, check it, and move it to its
    place in the cache. Returns its sha256, its path and the signer's fingerprint when a
    signature was checked. Nothing reaches its final name before every check passed."""
    with cache.lock(key_of(source.location), source.filename):
        expected = publisher_sha256(source, http)
        if expected and cache.download_path(expected, source.filename).is_file():
            path = cache.download_path(expected, source.filename)
            log.info(f"download in cache: {path}")
            signature = None
            if trust is not None:
                signature = _check_remote_signature(
                    source, path, trust, http,
                    discard=lambda: cache.drop_download(expected, source.filename))
            return expected, path, signature
        part = cache.partial / f"{key_of(source.location)}-{source.filename}.part"
        _check_space(source, part, cache)
        if expected is None:
            log.warn(f"no checksum for {source.filename}: it cannot be verified "
                     f"(pass --base-sha256 to check it)")
        http.download(source.location, part, source.filename)
        digest = sha256_file(part, source.filename)
        if expected is not None:
            if digest != expected:
                forget_partial(part)
            check_digest(digest, expected, source.filename, removed=part)
            log.info(f"sha256 verified: {source.filename} {digest}")
        signature = None
        if trust is not None:
            signature = _check_remote_signature(source, part, trust, http,
                                                discard=lambda: forget_partial(part))
        final = cache.download_path(digest, source.filename)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
        forget_partial(part)
        return digest, final, signature


def _check_space(source: BaseSource, part: Path, cache: Cache) -> None:
    if source.size is None:
        return
    have = part.stat().st_size if part.exists() else 0
    free = shutil.disk_usage(cache.partial).free
    if free < source.size - have:
        raise BuildError(
            f"not enough space in {cache.root} to download {source.filename}: it needs "
            f"{log.human_size(source.size - have)}, {log.human_size(free)} is free; free "
            f"some space or point --cache-dir at a larger disk")


def _check_remote_signature(source: BaseSource, path: Path, trust: Trust, http: Http,
                            discard: Callable[[], None]) -> str:
    """Fetch the detached signature and check `path` with it. A file with a bad signature
    is discarded; one whose signer is merely unknown is kept (the keyring may be wrong)."""
    if not source.signature_url:
        raise BuildError(f"--gpg-keyring given but {source.filename} has no signature to check")
    signature = http.get_bytes(source.signature_url, f"the signature of {source.filename}")
    with tempfile.TemporaryDirectory(prefix="build-image-asc-") as tmp:
        asc = Path(tmp) / f"{source.filename}.asc"
        asc.write_bytes(signature)
        try:
            return verify_signature(path, asc, trust.keyring)
        except BadSignature as exc:
            discard()
            raise BuildError(f"{exc} (it was removed from the cache)") from None


def _decompress(compressed: Path, source: BaseSource, digest: str, signature: str | None,
                cache: Cache) -> CachedImage:
    """Decompress into a sparse raw image: runs of zeros are skipped, not written, so a 4 GiB
    image with 1.5 GiB of data takes 1.5 GiB of disk."""
    final = cache.image_path(digest)
    tmp = final.with_name(f".{final.name}.tmp")
    tmp.unlink(missing_ok=True)  # left by a build that was killed
    try:
        written = decompress_sparse(compressed, source.suffix, tmp, source.filename)
        if written == 0:
            raise BuildError(f"{compressed} decompressed to nothing: it is not a disk image")
        stat = tmp.stat()
        entry = CachedImage(path=final, sha256=digest, source=source.location,
                            filename=source.filename, raw_size=stat.st_size,
                            raw_mtime_ns=stat.st_mtime_ns, signature=signature)
        os.replace(tmp, final)
        cache.store_image(entry)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full_error(tmp, exc) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    log.info(f"base image ready: {final} ({log.human_size(entry.raw_size)})")
    return entry
