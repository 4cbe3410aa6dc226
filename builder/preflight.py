"""Before the first download: everything a build can check, the base image it starts from,
and the plan a dry run prints.

check_host       how the base will be verified (base.verify: plain http, gpg, the keys),
                 host tools, root, emulation, the scripts and templates (each rendered
                 once), the preseed, free space, wheels for packages.pip
resolve_base     which file the build starts from: Armbian's index, --base debian, a path
                 or URL
print_plan       what a build would do, from facts only (the index and the checksum are
                 read; nothing is downloaded or written)
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from builder import armbian, compression, customize, debian, fetch, log, output, verify, wheels
from builder.cache import CachedImage
from builder.chroot import QEMU, Emulation, binfmt_status, choose_emulation, static_qemu
from builder.config import Config
from builder.errors import BuildError
from builder.firstboot.card import Settings
from builder.mount import is_root
from builder.preseed import load_preseed
from builder.run import require_programs

if TYPE_CHECKING:
    # The steps' shared context; pipeline.py imports this module to run its first steps.
    from builder.pipeline import Context


@dataclass(frozen=True)
class Checked:
    """What check_host found, for the steps after it."""

    scripts: tuple[customize.Script, ...]
    overlay_dirs: tuple[Path, ...]
    rendered: Mapping[Path, str]
    trust: fetch.Trust
    emulation: Emulation | None


def check_host(ctx: Context) -> Checked:
    cfg = ctx.config
    base = cfg.base
    emulation = None
    trust = check_verification(ctx)
    if base.source == "debian":
        debian.supported(ctx.board, base.release)
        if not ctx.options.dry_run:
            if not is_root():
                raise BuildError("--base debian needs root (debootstrap, chroot, mounts): "
                                 "run it with sudo, or use --dry-run")
            # Debian's archive keyring (the mirror is trusted only as far as it vouches),
            # debootstrap and gpgv: before the wheels' resolution reaches PyPI.
            debian.check_host()
            require_programs("mkfs.ext4", "dpkg-deb", "sfdisk", "mount", "chroot", "unshare")
            emulation = _emulation(ctx)
    else:
        suffix = (".img.xz" if base.source == "armbian"
                  else compression.image_suffix(fetch.location_name(base.source)))
        require_programs(compression.COMPRESSIONS[suffix][0])
    if ctx.board.support in ("eos", "wip", "tvbox"):
        log.warn(f"{ctx.board.id} has support status '{ctx.board.support}' at Armbian: "
                 f"images may be missing or broken")
    try:
        ctx.board.wizard_consoles(cfg.firstboot.consoles)
    except ValueError as exc:
        raise BuildError(f"firstboot.consoles: {exc}") from None
    # What customizing needs, checked now rather than after a 10-minute download.
    builtin = cfg.customize.builtin
    scripts = customize.find_scripts([*([customize.BUILTIN_CUSTOMIZE] if builtin else []),
                                      *map(user_dir, cfg.customize.scripts)])
    for script in scripts:       # the settings each declares exist
        customize.settings_for(script, cfg.to_dict())
    overlay_dirs = (*([customize.BUILTIN_OVERLAYS] if builtin else []),
                    *map(user_dir, cfg.customize.overlays))
    rendered = customize.render_templates(overlay_dirs,
                                          customize.template_context(cfg, ctx.board))
    if cfg.firstboot.preseed:
        check_preseed(cfg)
    checked = Checked(tuple(scripts), overlay_dirs, rendered, trust, emulation)
    if not ctx.options.builds_image:
        return checked
    if not is_root():
        raise BuildError("building an image needs root (loop devices, mounts, chroot): run it "
                         "with sudo, or use --dry-run / --fetch-only, which do not")
    require_programs("losetup", "sfdisk", "blkid", "blockdev", "e2fsck", "resize2fs",
                     "dumpe2fs", "debugfs", "mount", "umount", "chroot", "unshare", "fstrim",
                     "sync",
                     "bmaptool",
                     "dpkg-query", *(output.COMPRESSORS[cfg.image.compression][1][:1]))
    if cfg.image.setup_partition and cfg.customize.builtin:
        require_programs("mkfs.fat", "mcopy")
    if ctx.board.arch not in QEMU:
        raise BuildError(f"{ctx.board.id} is {ctx.board.arch}: this builder emulates only "
                         f"{', '.join(QEMU)}")
    binfmt = binfmt_status(ctx.board.arch)
    if not binfmt.usable:
        if binfmt.interpreter is None or static_qemu(ctx.board.arch) is None:
            raise BuildError(f"cannot run {ctx.board.arch} programs on this host: "
                             f"{binfmt.problem}")
        log.warn(f"{binfmt.problem}; copying qemu into the image for the build instead")
    check_free_space(ctx, None)
    # The packages asked for by name must exist as wheels for the board; what they depend
    # on is chosen later, against what the image's Debian packages provide.
    if builtin:
        wheels.check_requested(cfg.packages.pip, cfg.base.release, ctx.board.arch,
                               ctx.cache.root / "host" / "wheels", ctx.options.offline)
    return replace(checked, emulation=emulation or _emulation(ctx))


# What a lowered base.verify leaves unchecked, said on every build.
LOWERED = {
    "sha256": "base.verify is sha256: the base image's OpenPGP signature is not checked, only "
              "its sha256; nothing proves who made the image",
    "none": "base.verify is none: the base image need carry neither a good signature nor a "
            "known sha256 (a digest given or published is still compared); nothing proves "
            "what the image is",
}


def check_verification(ctx: Context) -> fetch.Trust:
    """How the base will be vouched for (base.verify), checked as far as it can be before the
    first download: plain http where the level does not allow it, gpg and gpgv, every
    keyring (readable, holding a key)."""
    base = ctx.config.base
    level = base.verify
    if base.source == "debian":
        # Built here, not downloaded: debootstrap checks Debian's archive against Debian's
        # own keys (debian.py); base.verify is about images made elsewhere.
        return fetch.Trust(level)
    user_sha256 = bool(base.sha256)
    if base.source == "armbian":
        fetch.check_transport(base.armbian_index, "the Armbian index (--armbian-index)", level,
                              user_sha256)
        if base.armbian_mirror:
            fetch.check_transport(base.armbian_mirror, "the Armbian mirror (--armbian-mirror)",
                                  level, user_sha256)
    else:
        fetch.check_transport(base.source, "the base image at", level, user_sha256)
    if level != "signature":
        log.warn(LOWERED[level])
        if base.gpg_keyring:
            log.info(f"--gpg-keyring is not used: base.verify is {level}")
        return fetch.Trust(level)
    require_programs("gpg", "gpgv")
    return fetch.Trust(level, verify.Keys.load([user_dir(k) for k in base.gpg_keyring]))


def _emulation(ctx: Context) -> Emulation:
    emulation = choose_emulation(ctx.board.arch, ctx.config.emulation.cpu)
    log.info(emulation.note)
    return emulation


def check_preseed(cfg: Config) -> None:
    """The preseed file is checked by the same code the card runs at first boot, so a bad
    value stops the build now rather than a wizard on some card later."""
    flag = f"--preseed {cfg.firstboot.preseed}"
    if not cfg.customize.builtin:
        raise BuildError(f"{flag}: the first-boot wizard is part of the built-in customize.d: "
                         f"drop --preseed or customize.builtin=false")
    settings = Settings(min_password_length=cfg.firstboot.min_password_length)
    _, answers = load_preseed(Path(cfg.firstboot.preseed or ""), cfg.firstboot.preseed, settings)
    if answers.login_password or answers.jupyter_password or answers.wifi_key:
        log.warn(f"{flag} holds plain passwords: every card flashed from this image carries "
                 f"them until its first boot; login_password_hash and jupyter_password_hash "
                 f"keep them out of the image")
    if answers.token not in (None, "generate", "none"):
        log.warn(f"{flag} sets a fixed jupyter_token: every card flashed from this image "
                 f"will accept it; 'generate' makes one per card")


def user_dir(value: str) -> Path:
    return Path(value).expanduser().absolute()


def check_free_space(ctx: Context, base: CachedImage | None) -> None:
    """Room for the working copy, the headroom, and the compressed output. Checked before
    the download with a guess of the base's size (Armbian's minimal images are 1.5-2.5 GiB)
    and again once it is known."""
    cfg = ctx.config
    size = base.raw_size if base else 2 << 30
    work = ctx.cache.root / "work"
    need = size + cfg.image.headroom
    free = shutil.disk_usage(_existing(work)).free
    if free < need:
        raise BuildError(f"not enough space for the build in {ctx.cache.root}: it needs about "
                         f"{log.human_size(need)}, {log.human_size(free)} is free; free some "
                         f"or use --cache-dir on a larger disk")
    # The compressed image is rarely more than half the raw one.
    out = user_dir(cfg.output.dir)
    need = size if cfg.image.compression == "none" else size // 2
    free = shutil.disk_usage(_existing(out)).free
    if free < need:
        raise BuildError(f"not enough space for the output in {out}: it needs about "
                         f"{log.human_size(need)}, {log.human_size(free)} is free; free some "
                         f"or use --output on a larger disk")


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def resolve_base(ctx: Context) -> fetch.BaseSource:
    base = ctx.config.base
    if base.source == "debian":
        return fetch.BaseSource(
            location=f"debian:{ctx.board.id}", filename=f"debian-{base.release}.img",
            suffix=".img", sha256=None, sha256_url=None, signature_url=None, size=None,
            label=debian.label(ctx.board, base.release), kind="debian")
    if base.source != "armbian":
        source = fetch.source_from_location(base.source, base.sha256)
        fetch.check_source(source, base.verify)
        return source
    # A dry run reads the cache if there is one but changes nothing in it.
    if not ctx.options.dry_run:
        ctx.cache.prepare()
    with fetch.refusing_plain_http_redirects(ctx.http, base.verify, bool(base.sha256)):
        assets = armbian.read_index(base.armbian_index, http=ctx.http, cache=ctx.cache,
                                    offline=ctx.options.offline,
                                    remember=not ctx.options.dry_run)
    image = armbian.find_image(assets, board=ctx.board.id, release=base.release,
                               branch=base.branch, variant=base.variant,
                               mirror=base.armbian_mirror)
    source = fetch.source_from_armbian(image)
    if base.sha256:
        source = fetch.BaseSource(**{**source.__dict__, "sha256": base.sha256})
    # The index names where the image, its .sha and .asc are: checked before any of them is.
    fetch.check_source(source, base.verify)
    log.info(f"base image: {image.label}")
    return source


def _plan_sha256(ctx: Context,
                 source: fetch.BaseSource) -> tuple[str | None, str, CachedImage | None]:
    """The digest the plan shows, where it comes from, and the cache entry if there is one.
    A checksum that cannot be fetched is shown as such: a plan still helps without it."""
    if source.kind == "debian":
        key = debian.cache_key(ctx.board, ctx.config.base.release,
                               ctx.config.base.debian_mirror)
        return key, "cache key of the Debian base's recipe", ctx.cache.image(key)
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


def _plan_verification(trust: fetch.Trust, source: fetch.BaseSource) -> tuple[str, str]:
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


def _cache_status(ctx: Context, source: fetch.BaseSource, entry: CachedImage | None) -> str:
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


def print_plan(ctx: Context, checked: Checked, source: fetch.BaseSource,
               steps: Sequence[tuple[str, str]]) -> None:
    """What a build would do: the facts, then every step in the order it runs, with the
    scripts and where the overlays go among them."""
    board = ctx.board
    sha256, sha_note, entry = _plan_sha256(ctx, source)
    level, signature = _plan_verification(checked.trust, source)
    rows = [
        ("board", f"{board.id}: {board.name}, {board.soc}, {board.arch}, family {board.family}, "
                  f"{board.support} support"),
        ("consoles", ", ".join(f"{c.device} at {c.baud} baud" for c in board.consoles)),
        ("base image", source.label),
        ("from", source.location),
        ("size", log.human_size(source.size) if source.size else "unknown"),
        ("sha256", f"{sha256 or 'unknown'} ({sha_note})"),
        ("verify", level),
        ("signature", signature),
        ("cache", _cache_status(ctx, source, entry)),
    ]
    width = max(len(k) for k, _ in rows)
    log.result("Plan (dry run: nothing is downloaded or changed)")
    for key, value in rows:
        log.result(f"  {key.ljust(width)}  {value}")
    log.result("  steps:")
    for number, (name, summary) in enumerate(steps, 1):
        log.result(f"    {number}. {name.ljust(20)} {summary}")
        if name == "customize-image":
            for item in customize_order(checked.scripts):
                log.result(f"         {item if isinstance(item, str) else item.name}")


# Where the overlays go among the scripts.
OVERLAYS = "overlays/"


def customize_order(scripts: Sequence[customize.Script]) -> list[customize.Script | str]:
    """The scripts numbered below 50, the overlays, then the others."""
    before = [script for script in scripts if script.before_overlays]
    after = [script for script in scripts if not script.before_overlays]
    return [*before, OVERLAYS, *after]
