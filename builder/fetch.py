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
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from builder import log
from builder.armbian import ArmbianImage
from builder.cache import Cache, CachedImage, key_of
from builder.download import Http, disk_full_error
from builder.errors import BuildError
from builder.run import spawn
from builder.verify import check_digest, parse_sha_file, sha256_file, verify_signature

# File suffix → decompressing command (reads stdin, writes stdout). Separate processes, not
# Python's lzma: xz decompresses the multi-block files Armbian publishes on every core.
COMPRESSIONS: dict[str, list[str]] = {
    ".img.xz": ["xz", "--decompress", "--stdout", "--threads=0"],
    ".img.gz": ["gzip", "--decompress", "--stdout"],
    ".img.zst": ["zstd", "--decompress", "--stdout", "--quiet"],
    ".img": ["cat"],
}


@dataclass(frozen=True)
class BaseSource:
    """The base image a build starts from, before anything is downloaded."""

    location: str                 # URL or local path of the file as published
    filename: str
    suffix: str                   # a key of COMPRESSIONS
    sha256: str | None            # expected digest, when given by the user
    sha256_url: str | None        # where the publisher's digest is, to fetch before download
    signature_url: str | None     # detached .asc, checked when a keyring is given
    size: int | None              # of the file as published, when the index says
    label: str                    # for people: "Armbian 26.5.1 trixie current minimal ..."
    armbian: ArmbianImage | None = None

    @property
    def is_remote(self) -> bool:
        return "://" in self.location

    @property
    def used_in_place(self) -> bool:
        return not self.is_remote and self.suffix == ".img"


def image_suffix(name: str) -> str:
    lowered = name.lower()
    for suffix in sorted(COMPRESSIONS, key=len, reverse=True):
        if lowered.endswith(suffix):
            return suffix
    raise BuildError(
        f"base image {name!r} is not an .img, .img.xz, .img.gz or .img.zst file: "
        f"give --base armbian, or a path or URL to a disk image"
    )


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


def source_from_location(location: str, sha256: str | None) -> BaseSource:
    """A base given as --base PATH or --base URL. The file must exist now, not after a
    download or two."""
    if "://" in location:
        name = urllib.parse.unquote(urllib.parse.urlsplit(location).path.rsplit("/", 1)[-1])
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


def expected_sha256(source: BaseSource, http: Http, cache: Cache | None) -> str | None:
    """The digest the download must have: the user's, the one a URL served before (from the
    cache, no network), or the publisher's .sha file."""
    if source.sha256:
        return source.sha256
    if cache is not None and source.is_remote:
        known = cache.sha_for_url(source.location)
        if known:
            return known
    if source.sha256_url:
        data = http.get_bytes(source.sha256_url, f"the checksum of {source.filename}")
        return parse_sha_file(data, source.sha256_url)
    return None


def fetch_base_image(source: BaseSource, *, cache: Cache, http: Http,
                     keyring: Path | None) -> CachedImage:
    """The verified, decompressed base image; downloaded only if the cache lacks it."""
    if source.used_in_place:
        return _use_local_raw_image(source)
    cache.prepare()
    if source.is_remote:
        digest, download, signature = _download(source, cache=cache, http=http, keyring=keyring)
    else:
        download = Path(source.location)
        digest = sha256_file(download, source.filename)
        if source.sha256:
            check_digest(digest, source.sha256, source.filename, removed=None)
        signature = _check_local_signature(download, keyring)
    with cache.lock(digest, source.filename):
        entry = cache.image(digest)
        if entry is None:
            entry = _decompress(download, source, digest, signature, cache)
        else:
            log.info(f"base image in cache: {entry.path}")
        if signature and entry.signature != signature:
            entry = dataclasses.replace(entry, signature=signature)
            cache.store_image(entry)
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


def _check_local_signature(path: Path, keyring: Path | None) -> str | None:
    if keyring is None:
        return None
    asc = path.with_name(path.name + ".asc")
    if not asc.is_file():
        raise BuildError(f"--gpg-keyring given but {asc} does not exist: put the image's "
                         f"detached signature next to it")
    return verify_signature(path, asc, keyring)


def _download(source: BaseSource, *, cache: Cache, http: Http, keyring: Path | None
              ) -> tuple[str, Path, str | None]:
    """Download (or find in the cache) the file as published; return its sha256, its path in
    the cache and the fingerprint of its signature when one was checked."""
    url = source.location
    known = source.sha256 or cache.sha_for_url(url)
    if known:
        entry = cache.image(known)
        if entry is not None and (keyring is None or entry.signature):
            return known, cache.download_path(known, source.filename), entry.signature
    with cache.lock(key_of(url), source.filename):
        expected = expected_sha256(source, http, cache)
        if expected and cache.download_path(expected, source.filename).is_file():
            path = cache.download_path(expected, source.filename)
            log.info(f"download in cache: {path}")
            digest = expected
        else:
            digest, path = _download_and_check(source, expected, cache=cache, http=http)
        signature = None
        if keyring is not None:
            signature = _fetch_and_verify_signature(source, path, keyring, http, cache, digest)
        cache.remember_url(url, digest)
    return digest, path, signature


def _download_and_check(source: BaseSource, expected: str | None, *, cache: Cache,
                        http: Http) -> tuple[str, Path]:
    part = cache.partial / f"{key_of(source.location)}-{source.filename}.part"
    if expected is None:
        log.warn(f"no checksum for {source.filename}: it cannot be verified "
                 f"(pass --base-sha256 to check it)")
    if source.size is not None:
        have = part.stat().st_size if part.exists() else 0
        free = shutil.disk_usage(cache.partial).free
        if free < source.size - have:
            raise BuildError(
                f"not enough space in {cache.root} to download {source.filename}: it needs "
                f"{log.human_size(source.size - have)}, {log.human_size(free)} is free; free "
                f"some space or point --cache-dir at a larger disk")
    http.download(source.location, part, source.filename)
    digest = sha256_file(part, source.filename)
    if expected is not None and digest != expected:
        part.unlink(missing_ok=True)
        check_digest(digest, expected, source.filename, removed=part)
    final = cache.download_path(digest, source.filename)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, final)
    log.info(f"sha256 verified: {source.filename} {digest}")
    return digest, final


def _fetch_and_verify_signature(source: BaseSource, path: Path, keyring: Path, http: Http,
                                cache: Cache, digest: str) -> str:
    if not source.signature_url:
        raise BuildError(f"--gpg-keyring given but {source.filename} has no signature to check")
    asc = path.with_name(path.name + ".asc")
    asc_tmp = asc.with_name(asc.name + ".tmp")
    asc_tmp.write_bytes(http.get_bytes(source.signature_url,
                                       f"the signature of {source.filename}"))
    try:
        fingerprint = verify_signature(path, asc_tmp, keyring)
    except BuildError:
        # A file that fails its signature must not be reused by a later build.
        path.unlink(missing_ok=True)
        cache.drop_image(digest)
        raise
    finally:
        asc_tmp.unlink(missing_ok=True)
    return fingerprint


ZEROS = bytes(1 << 20)


def _decompress(compressed: Path, source: BaseSource, digest: str, signature: str | None,
                cache: Cache) -> CachedImage:
    """Decompress into a sparse raw image: runs of zeros are skipped, not written, so a 4 GiB
    image with 1.5 GiB of data takes 1.5 GiB of disk."""
    final = cache.image_path(digest)
    tmp = final.with_name(f".{final.name}.tmp")
    tmp.unlink(missing_ok=True)  # left by a build that was killed
    size = compressed.stat().st_size
    try:
        with open(compressed, "rb") as src, open(tmp, "wb") as out, \
                log.progress(f"decompressing {source.filename}", size) as bar, \
                spawn(COMPRESSIONS[source.suffix], stdin=src,
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
                # The decompressor shares our file description of src, so its read position
                # is how far it has come.
                position = os.lseek(src.fileno(), 0, os.SEEK_CUR)
                bar.update(position - seen)
                seen = position
            out.truncate(written)
            out.flush()
            os.fsync(out.fileno())
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
