"""Where the base image is fetched: resolved, downloaded, verified, decompressed and cached.

A base is one of
  - Armbian's image for the board, found in Armbian's index (`--base armbian`, the default);
  - an http(s) URL of an .img, .img.xz, .img.gz or .img.zst file (`--base URL`);
  - a local file of the same kinds (`--base PATH`); a raw .img is used in place, read-only.

How far it must be vouched for is base.verify (Trust.level):
  signature  (the default) a good detached signature (`<file>.asc`) by a trusted key:
             Armbian's, shipped with the builder, or one added with --gpg-keyring; a sha256
             given by the user or published in a .sha is compared too
  sha256     a digest given by the user or published by Armbian, compared
  none       nothing required; a digest that is known is still compared
Plain http is refused unless the level is lowered (check_transport), loopback excepted.

A download becomes a cache entry only after every check of its level passed, and its
decompressed image only once decompression finished: anything that stops half-way leaves a
`.part` to resume, or nothing. An entry records who signed it: one cached by a build that did
not check the signature is taken at `signature` only once its signature has been checked.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from builder import log
from builder.armbian import ArmbianImage
from builder.cache import Cache, CachedImage, key_of
from builder.compression import (
    COMPRESSIONS,
    KINDS,
    decompress_sparse,
    format_of,
    image_suffix,
)
from builder.download import Http, HttpError, disk_full_error, forget_partial
from builder.errors import BuildError
from builder.image import MIN_IMAGE_SIZE, table_label
from builder.verify import (
    ARMBIAN_KEYS,
    BadSignature,
    Keys,
    check_digest,
    known_signer,
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
    signature_url: str | None     # detached .asc, checked at base.verify signature
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
        # The signature of x.img.xz?download=1 is x.img.xz.asc?download=1.
        parts = urllib.parse.urlsplit(location)
        asc = urllib.parse.urlunsplit(parts._replace(path=parts.path + ".asc"))
        return BaseSource(location=location, filename=name, suffix=suffix, sha256=sha256,
                          sha256_url=None, signature_url=asc, size=None,
                          label=f"{name} from {parts.netloc}")
    path = Path(location).expanduser().absolute()
    if path.is_dir():
        # Before the suffix: a directory named x.img is still no image.
        raise BuildError(f"base image {path} is a directory: give the image file itself (an "
                         f"{KINDS} file)")
    suffix = image_suffix(path.name)
    if not path.is_file():
        raise BuildError(f"base image {path} not found: check the path given to --base")
    if not os.access(path, os.R_OK):
        raise BuildError(f"base image {path} is not readable: check its permissions")
    check_local_image(path, suffix)
    return BaseSource(location=str(path), filename=path.name, suffix=suffix, sha256=sha256,
                      sha256_url=None, signature_url=str(path) + ".asc",
                      size=path.stat().st_size, label=f"local file {path}")


def check_local_image(path: Path, suffix: str) -> None:
    """Refuse, before anything is verified, decompressed or cached, a local file that cannot
    be what its name says: a raw .img without a partition table (a text file, a partition
    image, a truncated download), or a compressed one whose first bytes are not its format's.
    A raw .img is used in place and was taken as it was; a wrong compressed one failed only
    in its decompressor, as "corrupt"."""
    with open(path, "rb") as f:
        head = f.read(8192)
    if suffix == ".img":
        size = path.stat().st_size
        if size < MIN_IMAGE_SIZE:
            raise BuildError(f"base image {path} is not a disk image: {size} bytes cannot hold "
                             f"a system: give the .img of a whole disk (such as Armbian's)")
        if table_label(head) is None:
            raise BuildError(f"base image {path} is not a disk image: it has no partition "
                             f"table (no MBR signature at byte 510, no GPT header at 512): give "
                             f"the .img of a whole disk (such as Armbian's), not of a partition")
        return
    found = format_of(head)
    if found == suffix:
        return
    tool = COMPRESSIONS[suffix][0]
    if found is not None:
        stem = path.name[: -len(suffix)]
        raise BuildError(f"base image {path} holds {COMPRESSIONS[found][0]} data, not {tool}: "
                         f"rename it to {stem}{found}")
    if table_label(head) is not None:
        raise BuildError(f"base image {path} is an uncompressed disk image named {suffix}: "
                         f"rename it to {path.name[: -len(suffix)]}.img")
    raise BuildError(f"base image {path} is not {tool}-compressed (its first bytes are not "
                     f"{tool}'s): give the image file itself, or download it again")


@dataclass(frozen=True)
class Trust:
    """How far the base must be vouched for (base.verify) and, at `signature`, by whose
    keys."""

    level: str                  # one of config.BASE_VERIFY_LEVELS
    keys: Keys | None = None    # at `signature`: Armbian's shipped key and the user's

    def signer_keys(self) -> Keys | None:
        """The keys a signature is checked against; None when no signature is checked."""
        if self.level != "signature":
            return None
        assert self.keys is not None, "preflight loads the keys at base.verify signature"
        return self.keys


def is_trustworthy_origin(url: str) -> bool:
    """https, or plain http to this machine. Loopback counts as a trustworthy origin (W3C
    Secure Contexts, "potentially trustworthy origin"): what travels over it never leaves the
    machine, and the tests' mirror and local caches (apt-cacher-ng, a directory served with
    python -m http.server) listen there."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return True
    host = parts.hostname or ""
    if parts.scheme != "http" or not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(url: str, what: str, level: str, user_sha256: bool) -> None:
    """Refuse plain http unless the level was lowered. Whoever is on the way of plain http
    can change what it serves: the index (which image, rolled back to an old one), the image
    and its .sha alike. A signature proves who made a file, not that it is the file the name
    promised (an older image, another board's), so even `signature` wants https. At `sha256`
    http is taken only when the user gave the digest: a .sha from the same http server
    proves nothing. `none` takes anything."""
    if "://" not in url or is_trustworthy_origin(url) or level == "none":
        return
    if level == "sha256" and user_sha256:
        return
    raise BuildError(f"{what} {url} is plain http, which anyone on the way can change: use "
                     f"https (or a server on this machine), or give the image's digest with "
                     f"--base-sha256 HEX and --base-verify sha256, or lower the check with "
                     f"--base-verify none")


@contextmanager
def refusing_plain_http_redirects(http: Http, level: str, user_sha256: bool) -> Iterator[None]:
    """While it lasts, a redirect to plain http is refused as that URL itself would be:
    https that hands over to http (Armbian's redirector sends to mirrors) is plain http."""

    def hook(response: requests.Response, *args: object, **kwargs: object) -> None:
        if response.is_redirect:
            target = urllib.parse.urljoin(response.url, response.headers["location"])
            if not is_trustworthy_origin(target):
                response.close()
                check_transport(target, f"the redirect from {response.url} to", level,
                                user_sha256)

    hooks = http.session.hooks["response"]
    hooks.append(hook)
    try:
        yield
    finally:
        hooks.remove(hook)


def check_source(source: BaseSource, level: str) -> None:
    """What can be known about the base at `level` before any of it is downloaded: every
    URL it comes from, and at `signature` a local file's .asc beside it."""
    if source.kind != "file":
        return
    urls = [("the base image at", source.location), ("its checksum at", source.sha256_url)]
    if level == "signature":
        urls.append(("its signature at", source.signature_url))
    for what, url in urls:
        if url:
            check_transport(url, what, level, bool(source.sha256))
    if level == "sha256" and not (source.sha256 or source.sha256_url):
        raise BuildError(f"--base-verify sha256 needs the digest of {source.filename}: pass "
                         f"--base-sha256 HEX")
    if level == "signature" and not source.is_remote:
        _local_signature_path(source)


def _local_signature_path(source: BaseSource) -> Path:
    asc = Path(source.signature_url or f"{source.location}.asc")
    if not asc.is_file():
        raise BuildError(f"{source.location} is not signed: there is no {asc}, and an unsigned "
                         f"image is refused: put its detached signature there (by Armbian's key "
                         f"or one added with --gpg-keyring FILE), or lower the check with "
                         f"--base-verify sha256 (and --base-sha256 HEX)")
    return asc


@dataclass(frozen=True)
class Provenance:
    """How the base image was vouched for, for the manifest."""

    level: str                    # base.verify
    source: str                   # URL or path
    sha256: str | None
    # "user" (--base-sha256), "publisher" (its .sha), "cache" (the digest an earlier build
    # cached it under, having checked it), "computed" (nothing to compare it with), or
    # "not computed" (a raw image read in place)
    sha256_from: str
    sha256_url: str | None        # the publisher's .sha, when read
    signer: str | None            # primary key fingerprint, when a signature was checked
    signature_url: str | None     # the .asc checked
    from_cache: bool

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["signer_name"] = ARMBIAN_KEYS.get(self.signer or "")
        return data


@dataclass(frozen=True)
class VerifiedImage(CachedImage):
    """A base image and how it was vouched for. Never stored: the cache keeps CachedImage."""

    provenance: Provenance | None = None


def _verified(entry: CachedImage, provenance: Provenance) -> VerifiedImage:
    fields = {f.name: getattr(entry, f.name) for f in dataclasses.fields(CachedImage)}
    return VerifiedImage(**fields, provenance=provenance)


def manifest_record(source: BaseSource, base: CachedImage) -> dict[str, Any]:
    """The manifest's `base`: what the build started from and how it was vouched for
    (`verified`, absent for a base built here, such as --base debian)."""
    record: dict[str, Any] = {"label": source.label, "url": source.location,
                              "sha256": base.sha256 or None, "signature": base.signature}
    if isinstance(base, VerifiedImage) and base.provenance is not None:
        record["verified"] = base.provenance.to_json()
    return record


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


def fetch_base_image(source: BaseSource, *, cache: Cache, http: Http, trust: Trust,
                     offline: bool = False) -> VerifiedImage:
    """The verified, decompressed base image; downloaded only if the cache lacks it."""
    if source.used_in_place:
        return _use_local_raw_image(source, trust)
    cache.prepare()
    downloaded = False
    if source.is_remote:
        entry = cached_image(source, cache)
        if entry is not None and _good_enough(entry, source, trust):
            log.info(f"base image in cache: {entry.path}")
            return _verified(entry, _provenance(
                source, trust, entry.sha256, "user" if source.sha256 else "cache",
                entry.signature, from_cache=True))
        if offline:
            if entry is None:
                raise BuildError(f"--offline: {source.filename} is not in the cache "
                                 f"({cache.root}): run once with network access")
            raise BuildError(f"--offline: {source.filename} was cached by a build that did not "
                             f"check its signature ({cache.root}): run once with network access "
                             f"to check it, or lower the check with --base-verify sha256")
        with refusing_plain_http_redirects(http, trust.level, bool(source.sha256)):
            fetched = _download(source, cache=cache, http=http, trust=trust)
        digest, compressed, signature = fetched.digest, fetched.path, fetched.signer
        sha256_from = fetched.sha256_from
        downloaded = True
    else:
        compressed = Path(source.location)
        signature = _check_local_signature(source, compressed, trust)
        digest = sha256_file(compressed, source.filename)
        sha256_from = "computed"
        if source.sha256:
            check_digest(digest, source.sha256, source.filename, removed=None)
            sha256_from = "user"
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
    if source.is_remote and (signature or sha256_from != "computed"):
        # Only now, with an image that decompressed, may a later build skip the network; and
        # only for a digest something vouched for, so that no later build takes a download
        # nothing checked for a checked one.
        cache.remember_url(source.location, digest)
    return _verified(entry, _provenance(source, trust, digest, sha256_from, signature,
                                        from_cache=False))


def _good_enough(entry: CachedImage, source: BaseSource, trust: Trust) -> bool:
    """Whether a cache entry satisfies the level without another look at the network. At
    `signature` it must have been signed by a key trusted now; one cached without a checked
    signature has its signature checked first."""
    keys = trust.signer_keys()
    if keys is None:
        return True
    if not entry.signature:
        return False
    keys.check_known_signer(entry.signature, f"{source.filename} (cached)")
    return True


def _provenance(source: BaseSource, trust: Trust, digest: str | None, sha256_from: str,
                signer: str | None, *, from_cache: bool) -> Provenance:
    return Provenance(
        level=trust.level, source=source.location, sha256=digest or None,
        sha256_from=sha256_from,
        sha256_url=source.sha256_url if sha256_from == "publisher" else None,
        signer=signer, signature_url=source.signature_url if signer else None,
        from_cache=from_cache)


def _use_local_raw_image(source: BaseSource, trust: Trust) -> VerifiedImage:
    path = Path(source.location)
    signature = _check_local_signature(source, path, trust)
    digest = sha256_file(path) if source.sha256 else ""
    if source.sha256:
        check_digest(digest, source.sha256, source.filename, removed=None)
    stat = path.stat()
    log.info(f"base image used in place (it is only read): {path}")
    entry = CachedImage(path=path, sha256=digest, source=str(path), filename=path.name,
                        raw_size=stat.st_size, raw_mtime_ns=stat.st_mtime_ns,
                        signature=signature)
    return _verified(entry, _provenance(
        source, trust, digest, "user" if source.sha256 else "not computed", signature,
        from_cache=False))


def _check_local_signature(source: BaseSource, path: Path, trust: Trust) -> str | None:
    keys = trust.signer_keys()
    if keys is None:
        return None
    asc = _local_signature_path(source)
    try:
        return verify_signature(path, asc, keys, source.filename)
    except BadSignature as exc:
        raise BuildError(f"{exc}; {asc} is not its signature, or the file was changed: do "
                         f"not use it, or if you know it is right, lower the check with "
                         f"--base-verify sha256 (and --base-sha256 HEX)") from None


@dataclass(frozen=True)
class _Fetched:
    digest: str
    path: Path
    signer: str | None
    sha256_from: str


def _download(source: BaseSource, *, cache: Cache, http: Http, trust: Trust) -> _Fetched:
    """Download (or find in the cache) the file as published, check it, and move it to its
    place in the cache. Nothing reaches its final name before every check passed, and what
    can be checked before the download (the .sha is there, the image is signed, by a key
    trusted) is checked before it."""
    with cache.lock(key_of(source.location), source.filename):
        expected, sha256_from = _expected_sha256(source, http, trust.level)
        signature = _fetch_signature(source, http, trust)
        # A download checked before is found by the digest its URL served then.
        known = expected or cache.sha_for_url(source.location)
        if known and cache.download_path(known, source.filename).is_file():
            path = cache.download_path(known, source.filename)
            log.info(f"download in cache: {path}")
            signer = None
            if signature is not None:
                signer = _check_signature(
                    source, path, signature, trust,
                    discard=lambda: cache.drop_download(known, source.filename))
            return _Fetched(known, path, signer, sha256_from if expected else "cache")
        part = cache.partial / f"{key_of(source.location)}-{source.filename}.part"
        _check_space(source, part, cache)
        if expected is None and signature is None:
            log.warn(f"no checksum for {source.filename}: nothing checks it (base.verify is "
                     f"{trust.level}; pass --base-sha256 to check it)")
        http.download(source.location, part, source.filename)
        digest = sha256_file(part, source.filename)
        if expected is not None:
            if digest != expected:
                forget_partial(part)
            check_digest(digest, expected, source.filename, removed=part)
            log.info(f"sha256 verified: {source.filename} {digest}")
        signer = None
        if signature is not None:
            signer = _check_signature(source, part, signature, trust,
                                      discard=lambda: forget_partial(part))
        final = cache.download_path(digest, source.filename)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
        forget_partial(part)
        return _Fetched(digest, final, signer, sha256_from)


def _expected_sha256(source: BaseSource, http: Http, level: str) -> tuple[str | None, str]:
    """The digest the download must have and where it comes from: the user's, or the one in
    the publisher's .sha. A .sha the index names but the server lacks stops the build unless
    the level is `none`: something is wrong at the publisher."""
    if source.sha256:
        return source.sha256, "user"
    if not source.sha256_url:
        return None, "computed"
    try:
        return publisher_sha256(source, http), "publisher"
    except HttpError as exc:
        if exc.status != 404 or level != "none":
            raise
    log.warn(f"no checksum published for {source.filename} ({source.sha256_url}: HTTP 404)")
    return None, "computed"


def _fetch_signature(source: BaseSource, http: Http, trust: Trust) -> bytes | None:
    """At `signature`, the image's detached signature, fetched before the image: an unsigned
    image, or one signed by a key not trusted, is refused before gigabytes are downloaded."""
    keys = trust.signer_keys()
    if keys is None:
        return None
    url = source.signature_url
    assert url, "a downloaded source names where its signature is"
    try:
        data = http.get_bytes(url, f"the signature of {source.filename}", limit=1 << 20)
    except HttpError as exc:
        if exc.status not in (404, 410):
            raise
        raise BuildError(f"{source.filename} is not signed: {url} answered HTTP {exc.status}, "
                         f"and an unsigned image is refused: publish its detached signature "
                         f"there (by Armbian's key or one added with --gpg-keyring FILE), or "
                         f"lower the check with --base-verify sha256") from None
    with tempfile.TemporaryDirectory(prefix="build-image-asc-") as tmp:
        asc = Path(tmp) / f"{source.filename}.asc"
        asc.write_bytes(data)
        known_signer(asc, keys, source.filename)
    return data


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


def _check_signature(source: BaseSource, path: Path, signature: bytes, trust: Trust,
                     discard: Callable[[], None]) -> str:
    """Check `path` with its detached signature. A file with a bad signature is discarded;
    one whose signer is merely unknown is kept (the keys may be what is wrong)."""
    keys = trust.signer_keys()
    assert keys is not None
    with tempfile.TemporaryDirectory(prefix="build-image-asc-") as tmp:
        asc = Path(tmp) / f"{source.filename}.asc"
        asc.write_bytes(signature)
        try:
            return verify_signature(path, asc, keys, source.filename)
        except BadSignature as exc:
            discard()
            raise BuildError(f"{exc}; it was removed from the cache: rerun to download it "
                             f"again (if the publisher's .asc is stale, --base-verify sha256 "
                             f"skips the signature)") from None


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
