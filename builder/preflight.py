"""Before the first download: everything a build can check, and the base image it starts
from.

check_host       how the base will be verified (base.verify: plain http, gpg, the keys),
                 host tools, root, emulation, the scripts and templates (each rendered
                 once), the preseed, free space, wheels for packages.pip
resolve_base     which file the build starts from: Armbian's index, --base debian, a path
                 or URL

What a dry run prints from these is in plan.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from builder import armbian, compression, customize, debian, fetch, log, output, verify, wheels
from builder.cache import CachedImage
from builder.chroot import Emulation, binfmt_status, choose_emulation, static_qemu
from builder.config import Config
from builder.entry import checking_usage
from builder.errors import BuildError, UsageError
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
    if ctx.options.builds_image and not is_root():
        # First: nothing else a build checks matters while it cannot run at all.
        raise BuildError("building an image needs root (loop devices, mounts, chroot): run it "
                         "with sudo, or use --dry-run / --fetch-only, which do not")
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
        suffix = ".img.xz"
        if base.source != "armbian":
            # What --base names is part of the command line: a directory or a file that is
            # no disk image is a usage error, said in the words that fit it.
            with checking_usage():
                suffix = fetch.source_from_location(base.source, base.sha256).suffix
        require_programs(compression.COMPRESSIONS[suffix][0])
    if ctx.board.support in ("eos", "wip", "tvbox"):
        log.warn(f"{ctx.board.id} has support status '{ctx.board.support}' at Armbian: "
                 f"images may be missing or broken")
    try:
        ctx.board.wizard_consoles(cfg.firstboot.consoles)
    except ValueError as exc:
        raise UsageError(f"firstboot.consoles: {exc}") from None
    # What customizing needs, checked now rather than after a 10-minute download. The
    # directories, scripts and templates are the user's (--customize, --overlay): a problem
    # in them is a usage error.
    builtin = cfg.customize.builtin
    with checking_usage():
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
    # The board's arch before any download: a dry run of a board no build can make is no plan.
    if ctx.board.arch not in BUILDABLE:
        raise UsageError(f"{ctx.board.id} is {ctx.board.arch}: this builder makes images for "
                         f"{' and '.join(BUILDABLE)} boards only (the ARCH column of "
                         f"`build-image --list-boards`)")
    if ctx.options.dry_run:
        binfmt = binfmt_status(ctx.board.arch)
        if not binfmt.usable and (binfmt.interpreter is None
                                  or static_qemu(ctx.board.arch) is None):
            log.warn(f"a build on this host would stop: cannot run {ctx.board.arch} programs "
                     f"({binfmt.problem})")
    if not ctx.options.fetch_only:
        check_output_dir(cfg)
    checked = Checked(tuple(scripts), overlay_dirs, rendered, trust, emulation)
    if not ctx.options.builds_image:
        return checked
    require_programs("losetup", "sfdisk", "blkid", "blockdev", "e2fsck", "resize2fs",
                     "dumpe2fs", "debugfs", "mount", "umount", "chroot", "unshare", "fstrim",
                     "sync",
                     "bmaptool",
                     "dpkg-query", *(output.COMPRESSORS[cfg.image.compression][1][:1]))
    if cfg.image.setup_partition and cfg.customize.builtin:
        require_programs("mkfs.fat", "mcopy")
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


# The arches a build makes images for: those whose images are tested here end to end
# (arm64 and armhf, booted by try-image). The catalog also lists Armbian's riscv64 boards.
BUILDABLE = ("arm64", "armhf")


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
    # Plain http where the level forbids it, and keyrings that are missing or hold no key:
    # what the command line asks for cannot be, a usage error.
    with checking_usage():
        if base.source == "armbian":
            fetch.check_transport(base.armbian_index, "the Armbian index (--armbian-index)",
                                  level, user_sha256)
            if base.armbian_mirror:
                fetch.check_transport(base.armbian_mirror,
                                      "the Armbian mirror (--armbian-mirror)", level,
                                      user_sha256)
        else:
            fetch.check_transport(base.source, "the base image at", level, user_sha256)
    if level != "signature":
        log.warn(LOWERED[level])
        if base.gpg_keyring:
            log.info(f"--gpg-keyring is not used: base.verify is {level}")
        return fetch.Trust(level)
    require_programs("gpg", "gpgv")
    with checking_usage():
        return fetch.Trust(level, verify.Keys.load([user_dir(k) for k in base.gpg_keyring]))


def _emulation(ctx: Context) -> Emulation:
    emulation = choose_emulation(ctx.board.arch, ctx.config.emulation.cpu)
    log.info(emulation.note)
    return emulation


def check_preseed(cfg: Config) -> None:
    """The preseed file is checked by the same code the card runs at first boot, so a bad
    value stops the build now rather than a wizard on some card later."""
    option = cfg.given_as("firstboot.preseed", "--preseed")
    flag = f"{option} {cfg.firstboot.preseed}"
    if not cfg.customize.builtin:
        raise UsageError(f"{flag}: the first-boot wizard is part of the built-in customize.d: "
                         f"drop --preseed or customize.builtin=false")
    settings = Settings(min_password_length=cfg.firstboot.min_password_length)
    _, answers = load_preseed(Path(cfg.firstboot.preseed or ""), cfg.firstboot.preseed, settings,
                              option=option)
    if answers.login_password or answers.jupyter_password or answers.wifi_key:
        log.warn(f"{flag} holds plain passwords: every card flashed from this image carries "
                 f"them until its first boot; login_password_hash and jupyter_password_hash "
                 f"keep them out of the image")
    if answers.token not in (None, "generate", "none"):
        log.warn(f"{flag} sets a fixed jupyter_token: every card flashed from this image "
                 f"will accept it; 'generate' makes one per card")


def user_dir(value: str) -> Path:
    return Path(value).expanduser().absolute()


# What a base image's raw size is guessed to be before it is downloaded: Armbian's minimal
# images are 1.5-2.5 GiB.
GUESSED_RAW_SIZE = 2 << 30


@dataclass(frozen=True)
class Room:
    """Space a build needs on one disk, and what is free there."""

    what: str          # "build" or "output"
    path: Path
    need: int
    free: int
    fix: str           # the option that moves it elsewhere

    @property
    def enough(self) -> bool:
        return self.free >= self.need


def room_needed(cfg: Config, cache_root: Path, raw_size: int | None) -> list[Room]:
    """The working copy with its headroom in the cache, and the compressed output (rarely
    more than half the raw image) in the output directory."""
    size = raw_size or GUESSED_RAW_SIZE
    out = user_dir(cfg.output.dir)
    return [
        Room("build", cache_root, size + cfg.image.headroom,
             shutil.disk_usage(_existing(cache_root / "work")).free, "--cache-dir"),
        Room("output", out, size if cfg.image.compression == "none" else size // 2,
             shutil.disk_usage(_existing(out)).free, "--output"),
    ]


def check_free_space(ctx: Context, base: CachedImage | None) -> None:
    """Room for the working copy, the headroom, and the compressed output. Checked before
    the download with a guess of the base's size and again once it is known."""
    for room in room_needed(ctx.config, ctx.cache.root, base.raw_size if base else None):
        if not room.enough:
            raise BuildError(f"not enough space for the {room.what} in {room.path}: it needs "
                             f"about {log.human_size(room.need)}, {log.human_size(room.free)} "
                             f"is free; free some or use {room.fix} on a larger disk")


def check_output_dir(cfg: Config) -> None:
    """The output directory can be made and written, known before a download of minutes: a
    file in its place, or a directory that is not writable, is refused now. A dry run as
    another user than root checks what that user may write; a build as root may write more,
    so there it is only said."""
    out = user_dir(cfg.output.dir)
    given = cfg.given_as("output.dir", "--output")
    existing = _existing(out)
    if not existing.is_dir():
        raise UsageError(f"{given} {cfg.output.dir}: {existing} is not a directory: give a "
                         f"directory for the image and its files")
    if not os.access(existing, os.W_OK | os.X_OK):
        if is_root():
            raise UsageError(f"{given} {cfg.output.dir}: {existing} is not writable (a "
                             f"read-only filesystem?): give a writable directory")
        log.warn(f"{given} {cfg.output.dir}: {existing} is not writable by this user; a build "
                 f"as root may still write it")


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
    # A release, branch or variant the index has no image for is asked for in vain: usage.
    with checking_usage():
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


# Where the overlays go among the scripts.
OVERLAYS = "overlays/"


def customize_order(scripts: Sequence[customize.Script]) -> list[customize.Script | str]:
    """The scripts numbered below 50, the overlays, then the others."""
    before = [script for script in scripts if script.before_overlays]
    after = [script for script in scripts if not script.before_overlays]
    return [*before, OVERLAYS, *after]
