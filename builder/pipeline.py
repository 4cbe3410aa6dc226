"""The build, step by step. Each step is a function of the build context, run in this order:

    check_host          everything that can be checked before the first download or mount
    resolve_base_image  which file to start from (Armbian's index, or --base PATH/URL)
    fetch_base_image    download, verify and decompress it into the cache    (fetch.py)
    copy_base_image     a working copy of it, the cache entry stays as it is
    grow_image          room for the packages: file, partition, filesystem   (image.py)
    mount_root          the root filesystem on a loop device                 (mount.py)
    customize_image     customize.d/ scripts and overlays/, in a chroot      (customize.py)
    finalize_image      build-only state out, unmount, shrink                (image.py)
    write_outputs       compressed image, .sha256, .bmap, manifest, log      (output.py)

Resources that live across steps (loop devices, mounts, work files) are entered on the
context's ExitStack and recorded in the ledger, so any failure or signal unwinds them all.
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder import (
    __version__,
    armbian,
    compression,
    customize,
    debian,
    fetch,
    firstboot,
    image,
    log,
    output,
    stages,
    wheels,
)
from builder.boards import Board
from builder.cache import Cache, CachedImage
from builder.chroot import (
    QEMU,
    Chroot,
    Emulation,
    binfmt_status,
    choose_emulation,
    chroot_session,
    in_root,
    static_qemu,
)
from builder.config import Config
from builder.download import Http
from builder.errors import BuildError
from builder.files import locked, sha256_of
from builder.ledger import Ledger, mounts_under, remove_path
from builder.mount import is_root, loop_device, mounted, work_path
from builder.preseed import load_preseed
from builder.run import require_programs


@dataclass(frozen=True)
class Options:
    """How this run behaves, as opposed to what it builds (that is Config)."""

    dry_run: bool = False
    fetch_only: bool = False
    offline: bool = False
    keep_workspace: bool = False
    no_cache: bool = False

    @property
    def builds_image(self) -> bool:
        return not (self.dry_run or self.fetch_only)


@dataclass
class Context:
    """What changes while a build runs. Config stays frozen; this fills in step by step."""

    config: Config
    options: Options
    board: Board
    cache: Cache
    http: Http
    stack: ExitStack = field(default_factory=ExitStack)
    ledger: Ledger = field(default_factory=Ledger)
    trust: fetch.Trust | None = None
    emulation: Emulation | None = None
    source: fetch.BaseSource | None = None
    base: CachedImage | None = None
    scripts: list[customize.Script] = field(default_factory=list)
    overlay_dirs: list[Path] = field(default_factory=list)
    rendered: dict[Path, str] = field(default_factory=dict)
    workspace: Path | None = None
    work_image: Path | None = None
    root: image.Partition | None = None
    root_dir: Path | None = None
    root_mount: ExitStack | None = None
    chroot: Chroot | None = None
    stage_cache: stages.StageCache | None = None
    base_digest: str = ""
    stage_key: str = ""
    stages: list[dict[str, Any]] = field(default_factory=list)
    overlays_digest: str | None = None
    outputs: output.Outputs | None = None
    timings: dict[str, float] = field(default_factory=dict)
    script_timings: dict[str, float] = field(default_factory=dict)


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
    if base.source == "debian":
        debian.supported(ctx.board, base.release)
        if not ctx.options.dry_run:
            if not is_root():
                raise BuildError("--base debian needs root (debootstrap, chroot, mounts): "
                                 "run it with sudo, or use --dry-run")
            require_programs("debootstrap", "mkfs.ext4", "dpkg-deb", "sfdisk", "mount",
                             "chroot")
            _choose_emulation(ctx)
    else:
        suffix = (".img.xz" if base.source == "armbian"
                  else compression.image_suffix(fetch.location_name(base.source)))
        require_programs(compression.COMPRESSIONS[suffix][0])
    if ctx.board.support in ("eos", "wip", "tvbox"):
        log.warn(f"{ctx.board.id} has support status '{ctx.board.support}' at Armbian: "
                 f"images may be missing or broken")
    # What customizing needs, checked now rather than after a 10-minute download.
    cfg = ctx.config
    builtin = cfg.customize.builtin
    script_dirs = [customize.BUILTIN_CUSTOMIZE] if builtin else []
    ctx.scripts = customize.find_scripts(
        [*script_dirs, *map(_user_dir, cfg.customize.scripts)])
    for script in ctx.scripts:       # the settings each declares exist
        customize.settings_for(script, cfg.to_dict())
    overlay_dirs = [customize.BUILTIN_OVERLAYS] if builtin else []
    ctx.overlay_dirs = [*overlay_dirs, *map(_user_dir, cfg.customize.overlays)]
    ctx.rendered = customize.render_templates(
        ctx.overlay_dirs, customize.template_context(cfg, ctx.board))
    if cfg.firstboot.preseed:
        check_preseed(cfg)
    if not ctx.options.builds_image:
        return
    if not is_root():
        raise BuildError("building an image needs root (loop devices, mounts, chroot): run it "
                         "with sudo, or use --dry-run / --fetch-only, which do not")
    require_programs("losetup", "sfdisk", "blkid", "blockdev", "e2fsck", "resize2fs",
                     "dumpe2fs", "debugfs", "mount", "umount", "chroot", "fstrim", "sync",
                     "bmaptool",
                     "dpkg-query", *(output.COMPRESSORS[cfg.image.compression][1][:1]))
    if ctx.board.arch not in QEMU:
        raise BuildError(f"{ctx.board.id} is {ctx.board.arch}: this builder emulates only "
                         f"{', '.join(QEMU)}")
    binfmt = binfmt_status(ctx.board.arch)
    if not binfmt.usable:
        if binfmt.interpreter is None or static_qemu(ctx.board.arch) is None:
            raise BuildError(f"cannot run {ctx.board.arch} programs on this host: "
                             f"{binfmt.problem}")
        log.warn(f"{binfmt.problem}; copying qemu into the image for the build instead")
    _choose_emulation(ctx)
    _check_free_space(ctx)
    # The packages asked for by name must exist as wheels for the board; what they depend
    # on is chosen later, against what the image's Debian packages provide.
    if builtin:
        wheels.check_requested(cfg.packages.pip, cfg.base.release, ctx.board.arch,
                               ctx.cache.root / "host" / "wheels", ctx.options.offline)


def _choose_emulation(ctx: Context) -> None:
    if ctx.emulation is None:
        ctx.emulation = choose_emulation(ctx.board.arch, ctx.config.emulation.cpu)
        log.info(ctx.emulation.note)


def check_preseed(cfg: Config) -> None:
    """The preseed file is checked by the same code the card runs at first boot, so a bad
    value stops the build now rather than a wizard on some card later."""
    flag = f"--preseed {cfg.firstboot.preseed}"
    if not cfg.customize.builtin:
        raise BuildError(f"{flag}: the first-boot wizard is part of the built-in customize.d: "
                         f"drop --preseed or customize.builtin=false")
    settings = firstboot.Settings(min_password_length=cfg.firstboot.min_password_length)
    _, answers = load_preseed(Path(cfg.firstboot.preseed or ""), cfg.firstboot.preseed, settings)
    if answers.login_password or answers.jupyter_password or answers.wifi_key:
        log.warn(f"{flag} holds plain passwords: every card flashed from this image carries "
                 f"them until its first boot; login_password_hash and jupyter_password_hash "
                 f"keep them out of the image")
    if answers.token not in (None, "generate", "none"):
        log.warn(f"{flag} sets a fixed jupyter_token: every card flashed from this image "
                 f"will accept it; 'generate' makes one per card")


def _user_dir(value: str) -> Path:
    return Path(value).expanduser().absolute()


def _check_free_space(ctx: Context) -> None:
    """Room for the working copy, the headroom, and the compressed output. Checked before
    the download with a guess of the base's size (Armbian's minimal images are 1.5-2.5 GiB)
    and again once it is known."""
    cfg = ctx.config
    base = ctx.base.raw_size if ctx.base else 2 << 30
    work = ctx.cache.root / "work"
    need = base + cfg.image.headroom
    free = shutil.disk_usage(_existing(work)).free
    if free < need:
        raise BuildError(f"not enough space for the build in {ctx.cache.root}: it needs about "
                         f"{log.human_size(need)}, {log.human_size(free)} is free; free some "
                         f"or use --cache-dir on a larger disk")
    # The compressed image is rarely more than half the raw one.
    out = _user_dir(cfg.output.dir)
    need = base if cfg.image.compression == "none" else base // 2
    free = shutil.disk_usage(_existing(out)).free
    if free < need:
        raise BuildError(f"not enough space for the output in {out}: it needs about "
                         f"{log.human_size(need)}, {log.human_size(free)} is free; free some "
                         f"or use --output on a larger disk")


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def resolve_base_image(ctx: Context) -> None:
    base = ctx.config.base
    if base.source == "debian":
        ctx.source = fetch.BaseSource(
            location=f"debian:{ctx.board.id}", filename=f"debian-{base.release}.img",
            suffix=".img", sha256=None, sha256_url=None, signature_url=None, size=None,
            label=debian.label(ctx.board, base.release), kind="debian")
        return
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
    if ctx.source.kind == "debian":
        ctx.base = debian.build_base(ctx.board, ctx.config.base.release,
                                     ctx.config.base.debian_mirror, ctx.cache, ctx.ledger,
                                     ctx.emulation)
        return
    ctx.base = fetch.fetch_base_image(ctx.source, cache=ctx.cache, http=ctx.http,
                                      trust=ctx.trust, offline=ctx.options.offline)


def stage_cache_of(cache: Cache, config: Config) -> stages.StageCache:
    return stages.StageCache(cache.root / "stages", cache.locks, config.cache.stages_size,
                             config.cache.stage_days)


def copy_base_image(ctx: Context) -> None:
    assert ctx.base is not None
    work = ctx.cache.root / "work"
    work.mkdir(parents=True, exist_ok=True)
    sweep_workspaces(work)
    kind = "kept" if ctx.options.keep_workspace else "build"
    workspace = Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=work))
    if not ctx.options.keep_workspace:
        ctx.stack.enter_context(work_path(ctx.ledger, workspace))
    ctx.stack.enter_context(locked(workspace / ".lock"))
    ctx.workspace = workspace
    ctx.work_image = workspace / "image.img"
    log.info(f"copying the base image to {ctx.work_image}")
    # The digest of what was copied (whatever the base's source told) keys every stage.
    ctx.base_digest = stages.copy_image(ctx.base.path, ctx.work_image)
    if ctx.config.cache.stages_size > 0:
        ctx.stage_cache = stage_cache_of(ctx.cache, ctx.config)
        ctx.stage_cache.prepare()


def sweep_workspaces(work: Path) -> None:
    """Remove workspaces of builds that are gone. The ledger in /run covers a build killed
    while the machine stayed up; this covers one that died with the machine (a reboot
    empties /run but not the disk). Kept workspaces (--keep-workspace) stay."""
    for workspace in work.glob("build-*"):
        # Each build holds a lock inside its workspace: one that can be taken belongs to a
        # build that is gone, whatever pid namespace (container) it ran in.
        lock_file = workspace / ".lock"
        if not lock_file.exists() or mounts_under(workspace):
            continue
        with locked(lock_file, wait=False) as had:
            if not had:
                continue
            log.info(f"removing {workspace}, left by a build that did not finish")
        remove_path(workspace)


def grow_image(ctx: Context) -> None:
    assert ctx.work_image is not None
    table = image.read_table(ctx.work_image)
    root = image.find_root(ctx.ledger, ctx.work_image, table)
    ctx.root = image.grow(ctx.ledger, ctx.work_image, table, root, ctx.config.image.headroom)


def mount_root(ctx: Context) -> None:
    assert ctx.work_image is not None and ctx.root is not None and ctx.workspace is not None
    mounts = ExitStack()
    ctx.stack.push(mounts.__exit__)
    device = mounts.enter_context(loop_device(ctx.ledger, ctx.work_image, ctx.root.start,
                                              ctx.root.size))
    ctx.root_dir = mounts.enter_context(mounted(ctx.ledger, device, ctx.workspace / "root",
                                                fstype="ext4"))
    ctx.root_mount = mounts


def customize_image(ctx: Context) -> None:
    """Run the scripts, with the overlays laid in before the first one numbered 50 or more.
    Before each script the step cache is asked for the furthest state ahead whose key can be
    known already; a hit puts that state in place and the build goes on after it."""
    assert ctx.workspace is not None and ctx.base is not None
    work = ctx.workspace / "work"
    (work / "output").mkdir(parents=True, exist_ok=True)
    ctx.stage_key = stages.key_of_base(
        ctx.base_digest, customize.template_context(ctx.config, ctx.board)["board"],
        ctx.config.base.release, ctx.config.image.headroom, ctx.config.to_dict()["emulation"])
    plan = _customize_plan(ctx)
    with ExitStack() as session:
        index = 0
        while index < len(plan):
            hit = _cached_ahead(ctx, plan, index, work) if ctx.stage_cache else None
            if hit is not None:
                session.close()
                index = _restore_stage(ctx, plan, index, hit, work)
                continue
            item = plan[index]
            ctx.stage_key = _key_after(ctx, item, ctx.stage_key, work)
            if item is OVERLAYS:
                # Between sessions: their tmpfs on /run, /tmp and /dev would swallow files
                # laid there.
                session.close()
                assert ctx.root_dir is not None
                files = customize.apply_overlays(ctx.overlay_dirs, ctx.root_dir, ctx.rendered)
                log.info(f"laid {files} overlay files into the image")
            else:
                assert isinstance(item, customize.Script)
                if ctx.chroot is None:
                    session.enter_context(_session(ctx, work))
                chroot = ctx.chroot
                assert chroot is not None
                ctx.script_timings[item.name] = customize.run_script(
                    item, chroot, ctx.config, ctx.board, host_env=_host_env(ctx))
                if item.keep:
                    session.close()
                    _store_stage(ctx, item, work)
            index += 1
    files_dir = ctx.workspace / "script-output"
    shutil.copytree(work / "output", files_dir, symlinks=True, dirs_exist_ok=True)


# Where the overlays go among the scripts.
OVERLAYS = "overlays"
PlanItem = customize.Script | str


def _customize_plan(ctx: Context) -> list[PlanItem]:
    before = [script for script in ctx.scripts if script.before_overlays]
    after = [script for script in ctx.scripts if not script.before_overlays]
    return [*before, OVERLAYS, *after]


def _key_after(ctx: Context, item: PlanItem, previous: str, work: Path) -> str:
    if item is OVERLAYS:
        return stages.key_of_overlays(previous, _overlays_digest(ctx))
    assert isinstance(item, customize.Script)
    settings = customize.settings_for(item, ctx.config.to_dict())
    # A setting that names a file stands for the file's contents too.
    files = {name: sha256_of(Path(value))
             for name, value in _file_settings(settings).items()}
    code = None
    if item.where == "host":
        code = stages.code_digest(item.code if item.code is not None else
                                  sorted(p.name for p in stages.BUILDER_DIR.glob("*.py")))
    inputs = stages.tree_digest(work, item.reads)
    return stages.key_of_script(previous, item.name, item.path.read_bytes(),
                                {"settings": settings, "files": files}, inputs, code)


FILE_SETTINGS = (("firstboot", "preseed"),)


def _file_settings(settings: dict[str, Any]) -> dict[str, str]:
    found = {}
    for section, key in FILE_SETTINGS:
        value = settings.get(section, {}).get(key)
        if value:
            found[f"{section}.{key}"] = value
    return found


def _overlays_digest(ctx: Context) -> str:
    if ctx.overlays_digest is None:
        # Templates by their place in the overlays, not on this host: a checkout elsewhere
        # or an installed copy makes the same key.
        rendered = {f"{number}/{path.relative_to(top).as_posix()}": text
                    for number, top in enumerate(ctx.overlay_dirs)
                    for path, text in ctx.rendered.items() if path.is_relative_to(top)}
        ctx.overlays_digest = stages.digest_of({
            "trees": [stages.tree_digest(d) for d in ctx.overlay_dirs],
            "rendered": rendered})
    return ctx.overlays_digest


def _cached_ahead(ctx: Context, plan: list[PlanItem], index: int,
                  work: Path) -> tuple[int, str, stages.Entry] | None:
    """The furthest entry from plan[index] on whose key is known now: a script that reads
    the work directory ends the look ahead unless it is the next one (what the skipped
    scripts would have written there is not known)."""
    assert ctx.stage_cache is not None
    if ctx.options.no_cache:
        return None
    key, best = ctx.stage_key, None
    for position in range(index, len(plan)):
        item = plan[position]
        if (position > index and isinstance(item, customize.Script)
                and item.reads != ()):
            break
        key = _key_after(ctx, item, key, work)
        entry = ctx.stage_cache.lookup(key)
        if entry is not None:
            best = (position, key, entry)
    return best


def _restore_stage(ctx: Context, plan: list[PlanItem], index: int,
                   hit: tuple[int, str, stages.Entry], work: Path) -> int:
    """Put a cached state in place; returns where the plan goes on. A damaged entry is
    dropped and the plan goes on where it was."""
    assert ctx.stage_cache is not None and ctx.work_image is not None
    position, key, entry = hit
    _unmount_root(ctx)
    restored = ctx.stage_cache.restore(entry, ctx.work_image, work)
    mount_root(ctx)
    if not restored:
        return index
    skipped = [item.name for item in plan[index:position + 1]
               if isinstance(item, customize.Script)]
    log.info(f"step cache: the image after {entry.script} (key {key[:12]}) restored; "
             f"skipped {', '.join(skipped) or 'the overlays'}")
    for name in skipped:
        ctx.script_timings[name] = 0.0
    ctx.stages.append({"after": entry.script, "key": key, "from_cache": True})
    ctx.stage_key = key
    return position + 1


def _store_stage(ctx: Context, script: customize.Script, work: Path) -> None:
    assert ctx.work_image is not None
    if ctx.stage_cache is None:
        return
    _unmount_root(ctx)
    started = time.monotonic()
    entry = ctx.stage_cache.store(ctx.stage_key, script.name, ctx.work_image, work,
                                  {"base": ctx.base_digest, "board": ctx.board.id},
                                  replace=ctx.options.no_cache)
    mount_root(ctx)
    if entry is not None:
        log.info(f"step cache: kept the image after {script.name} (key "
                 f"{ctx.stage_key[:12]}) in {time.monotonic() - started:.1f} s")
        ctx.stages.append({"after": script.name, "key": ctx.stage_key, "from_cache": False})


def _unmount_root(ctx: Context) -> None:
    """Unmounted and synced: the image file can be copied or replaced."""
    assert ctx.root_mount is not None
    ctx.root_mount.close()
    ctx.root_mount = None
    ctx.root_dir = None


@contextmanager
def _session(ctx: Context, work: Path) -> Iterator[None]:
    assert ctx.root_dir is not None
    cfg = ctx.config
    apt_cache = ctx.cache.root / "apt" / f"{cfg.base.release}-{ctx.board.arch}"
    with chroot_session(ctx.ledger, ctx.root_dir, ctx.board.arch, apt_cache=apt_cache,
                        apt_proxy=cfg.apt.proxy, env={}, emulation=ctx.emulation,
                        quick_apt=cfg.emulation.quick_apt,
                        binds={customize.WORK_IN_IMAGE: work}) as chroot:
        ctx.chroot = chroot
        try:
            yield
        finally:
            ctx.chroot = None


# What host scripts may see of the builder's environment: the PATH and the settings that
# reach the network (proxies, CA bundles, pip's index), nothing else. Not pip's other
# options (PIP_NO_DEPS, PIP_USER...): they would change what is chosen, not where from.
HOST_ENV = ("PATH", "HOME", "LANG", "TERM", "http_proxy", "https_proxy", "no_proxy",
            "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR",
            "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "XDG_CONFIG_HOME", "XDG_CONFIG_DIRS",
            "XDG_CACHE_HOME", "NETRC", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL",
            "PIP_TRUSTED_HOST", "PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_TIMEOUT",
            "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES", "PIP_CONFIG_FILE", "PIP_CACHE_DIR",
            "PIP_KEYRING_PROVIDER")


def _host_env(ctx: Context) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in HOST_ENV}
    cache = ctx.cache.root / "host"
    cache.mkdir(parents=True, exist_ok=True)
    env.update(IMAGE_CACHE=str(cache), IMAGE_OFFLINE="1" if ctx.options.offline else "0",
               IMAGE_BUILDER_PYTHON=sys.executable)
    return env


# Files that would make every card flashed from the image share a secret or an identity,
# or that only the build needed. SSH host keys are made anew at first boot (Armbian's
# firstrun; overlays/ carries a unit that does it on other bases).
BUILD_ONLY = (
    "var/lib/dbus/machine-id",
    "var/lib/systemd/random-seed",
    "var/lib/systemd/credential.secret",
    "etc/ssh/ssh_host_*",
    "var/cache/apt/*.bin",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/lib/apt/lists/*_*",
    "var/log/apt/*",
    "var/log/journal/*",
    "var/log/*.log",
    "root/.bash_history",
    "root/.python_history",
    "root/.cache",
    "root/.local/share/jupyter",
    "home/*/.bash_history",
    "home/*/.python_history",
    "home/*/.cache",
    "home/*/.local/share/jupyter/runtime",
    "var/tmp/*",
    "var/cache/apt/archives/*.deb",
)


def finalize_image(ctx: Context) -> None:
    assert ctx.root_dir is not None and ctx.root_mount is not None
    assert ctx.work_image is not None and ctx.root is not None
    root = ctx.root_dir
    for pattern in BUILD_ONLY:
        for path in _image_glob(root, pattern):
            remove_path(path)
    machine_id = in_root(root, "etc/machine-id")
    if machine_id.exists():
        # Empty, not absent: systemd then makes a new one at first boot.
        machine_id.write_text("")
    # Freed blocks go back to the sparse file as holes: zeros that compress to nothing, and
    # nothing deleted during the build can be read back from the image.
    image.clear_free_space(root)
    image.sync_fs(root)
    ctx.root_mount.close()
    ctx.root_dir = None
    ctx.root = image.current_partition(ctx.work_image, ctx.root.number)
    image.shrink(ctx.ledger, ctx.work_image, ctx.root, ctx.config.image.free_space)


def _image_glob(root: Path, pattern: str) -> list[Path]:
    """The paths matching `pattern` ("home/*/.bash_history") in the image, each directory on
    the way resolved as the image sees it, so a link can never lead a removal to the host."""
    *directories, name = pattern.split("/")
    found = [root]
    for part in directories:
        found = [child for parent in found for child in in_root(root, str(parent.relative_to(
            root))).glob(part) if in_root(root, str(child.relative_to(root))).is_dir()]
    return [path for parent in found
            for path in in_root(root, str(parent.relative_to(root))).glob(name)]


def write_outputs(ctx: Context) -> None:
    assert ctx.work_image is not None and ctx.base is not None and ctx.source is not None
    assert ctx.outputs is not None
    cfg, out = ctx.config, ctx.outputs
    compressed = output.write_image(ctx.work_image, out, cfg.image.compression_level)
    output.write_checksum(compressed, out)
    output.write_bmap(ctx.work_image, out)


def _manifest(ctx: Context, packages: list[dict[str, str]]) -> dict[str, Any]:
    assert ctx.source is not None and ctx.base is not None
    return {
        "builder": {"name": "orangepi-jupyter", "version": __version__},
        "built": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "board": customize.template_context(ctx.config, ctx.board)["board"],
        "base": {"label": ctx.source.label, "url": ctx.source.location,
                 "sha256": ctx.base.sha256, "signature": ctx.base.signature},
        "config": ctx.config.to_dict(),
        "packages": packages,
        "steps": {name: round(seconds, 1) for name, seconds in ctx.timings.items()},
        "scripts": {name: round(seconds, 1) for name, seconds in ctx.script_timings.items()},
        # Each stage kept in or restored from the step cache, in order, with its key.
        "stages": ctx.stages,
    }


# Steps that only look: a dry run runs these, then prints the plan.
PLAN_STEPS: tuple[Step, ...] = (
    Step("check-host", "check host tools, keyring, scripts and templates before any download",
         check_host),
    Step("resolve-base-image", "find the base image (Armbian's index or --base)",
         resolve_base_image),
)
FETCH_STEPS: tuple[Step, ...] = (
    Step("fetch-base-image", "download, verify (sha256, signature) and decompress into the cache",
         fetch_base_image),
)
# Steps that make the image.
IMAGE_STEPS: tuple[Step, ...] = (
    Step("copy-base-image", "copy the base image to a workspace (the cache stays untouched)",
         copy_base_image),
    Step("grow-image", "add headroom: file, root partition, filesystem", grow_image),
    Step("mount-root", "mount the root filesystem on a loop device", mount_root),
    Step("customize-image", "run customize.d/ in a qemu chroot, lay in overlays/",
         customize_image),
    Step("finalize-image", "remove build-only state, unmount, shrink", finalize_image),
    Step("write-outputs", "compress, sha256, bmap, manifest, build log", write_outputs),
)
STEPS = PLAN_STEPS + FETCH_STEPS + IMAGE_STEPS


def _run_steps(ctx: Context, steps: tuple[Step, ...]) -> None:
    for step in steps:
        log.debug(f"step {step.name}")
        started = time.monotonic()
        step.run(ctx)
        ctx.timings[step.name] = time.monotonic() - started


def run_build(ctx: Context) -> None:
    with ctx.stack:
        _run_steps(ctx, PLAN_STEPS)
        if ctx.options.dry_run:
            print_plan(ctx)
            return
        _run_steps(ctx, FETCH_STEPS)
        assert ctx.base is not None
        if ctx.options.fetch_only:
            log.result(str(ctx.base.path))
            return
        _build_image(ctx)


def _build_image(ctx: Context) -> None:
    cfg = ctx.config
    _check_free_space(ctx)
    date = datetime.date.today().strftime("%Y%m%d")
    name = f"{cfg.output.product}-{ctx.board.id}-{cfg.base.release}-{date}"
    out = ctx.stack.enter_context(output.outputs(ctx.ledger, _user_dir(cfg.output.dir), name,
                                                 cfg.image.compression))
    ctx.outputs = out
    with log.build_log(out.temporary(".build.log")):
        assert ctx.source is not None
        log.info(f"building {name} for {ctx.board.name} from {ctx.source.label}")
        _run_steps(ctx, IMAGE_STEPS)
        assert ctx.root_dir is None and ctx.workspace is not None
        packages = _packages_of(ctx)
        files, sections = customize.read_outputs(ctx.workspace / "script-output")
        for name, path in files.items():
            shutil.copyfile(path, out.add(f".{name}"))
        output.write_manifest(out, {**sections, **_manifest(ctx, packages)})
        log.info(f"image written: {out.final(out.image_suffix)}")
    published = out.publish()
    for path in published:
        log.result(str(path))


def _packages_of(ctx: Context) -> list[dict[str, str]]:
    """The packages in the finished image, read from its root filesystem once more."""
    assert ctx.work_image is not None and ctx.root is not None and ctx.workspace is not None
    root = image.current_partition(ctx.work_image, ctx.root.number)
    with loop_device(ctx.ledger, ctx.work_image, root.start, root.size, read_only=True) as dev, \
            mounted(ctx.ledger, dev, ctx.workspace / "final", fstype="ext4",
                    options=("ro",)) as final:
        return output.installed_packages(final)


def _plan_sha256(ctx: Context) -> tuple[str | None, str, CachedImage | None]:
    """The digest the plan shows, where it comes from, and the cache entry if there is one.
    A checksum that cannot be fetched is shown as such: a plan still helps without it."""
    source = ctx.source
    assert source is not None
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


def _cache_status(ctx: Context, entry: CachedImage | None) -> str:
    source = ctx.source
    assert source is not None
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
