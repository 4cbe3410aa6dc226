"""The build, step by step. Each step is a function of the build context, run in this order:

    check_host          everything that can be checked before the first download
    resolve_base_image  which file to start from (Armbian's index, or --base PATH/URL)
    fetch_base_image    download, verify and decompress it into the cache  (fetch.py)

The image engine (mount, customize.d, overlays, output) comes after fetch_base_image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder import armbian, fetch, log
from builder.boards import Board
from builder.cache import Cache, CachedImage
from builder.config import Config
from builder.download import Http
from builder.errors import BuildError
from builder.run import require_programs


@dataclass(frozen=True)
class Options:
    """How this run behaves, as opposed to what it builds (that is Config)."""

    dry_run: bool = False
    fetch_only: bool = False
    offline: bool = False


@dataclass
class Context:
    """What changes while a build runs. Config stays frozen; this fills in step by step."""

    config: Config
    options: Options
    board: Board
    cache: Cache
    http: Http
    trust: fetch.Trust | None = None
    source: fetch.BaseSource | None = None
    base: CachedImage | None = None


@dataclass(frozen=True)
class Step:
    name: str
    summary: str
    run: Callable[[Context], None]


def check_host(ctx: Context) -> None:
    base = ctx.config.base
    if base.gpg_keyring:
        keyring = Path(base.gpg_keyring).expanduser().absolute()
        if not keyring.is_file():
            raise BuildError(f"GPG keyring {keyring} not found: check --gpg-keyring "
                             f"(export Armbian's key with gpg --export KEYID > FILE)")
        require_programs("gpg", "gpgv")
        ctx.trust = fetch.Trust.load(keyring)
    suffix = (".img.xz" if base.source == "armbian"
              else fetch.image_suffix(fetch.location_name(base.source)))
    require_programs(fetch.COMPRESSIONS[suffix][0])
    if ctx.board.support in ("eos", "wip", "tvbox"):
        log.warn(f"{ctx.board.id} has support status '{ctx.board.support}' at Armbian: "
                 f"images may be missing or broken")


def resolve_base_image(ctx: Context) -> None:
    base = ctx.config.base
    if base.source != "armbian":
        ctx.source = fetch.source_from_location(base.source, base.sha256)
        return
    # A dry run reads the cache if there is one but changes nothing in it.
    if not ctx.options.dry_run:
        ctx.cache.prepare()
    assets = armbian.read_index(base.armbian_index, http=ctx.http, cache=ctx.cache,
                                offline=ctx.options.offline, remember=not ctx.options.dry_run)
    image = armbian.find_image(assets, board=ctx.board.id, release=base.release,
                               branch=base.branch, variant=base.variant,
                               mirror=base.armbian_mirror)
    source = fetch.source_from_armbian(image)
    if base.sha256:
        source = fetch.BaseSource(**{**source.__dict__, "sha256": base.sha256})
    ctx.source = source
    log.info(f"base image: {image.label}")


def fetch_base_image(ctx: Context) -> None:
    assert ctx.source is not None
    ctx.base = fetch.fetch_base_image(ctx.source, cache=ctx.cache, http=ctx.http,
                                      trust=ctx.trust, offline=ctx.options.offline)


# Steps that only look: a dry run runs these, then prints the plan.
PLAN_STEPS: tuple[Step, ...] = (
    Step("check-host", "check host tools, keyring and settings before any download", check_host),
    Step("resolve-base-image", "find the base image (Armbian's index or --base)",
         resolve_base_image),
)
# Steps that download or change something.
BUILD_STEPS: tuple[Step, ...] = (
    Step("fetch-base-image", "download, verify (sha256, signature) and decompress into the cache",
         fetch_base_image),
)
STEPS = PLAN_STEPS + BUILD_STEPS


def run_build(ctx: Context) -> None:
    for step in PLAN_STEPS:
        log.debug(f"step {step.name}")
        step.run(ctx)
    if ctx.options.dry_run:
        print_plan(ctx)
        return
    for step in BUILD_STEPS:
        log.debug(f"step {step.name}")
        step.run(ctx)
    assert ctx.base is not None
    if ctx.options.fetch_only:
        log.result(str(ctx.base.path))
        return
    log.info("the image engine (mount, customize.d, overlays, output) is not part of this "
             "version yet: the build stops with the verified base image")
    log.result(str(ctx.base.path))


def _plan_sha256(ctx: Context) -> tuple[str | None, str, CachedImage | None]:
    """The digest the plan shows, where it comes from, and the cache entry if there is one.
    A checksum that cannot be fetched is shown as such: a plan still helps without it."""
    source = ctx.source
    assert source is not None
    if source.used_in_place:
        note = "given with --base-sha256" if source.sha256 else "not checked (read in place)"
        return source.sha256, note, None
    entry = fetch.cached_image(source, ctx.cache) if source.is_remote else None
    if entry is not None:
        return entry.sha256, "as verified before, from the cache", entry
    if source.sha256:
        return source.sha256, "given with --base-sha256", None
    if source.sha256_url:
        try:
            return fetch.publisher_sha256(source, ctx.http), f"from {source.sha256_url}", None
        except BuildError as exc:
            return None, f"could not be read: {exc}", None
    return None, "computed on use; nothing to check it against (pass --base-sha256)", None


def _cache_status(ctx: Context, entry: CachedImage | None) -> str:
    source = ctx.source
    assert source is not None
    if source.used_in_place:
        return "not used: the local raw image is read in place"
    if entry is not None:
        return f"cached: {entry.path} (no download)"
    size = f" {log.human_size(source.size)}" if source.size else ""
    if source.is_remote:
        return f"not cached: will download{size} into {ctx.cache.root}"
    return f"not cached: will decompress{size} into {ctx.cache.root}"


def print_plan(ctx: Context) -> None:
    """What a build would do, from facts only: the index and checksum are read, the image
    itself is not downloaded, nothing is written."""
    source = ctx.source
    assert source is not None
    board = ctx.board
    sha256, sha_note, entry = _plan_sha256(ctx)
    if ctx.trust is not None:
        signature = f"checked against {ctx.trust.keyring} ({source.signature_url})"
    else:
        signature = "not checked (pass --gpg-keyring FILE to check it)"
    rows = [
        ("board", f"{board.id}: {board.name}, {board.soc}, {board.arch}, family {board.family}, "
                  f"{board.support} support"),
        ("consoles", ", ".join(f"{c.device} at {c.baud} baud" for c in board.consoles)),
        ("base image", source.label),
        ("from", source.location),
        ("size", log.human_size(source.size) if source.size else "unknown"),
        ("sha256", f"{sha256 or 'unknown'} ({sha_note})"),
        ("signature", signature),
        ("cache", _cache_status(ctx, entry)),
    ]
    width = max(len(k) for k, _ in rows)
    log.result("Plan (dry run: nothing is downloaded or changed)")
    for key, value in rows:
        log.result(f"  {key.ljust(width)}  {value}")
    log.result("  steps:")
    for number, step in enumerate(STEPS, 1):
        log.result(f"    {number}. {step.name.ljust(20)} {step.summary}")
