"""The build, step by step, in the order the steps run (a dry run lists the same table):

    check-host          everything checked before the first download    (preflight.py)
    resolve-base-image  which file to start from                         (preflight.py)
    fetch-base-image    download, verify, decompress into the cache      (fetch.py, debian.py)
    copy-base-image     a workspace with a working copy of it; the cache entry stays as it is
    grow-image          room for the packages: file, partition, filesystem   (image.py)
    mount-root          the root filesystem on a loop device                 (mount.py)
    customize-image     customize.d/ scripts and overlays/, in a chroot, with the step cache
                        (customize.py, chroot.py, stages.py)
    finalize-image      build-only state out, the package list read, free space cleared
                        (finish.py, as are the steps below up to publishing)
    shrink-image        unmounted; filesystem, partition and file shrunk     (image.py)
    add-setup-partition the FAT drive people edit after flashing     (setup_partition.py)
    write-outputs       compressed image, .sha256, .bmap                     (output.py)
    write-manifest      the SBOM (sbom.py), the manifest and the files scripts handed over
    publish-outputs     every output renamed into place at once

Each resource lives in a `with` block around exactly the steps that use it: the outputs'
temporaries and the workspace for the whole build, the root's loop device and mount from
mount-root to finalize-image. Every one is also recorded in the ledger, so a build killed
outright is undone by the next one.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder import (
    customize,
    debian,
    fetch,
    finish,
    image,
    log,
    output,
    plan,
    stages,
)
from builder.boards import Board
from builder.cache import Cache, CachedImage
from builder.chroot import Chroot, chroot_session
from builder.config import Config
from builder.download import Http
from builder.errors import BuildError
from builder.files import locked, sha256_of
from builder.ledger import Ledger
from builder.mount import loop_device, mounted, mounts_under, remove_path, work_path
from builder.preflight import (
    OVERLAYS,
    Checked,
    check_free_space,
    check_host,
    customize_order,
    resolve_base,
    user_dir,
)
from builder.run import host_env


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
    """What every step shares: the frozen settings, and what the build records as it goes
    (timings, stages) for the manifest. What a step makes, it returns."""

    config: Config
    options: Options
    board: Board
    cache: Cache
    http: Http
    ledger: Ledger = field(default_factory=Ledger)
    timings: dict[str, float] = field(default_factory=dict)
    script_timings: dict[str, float] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    setup_partition: dict[str, Any] | None = None    # what add-setup-partition added


# Every step, in the order a build runs them; check-host and resolve-base-image are all a dry
# run does, and fetch-base-image ends a --fetch-only run.
STEPS: tuple[tuple[str, str], ...] = (
    ("check-host", "check host tools, keyring, scripts and templates before any download"),
    ("resolve-base-image", "find the base image (Armbian's index or --base)"),
    ("fetch-base-image", "download, verify (sha256, signature) and decompress into the cache"),
    ("copy-base-image", "copy the base image to a workspace (the cache stays untouched)"),
    ("grow-image", "add headroom: file, root partition, filesystem"),
    ("mount-root", "mount the root filesystem on a loop device"),
    ("customize-image", "run customize.d/ in a qemu chroot, lay in overlays/:"),
    ("finalize-image", "remove build-only state, list the packages, clear free space"),
    ("shrink-image", "unmount; shrink the filesystem, the partition and the file"),
    ("add-setup-partition", "a small FAT partition with jupyter-firstboot.conf, to edit on any "
                            "computer after flashing"),
    ("write-outputs", "compress, sha256, bmap"),
    ("write-manifest", "the SBOM, the manifest, the files scripts handed over, the build log"),
    ("publish-outputs", "move every output into place at once"),
)
_STEP_NAMES = [name for name, _ in STEPS]


@contextmanager
def step(ctx: Context, name: str) -> Iterator[None]:
    """Time one step of the table above, for the manifest."""
    assert name in _STEP_NAMES, name
    log.debug(f"step {name}")
    started = time.monotonic()
    yield
    ctx.timings[name] = time.monotonic() - started


def run_build(ctx: Context) -> None:
    with step(ctx, "check-host"):
        checked = check_host(ctx)
    with step(ctx, "resolve-base-image"):
        source = resolve_base(ctx)
    if ctx.options.dry_run:
        dry_run(ctx, checked, source)
        return
    with step(ctx, "fetch-base-image"):
        base = fetch_base_image(ctx, checked, source)
    if ctx.options.fetch_only:
        log.result(str(base.path))
        return
    build_image(ctx, checked, source, base)


def dry_run(ctx: Context, checked: Checked, source: fetch.BaseSource) -> None:
    """The plan, then the one check a plan can fail after it is shown: room on the disks."""
    entry = plan.cached_base(ctx, source)
    # What a build would copy into its workspace: the cache's entry, or a raw image read in
    # place.
    base = entry.path if entry else Path(source.location) if source.used_in_place else None
    rooms = plan.print_plan(ctx, checked, source, planned_steps(ctx.config), entry,
                            forecast_stages(ctx, checked, base))
    for room in rooms:
        if not room.enough:
            raise BuildError(f"not enough space for the {room.what} in {room.path}: it needs "
                             f"about {log.human_size(room.need)}, {log.human_size(room.free)} "
                             f"is free; free some or use {room.fix} on a larger disk")


def forecast_stages(ctx: Context, checked: Checked, base: Path | None) -> plan.StageForecast:
    """Where a build would start among the scripts, from the step cache: the lookup a build
    makes before its first script, with the cached base's contents (read, not copied) and an
    empty work directory. Nothing in the cache is changed."""
    cfg = ctx.config
    if cfg.cache.stages_size <= 0:
        return plan.StageForecast(note="off (cache.stages_size is 0): every script runs")
    if ctx.options.no_cache:
        return plan.StageForecast(note="not used (--no-cache): every script runs, and the "
                                       "new stages are kept")
    if base is None:
        return plan.StageForecast(note="not looked up: its keys start from the base image's "
                                       "contents, which are not in the cache yet")
    cache = stage_cache_of(ctx.cache, cfg)
    if not cache.root.is_dir() or not any(cache.root.iterdir()):
        return plan.StageForecast(note=f"empty ({cache.root}): every script runs")
    log.info(f"reading {base} for the step cache's keys")
    key = stages.key_of_base(
        stages.image_digest(base), customize.template_context(cfg, ctx.board)["board"],
        cfg.base.release, cfg.image.headroom, cfg.to_dict()["emulation"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "output").mkdir()
        hit = _cached_ahead(ctx, cache, StageKeys(ctx, checked, work),
                            customize_order(checked.scripts), 0, key)
    if hit is None:
        return plan.StageForecast(note=f"no stage in {cache.root} matches: every script runs")
    _, _, entry = hit
    return plan.StageForecast(
        script=entry.script,
        note=f"the build starts after {entry.script}, from {entry.path} (a script that reads "
             f"what earlier ones wrote may find a later stage once they ran)")


def fetch_base_image(ctx: Context, checked: Checked, source: fetch.BaseSource) -> CachedImage:
    if source.kind == "debian":
        return debian.build_base(ctx.board, ctx.config.base.release,
                                 ctx.config.base.debian_mirror, ctx.cache, ctx.ledger,
                                 checked.emulation)
    return fetch.fetch_base_image(source, cache=ctx.cache, http=ctx.http, trust=checked.trust,
                                  offline=ctx.options.offline)


def stage_cache_of(cache: Cache, config: Config) -> stages.StageCache:
    return stages.StageCache(cache.root / "stages", cache.locks, config.cache.stages_size,
                             config.cache.stage_days)


def build_image(ctx: Context, checked: Checked, source: fetch.BaseSource,
                base: CachedImage) -> None:
    cfg = ctx.config
    check_free_space(ctx, base)
    name = output.build_name(cfg.output.product, ctx.board.id, cfg.base.release,
                             datetime.date.today())
    with output.outputs(ctx.ledger, user_dir(cfg.output.dir), name,
                        cfg.image.compression) as out, ExitStack() as build:
        with log.build_log(out.temporary(".build.log")):
            log.info(f"building {name} for {ctx.board.name} from {source.label}")
            with step(ctx, "copy-base-image"):
                work = build.enter_context(copy_base_image(ctx, base))
            with step(ctx, "grow-image"):
                partition = grow_image(ctx, work)
            with ExitStack() as rooted:
                with step(ctx, "mount-root"):
                    root = rooted.enter_context(mount_root(ctx, work, partition))
                with step(ctx, "customize-image"):
                    customize_image(ctx, checked, work, root)
                with step(ctx, "finalize-image"):
                    packages, inventory = finish.finalize_image(ctx, root)
            with step(ctx, "shrink-image"):
                finish.shrink_image(ctx, work, partition)
            if finish.wants_setup_partition(ctx.config):
                with step(ctx, "add-setup-partition"):
                    finish.add_setup_partition(ctx, work, name)
            with step(ctx, "write-outputs"):
                finish.write_outputs(ctx, work, out)
            with step(ctx, "write-manifest"):
                finish.write_manifest(ctx, work, out, source, base, packages, inventory)
            log.info(f"image written: {out.final(out.image_suffix)}")
        with step(ctx, "publish-outputs"):
            published = out.publish()
    for path in published:
        log.result(str(path))


@dataclass(frozen=True)
class Workspace:
    """A build's own directory in the cache: the working image, the files scripts hand each
    other (work/), and what they hand to the outputs (work/output)."""

    path: Path
    base_digest: str     # of what was copied, whatever the base's source said; keys stages

    @property
    def image(self) -> Path:
        return self.path / "image.img"

    @property
    def work(self) -> Path:
        return self.path / "work"


@contextmanager
def copy_base_image(ctx: Context, base: CachedImage) -> Iterator[Workspace]:
    """A workspace holding a copy of the base, for the rest of the build; removed after it
    unless --keep-workspace."""
    parent = ctx.cache.root / "work"
    parent.mkdir(parents=True, exist_ok=True)
    sweep_workspaces(parent)
    kind = "kept" if ctx.options.keep_workspace else "build"
    path = Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=parent))
    with ExitStack() as stack:
        if not ctx.options.keep_workspace:
            stack.enter_context(work_path(ctx.ledger, path))
        stack.enter_context(locked(path / ".lock"))
        log.info(f"copying the base image to {path / 'image.img'}")
        digest = stages.copy_image(base.path, path / "image.img")
        workspace = Workspace(path, digest)
        (workspace.work / "output").mkdir(parents=True)
        yield workspace


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


def grow_image(ctx: Context, work: Workspace) -> image.Partition:
    table = image.read_table(work.image)
    root = image.find_root(ctx.ledger, work.image, table)
    return image.grow(ctx.ledger, work.image, table, root, ctx.config.image.headroom)


class RootMount:
    """The root filesystem on a loop device, mounted in the workspace. The step cache copies
    or replaces the image file: `unmounted()` takes the mount away for that and puts it back."""

    def __init__(self, ctx: Context, work: Workspace, partition: image.Partition) -> None:
        self._ledger, self._image, self._partition = ctx.ledger, work.image, partition
        self._target = work.path / "root"
        self._held: ExitStack | None = None

    @property
    def path(self) -> Path:
        assert self._held is not None, "the root is not mounted"
        return self._target

    def mount(self) -> None:
        with ExitStack() as held:
            device = held.enter_context(loop_device(self._ledger, self._image,
                                                    self._partition.start,
                                                    self._partition.size))
            held.enter_context(mounted(self._ledger, device, self._target, fstype="ext4"))
            self._held = held.pop_all()

    def unmount(self) -> None:
        """Unmounted and synced: the image file can be copied or replaced."""
        held, self._held = self._held, None
        if held is not None:
            held.close()

    @contextmanager
    def unmounted(self) -> Iterator[None]:
        self.unmount()
        yield
        self.mount()


@contextmanager
def mount_root(ctx: Context, work: Workspace, partition: image.Partition) -> Iterator[RootMount]:
    root = RootMount(ctx, work, partition)
    root.mount()
    try:
        yield root
    finally:
        root.unmount()


def customize_image(ctx: Context, checked: Checked, work: Workspace, root: RootMount) -> None:
    """Run the scripts, with the overlays laid in before the first one numbered 50 or more.
    Before each script the step cache is asked for the furthest state ahead whose key can be
    known already; a hit puts that state in place and the build goes on after it."""
    cfg = ctx.config
    cache = None
    if cfg.cache.stages_size > 0:
        cache = stage_cache_of(ctx.cache, cfg)
        cache.prepare()
    keys = StageKeys(ctx, checked, work.work)
    key = stages.key_of_base(
        work.base_digest, customize.template_context(cfg, ctx.board)["board"],
        cfg.base.release, cfg.image.headroom, cfg.to_dict()["emulation"])
    plan = customize_order(checked.scripts)
    with ExitStack() as session:
        chroot: Chroot | None = None

        def end_session() -> None:
            nonlocal chroot
            session.close()
            chroot = None

        index = 0
        while index < len(plan):
            hit = None if cache is None else _cached_ahead(ctx, cache, keys, plan, index, key)
            if hit is not None and cache is not None:
                end_session()
                index, key = _restore_stage(ctx, cache, work, root, plan, index, key, hit)
                continue
            item = plan[index]
            key = keys.after(item, key)
            if item == OVERLAYS:
                # Between sessions: their tmpfs on /run, /tmp and /dev would swallow files
                # laid there.
                end_session()
                files = customize.apply_overlays(checked.overlay_dirs, root.path,
                                                 checked.rendered)
                log.info(f"laid {files} overlay files into the image")
            else:
                assert isinstance(item, customize.Script)
                if chroot is None:
                    chroot = session.enter_context(_session(ctx, checked, work, root))
                ctx.script_timings[item.name] = customize.run_script(
                    item, chroot, cfg, ctx.board, host_env=_host_env(ctx))
                if item.keep and cache is not None:
                    end_session()
                    _store_stage(ctx, cache, work, root, item, key)
            index += 1


class StageKeys:
    """The step cache's key after each item of the plan, from the key before it."""

    def __init__(self, ctx: Context, checked: Checked, work: Path) -> None:
        self._ctx, self._checked, self._work = ctx, checked, work
        self._overlays: str | None = None

    def after(self, item: customize.Script | str, previous: str) -> str:
        if item == OVERLAYS:
            return stages.key_of_overlays(previous, self._overlays_digest())
        assert isinstance(item, customize.Script)
        settings = customize.settings_for(item, self._ctx.config.to_dict())
        # A setting that names a file stands for the file's contents too.
        files = {name: sha256_of(Path(value))
                 for name, value in _file_settings(settings).items()}
        code = None
        if item.where == "host":
            code = stages.code_digest(item.code if item.code is not None else
                                      stages.all_code())
        inputs = stages.tree_digest(self._work, item.reads)
        return stages.key_of_script(previous, item.name, item.path.read_bytes(),
                                    {"settings": settings, "files": files}, inputs, code)

    def _overlays_digest(self) -> str:
        if self._overlays is None:
            # Templates by their place in the overlays, not on this host: a checkout
            # elsewhere or an installed copy makes the same key.
            tops = self._checked.overlay_dirs
            rendered = {f"{number}/{path.relative_to(top).as_posix()}": text
                        for number, top in enumerate(tops)
                        for path, text in self._checked.rendered.items()
                        if path.is_relative_to(top)}
            self._overlays = stages.digest_of({
                "trees": [stages.tree_digest(d) for d in tops], "rendered": rendered})
        return self._overlays


FILE_SETTINGS = (("firstboot", "preseed"),)


def _file_settings(settings: dict[str, Any]) -> dict[str, str]:
    found = {}
    for section, key in FILE_SETTINGS:
        value = settings.get(section, {}).get(key)
        if value:
            found[f"{section}.{key}"] = value
    return found


def _cached_ahead(ctx: Context, cache: stages.StageCache, keys: StageKeys,
                  plan: list[customize.Script | str], index: int,
                  key: str) -> tuple[int, str, stages.Entry] | None:
    """The furthest entry from plan[index] on whose key is known now: a script that reads
    the work directory ends the look ahead unless it is the next one (what the skipped
    scripts would have written there is not known)."""
    if ctx.options.no_cache:
        return None
    best = None
    for position in range(index, len(plan)):
        item = plan[position]
        if (position > index and isinstance(item, customize.Script)
                and item.reads != ()):
            break
        key = keys.after(item, key)
        entry = cache.lookup(key)
        if entry is not None:
            best = (position, key, entry)
    return best


def _restore_stage(ctx: Context, cache: stages.StageCache, work: Workspace, root: RootMount,
                   plan: list[customize.Script | str], index: int, key: str,
                   hit: tuple[int, str, stages.Entry]) -> tuple[int, str]:
    """Put a cached state in place; returns where the plan goes on and the key there. A
    damaged entry is dropped and the plan goes on where it was."""
    position, found, entry = hit
    with root.unmounted():
        restored = cache.restore(entry, work.image, work.work)
    if not restored:
        return index, key
    skipped = [item.name for item in plan[index:position + 1]
               if isinstance(item, customize.Script)]
    log.info(f"step cache: the image after {entry.script} (key {found[:12]}) restored; "
             f"skipped {', '.join(skipped) or 'the overlays'}")
    for name in skipped:
        ctx.script_timings[name] = 0.0
    ctx.stages.append({"after": entry.script, "key": found, "from_cache": True})
    return position + 1, found


def _store_stage(ctx: Context, cache: stages.StageCache, work: Workspace, root: RootMount,
                 script: customize.Script, key: str) -> None:
    started = time.monotonic()
    with root.unmounted():
        entry = cache.store(key, script.name, work.image, work.work,
                            {"base": work.base_digest, "board": ctx.board.id},
                            replace=ctx.options.no_cache)
    if entry is not None:
        log.info(f"step cache: kept the image after {script.name} (key "
                 f"{key[:12]}) in {time.monotonic() - started:.1f} s")
        ctx.stages.append({"after": script.name, "key": key, "from_cache": False})


@contextmanager
def _session(ctx: Context, checked: Checked, work: Workspace,
             root: RootMount) -> Iterator[Chroot]:
    cfg = ctx.config
    apt_cache = ctx.cache.root / "apt" / f"{cfg.base.release}-{ctx.board.arch}"
    with chroot_session(ctx.ledger, root.path, ctx.board.arch, apt_cache=apt_cache,
                        apt_proxy=cfg.apt.proxy, env={}, emulation=checked.emulation,
                        quick_apt=cfg.emulation.quick_apt,
                        binds={customize.WORK_IN_IMAGE: work.work}) as chroot:
        yield chroot


HOST_SCRIPT_TOOLS = stages.BUILDER_DIR / "hostbin"


def _host_env(ctx: Context) -> dict[str, str]:
    """What a host script sees: what every host program does (run.host_env) and IMAGE_*."""
    env = host_env()
    cache = ctx.cache.root / "host"
    cache.mkdir(parents=True, exist_ok=True)
    env.update(IMAGE_CACHE=str(cache), IMAGE_OFFLINE="1" if ctx.options.offline else "0",
               IMAGE_BUILDER_PYTHON=sys.executable)
    # image-path, for paths inside the image resolved as the image resolves them.
    env["PATH"] = f"{HOST_SCRIPT_TOOLS}:{env.get('PATH', os.defpath)}"
    return env


def planned_steps(config: Config) -> list[tuple[str, str]]:
    """The steps this build runs, as the dry run lists them."""
    return [(name, summary) for name, summary in STEPS
            if name != "add-setup-partition" or finish.wants_setup_partition(config)]
