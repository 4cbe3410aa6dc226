"""The dry run's plan: what a build would do, from facts only. The index and the publisher's
checksum are read (not with --offline); nothing is downloaded, written or changed.

It shows the board and the base image, how the image is verified and whether it is cached,
the settings that differ from defaults.yaml and where each was given, the preseed's keys
(never its values), the output files and their compression, the room needed on each disk,
and the steps, with the scripts, where the overlays go, and where the step cache would let
the build start.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder import customize, debian, fetch, log, output
from builder.cache import CachedImage
from builder.config import DEFAULTS_NAME, Config, leaves, load_config
from builder.errors import BuildError
from builder.firstboot.answers import KEYS, preseed_keys
from builder.preflight import Checked, Room, customize_order, room_needed, user_dir

if TYPE_CHECKING:
    from builder.pipeline import Context


@dataclass(frozen=True)
class StageForecast:
    """Where the step cache would let a build start: after `script` (None: from the first
    script), or why it cannot be told before the build."""

    script: str | None = None
    note: str = ""


def print_plan(ctx: Context, checked: Checked, source: fetch.BaseSource,
               steps: Sequence[tuple[str, str]], entry: CachedImage | None,
               forecast: StageForecast) -> list[Room]:
    """What a build would do: the facts, then every step in the order it runs, with the
    scripts and where the overlays go among them. Returns the room needed, for the caller
    to refuse a disk too small once the plan is shown."""
    cfg = ctx.config
    board = ctx.board
    sha256, sha_note = plan_sha256(ctx, source, entry)
    level, signature = plan_verification(checked.trust, source)
    rooms = room_needed(cfg, ctx.cache.root, entry.raw_size if entry else None)
    rows = [
        ("board", f"{board.id}: {board.name}, {board.soc}, {board.arch}, family {board.family}, "
                  f"{board.support} support"),
        ("consoles", ", ".join(f"{c.device} at {c.baud} baud" for c in board.consoles)),
        ("base image", source.label),
        ("from", source.location),
        ("download", _download_size(source)),
        ("sha256", f"{sha256 or 'unknown'} ({sha_note})"),
        ("verify", level),
        ("signature", signature),
        ("cache", cache_status(ctx, source, entry)),
        ("settings", settings_rows(cfg)),
        ("preseed", preseed_row(cfg)),
        ("output", output_rows(cfg, board.id)),
        ("compressed", compression_row(cfg)),
        ("disk space", [_room_row(room, entry is not None) for room in rooms]),
    ]
    width = max(len(k) for k, _ in rows)
    log.result("Plan (dry run: nothing is downloaded or changed)")
    for key, value in rows:
        lines = value if isinstance(value, list) else [value]
        for number, line in enumerate(lines or ["-"]):
            log.result(f"  {(key if number == 0 else '').ljust(width)}  {line}")
    log.result("  steps:")
    for number, (name, summary) in enumerate(steps, 1):
        log.result(f"  {number:>3}. {name.ljust(20)} {summary}")
        if name == "customize-image":
            for line in _script_lines(checked, forecast):
                log.result(f"         {line}")
    return rooms


def settings_rows(cfg: Config) -> list[str]:
    """Each setting whose value is not defaults.yaml's, with where it was given last."""
    defaults = leaves(load_config().to_dict())
    rows = []
    for key, value in leaves(cfg.to_dict()).items():
        if key in defaults and defaults[key] == value:
            continue
        origin = cfg.origins.get(key, DEFAULTS_NAME)
        shown = "(given)" if key in SECRET_SETTINGS else _show(value)
        rows.append(f"{key} = {shown}  ({'--set' if origin == '--set' else origin})")
    return rows or [f"all as in {DEFAULTS_NAME}"]


# Settings whose values a plan does not print (a proxy URL may carry a password).
SECRET_SETTINGS = frozenset({"apt.proxy"})


def preseed_row(cfg: Config) -> str:
    if not cfg.firstboot.preseed:
        return ("none in the image: each card asks on its serial console, or takes its setup "
                "drive's file or flash-image's settings")
    path = Path(cfg.firstboot.preseed)
    given = preseed_keys(path.read_text(encoding="utf-8-sig", errors="replace"))
    keys = ", ".join(key for key in KEYS if key in given) or "no settings"
    return f"{path}: {keys} (values not shown; every card from this image gets them)"


def output_rows(cfg: Config, board: str) -> list[str]:
    directory = user_dir(cfg.output.dir)
    name = output.build_name(cfg.output.product, board, cfg.base.release,
                             datetime.date.today())
    image, *others = output.output_suffixes(cfg.image.compression)
    handed = " (the built-in scripts: .requirements.txt)" if cfg.customize.builtin else ""
    return [f"{directory / name}{image}",
            f"with {', '.join(others)} beside it (dated the day it is built), and the files "
            f"the scripts hand over{handed}"]


def compression_row(cfg: Config) -> str:
    kind = cfg.image.compression
    if kind == "none":
        return "none: the raw image (as large as the disk it holds)"
    cores = ", on every core" if kind in ("xz", "zstd") else ""
    return f"{kind}, level {cfg.image.compression_level}{cores}"


def _room_row(room: Room, known: bool) -> str:
    guess = "" if known else " (the base's size guessed until it is downloaded)"
    verdict = "" if room.enough else f": NOT ENOUGH, free some or use {room.fix}"
    return (f"{room.what}: about {log.human_size(room.need)} in {room.path}, "
            f"{log.human_size(room.free)} free{guess}{verdict}")


def _download_size(source: fetch.BaseSource) -> str:
    if source.kind == "debian":
        return "Debian packages for debootstrap (the base is built, not downloaded)"
    if not source.size:
        return "size unknown"
    what = "the file, read in place" if source.used_in_place else \
        f"{source.suffix} as published, compressed" if source.is_remote else \
        f"{source.suffix} file, decompressed into the cache"
    return f"{log.human_size(source.size)} ({what})"


def _script_lines(checked: Checked, forecast: StageForecast) -> list[str]:
    """The scripts and the overlays in their order; those the step cache would let the build
    skip are marked, and those whose result is kept in it."""
    lines = []
    order = customize_order(checked.scripts)
    names = [item if isinstance(item, str) else item.name for item in order]
    skipped = names.index(forecast.script) + 1 if forecast.script in names else 0
    for position, item in enumerate(order):
        name = names[position]
        notes = []
        if position < skipped:
            notes.append("from the step cache")
        if isinstance(item, customize.Script) and item.keep:
            notes.append("kept in the step cache")
        lines.append(f"{name}{'  (' + '; '.join(notes) + ')' if notes else ''}")
    lines.append(f"step cache: {forecast.note}")
    return lines


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "null" if value is None else str(value)


def cached_base(ctx: Context, source: fetch.BaseSource) -> CachedImage | None:
    """The base image's entry in the cache, if a build would find one there."""
    if source.kind == "debian":
        return ctx.cache.image(debian.cache_key(ctx.board, ctx.config.base.release,
                                                ctx.config.base.debian_mirror))
    if source.used_in_place or not source.is_remote:
        return None
    return fetch.cached_image(source, ctx.cache)


def plan_sha256(ctx: Context, source: fetch.BaseSource,
                entry: CachedImage | None) -> tuple[str | None, str]:
    """The digest the plan shows and where it comes from. A checksum that cannot be fetched
    is shown as such: a plan still helps without it."""
    if source.kind == "debian":
        return (debian.cache_key(ctx.board, ctx.config.base.release,
                                 ctx.config.base.debian_mirror),
                "cache key of the Debian base's recipe")
    if source.used_in_place:
        note = "given with --base-sha256" if source.sha256 else "not checked (read in place)"
        return source.sha256, note
    if entry is not None:
        return entry.sha256, "as verified before, from the cache"
    if source.sha256:
        return source.sha256, "given with --base-sha256"
    if source.sha256_url:
        if ctx.options.offline:
            return None, f"not read (--offline): {source.sha256_url}"
        try:
            return fetch.publisher_sha256(source, ctx.http), f"from {source.sha256_url}"
        except BuildError as exc:
            return None, f"could not be read: {exc}"
    return None, "computed on use; nothing to check it against (pass --base-sha256)"


def plan_verification(trust: fetch.Trust, source: fetch.BaseSource) -> tuple[str, str]:
    """The plan's `verify` and `signature` rows: the level and what it will check."""
    if source.kind == "debian":
        return ("base.verify does not apply: built here by debootstrap from Debian's archive",
                "not applicable")
    keys = trust.signer_keys()
    if keys is not None:
        return ("signature: a good OpenPGP signature by a trusted key is required; the "
                "sha256 is compared too when known",
                f"{source.signature_url}, checked against {keys.describe()}")
    if trust.level == "sha256":
        return ("sha256 (lowered): only the sha256 is compared; the signature is not checked",
                "not checked (base.verify is sha256)")
    return ("none (lowered): nothing is required; a digest given or published is still "
            "compared", "not checked (base.verify is none)")


def cache_status(ctx: Context, source: fetch.BaseSource, entry: CachedImage | None) -> str:
    if source.used_in_place:
        return "not used: the local raw image is read in place"
    if source.kind == "debian" and entry is None:
        return f"not cached: will build it (debootstrap, kernel; minutes) into {ctx.cache.root}"
    if entry is not None:
        return f"cached: {entry.path} (no download)"
    size = f" {log.human_size(source.size)}" if source.size else ""
    if source.is_remote:
        return f"not cached: will download{size} into {ctx.cache.root}"
    return f"not cached: will decompress{size} into {ctx.cache.root}"
