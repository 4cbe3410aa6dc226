"""Which Armbian image to start from, read from Armbian's download index.

The index (what Armbian Imager reads) lists one record per downloadable file. We keep the
plain images of the board (`file_extension == "img.xz"`, no `file_application` such as
Home Assistant or OMV builds) for the wanted release, branch and variant, and take the highest
`armbian_version`. The "latest" redirector is not used: some of its names map to two versions.
"""

from __future__ import annotations

import contextlib
import json
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder import log
from builder.cache import Cache, key_of, write_atomic
from builder.download import Http
from builder.errors import BuildError

ARMBIAN_HOST = "dl.armbian.com"


@dataclass(frozen=True)
class ArmbianImage:
    board: str
    version: str
    release: str
    branch: str
    variant: str
    kernel: str
    url: str
    sha_url: str
    asc_url: str
    size: int | None
    date: str
    repository: str      # archive (dl.armbian.com), community or distribution (GitHub)

    @property
    def filename(self) -> str:
        return urllib.parse.unquote(self.url.rsplit("/", 1)[-1])

    @property
    def label(self) -> str:
        return (f"Armbian {self.version} {self.release} {self.branch} {self.variant} "
                f"(kernel {self.kernel}, {self.repository})")


def version_key(version: str) -> tuple[tuple[int, ...], int, tuple[tuple[int, int | str], ...]]:
    """Order Armbian versions: 26.11.0-trunk.1 > 26.5.1, and a release (26.11.0) above the
    trunk builds that led to it, as in semantic versioning."""
    main, _, pre = version.partition("-")
    numbers = tuple(int(n) if n.isdigit() else -1 for n in main.split("."))
    pre_parts = tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.+]", pre)
                      if p)
    return numbers, 0 if pre else 1, pre_parts


def read_index(location: str, *, http: Http, cache: Cache | None, offline: bool,
               remember: bool = True) -> list[dict[str, Any]]:
    """The index's records, from a URL or a local file.

    With `remember`, a copy of what a URL served is kept in the cache; offline, that copy is
    used instead of the network.
    """
    copy = cache.index / f"{key_of(location)}.json" if cache else None
    if "://" not in location:
        path = Path(location).expanduser()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BuildError(f"Armbian index {path} cannot be read ({exc.strerror}): "
                             f"check --armbian-index") from None
    elif offline:
        if copy is None or not copy.exists():
            raise BuildError(f"--offline: no cached copy of the Armbian index {location}: "
                             f"run once with network access, or pass --armbian-index FILE")
        log.info(f"offline: using the copy of {location} cached in {copy}")
        data = copy.read_bytes()
    else:
        try:
            data = http.get_bytes(location, "the Armbian index")
        except BuildError as exc:
            hint = (" (or use --offline: a copy from an earlier run is cached)"
                    if copy and copy.exists() else "")
            raise BuildError(f"{exc}{hint}") from None
    assets = parse_index(data, location)
    if remember and copy is not None and "://" in location and not offline:
        # Remembering the index is a convenience for --offline, never a reason to fail.
        with contextlib.suppress(OSError):
            write_atomic(copy, data)
    return assets


def parse_index(data: bytes, location: str) -> list[dict[str, Any]]:
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BuildError(f"Armbian index {location} is not JSON ({exc}): is the URL right? "
                         f"It should be Armbian's armbian-images.json") from None
    assets = parsed.get("assets") if isinstance(parsed, dict) else None
    if not isinstance(assets, list):
        raise BuildError(f"Armbian index {location} has no 'assets' list: it is not Armbian's "
                         f"armbian-images.json")
    return [a for a in assets if isinstance(a, dict)]


def _plain_image(asset: dict[str, Any]) -> bool:
    return asset.get("file_extension") == "img.xz" and not asset.get("file_application")


def find_image(assets: list[dict[str, Any]], *, board: str, release: str, branch: str,
               variant: str, mirror: str | None = None) -> ArmbianImage:
    """The newest plain image of `board` for release/branch/variant, or an error that lists
    what the index does offer for that board."""
    mine = [a for a in assets if a.get("board_slug") == board and _plain_image(a)]
    if not mine:
        raise BuildError(f"Armbian's index has no images for board {board}: it may no longer be "
                         f"built; pick another board (`build-image --list-boards`)")
    wanted = [a for a in mine if (a.get("distro"), a.get("branch"), a.get("variant"))
              == (release, branch, variant)]
    if not wanted:
        offers = sorted({f"--release {a.get('distro')} --branch {a.get('branch')} "
                         f"--variant {a.get('variant')}" for a in mine})
        raise BuildError(f"no Armbian image for {board} with release {release}, branch {branch}, "
                         f"variant {variant}; the index has: {'; '.join(offers)}")
    best = max(wanted, key=lambda a: version_key(str(a.get("armbian_version", ""))))
    url = str(best.get("file_url", ""))
    if not url:
        raise BuildError(f"Armbian's index lists {board} {best.get('armbian_version')} without a "
                         f"file_url: the index is damaged; try again later")
    size = str(best.get("file_size", ""))
    return ArmbianImage(
        board=board,
        version=str(best.get("armbian_version")),
        release=release,
        branch=branch,
        variant=variant,
        kernel=str(best.get("kernel_version", "?")),
        url=use_mirror(url, mirror),
        sha_url=use_mirror(str(best.get("file_url_sha") or url + ".sha"), mirror),
        asc_url=use_mirror(str(best.get("file_url_asc") or url + ".asc"), mirror),
        size=int(size) if size.isdigit() else None,
        date=str(best.get("file_date", "")),
        repository=str(best.get("download_repository", "")),
    )


def use_mirror(url: str, mirror: str | None) -> str:
    """Point a dl.armbian.com URL at a mirror, keeping the path: with mirror
    http://10.0.0.5/armbian, https://dl.armbian.com/x/archive/f becomes
    http://10.0.0.5/armbian/x/archive/f. Other hosts (GitHub, cache.armbian.com) are kept."""
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.hostname != ARMBIAN_HOST:
        return url
    return mirror.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")
