"""Running programs inside the image: a chroot under qemu-user-static, kept hygienic.

Every program runs in namespaces of its own (`contained`): its own PID namespace and /proc,
so nothing of the host's process tree is visible or reachable, and its own mount, IPC and
UTS namespaces. While a chroot session is open:
  - sysfs (read-only), /dev, /dev/pts are mounted, and tmpfs on /run and /tmp;
  - /usr/sbin/policy-rc.d answers 101, so package scripts start no services;
  - /etc/resolv.conf is a real file with the host's resolvers (Armbian ships a symlink into
    /run/systemd, which dangles in a chroot);
  - apt refuses unsigned repositories whatever the image's apt.conf.d says, and an apt
    proxy, when configured, is set in /etc/apt/apt.conf.d;
  - the host's apt archive cache is bind-mounted on /var/cache/apt/archives, so a rebuild
    downloads no .deb twice.
On the way out every one of these is put back exactly as it was (a symlink stays a symlink).
Every path under the root is resolved inside the image (builder/inside.py): the image's own
symlinks never lead a write to the host.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from builder import log
from builder.errors import BuildError
from builder.files import locked
from builder.inside import entry_in_root, in_root, remove_entry, write_file
from builder.ledger import Ledger
from builder.mount import kill_processes_under, mounted
from builder.run import die_with_parent, run, stream

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Debian architecture → what `uname -m` says and the qemu-user binary that emulates it.
QEMU = {
    "arm64": ("aarch64", "qemu-aarch64"),
    "armhf": ("armv7l", "qemu-arm"),
    "riscv64": ("riscv64", "qemu-riscv64"),
}
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
PROXY_CONF = "etc/apt/apt.conf.d/00build-image-proxy"


@dataclass(frozen=True)
class Binfmt:
    """How the kernel runs `arch` binaries: `usable` without help; `interpreter` is where
    an entry without the F flag looks for qemu (inside the chroot); `problem` says what is
    wrong, with the fix."""

    usable: bool
    interpreter: str | None
    problem: str


def binfmt_status(arch: str) -> Binfmt:
    """The kernel needs an enabled binfmt_misc entry for the architecture. With the F (fix
    binary) flag it opened qemu when the entry was registered, and a chroot needs nothing;
    without it, qemu is looked up at the entry's path inside the chroot at every exec."""
    _, qemu = QEMU[arch]
    entry = BINFMT_DIR / qemu
    setup = "sudo ci/setup-host registers it (or: apt-get install qemu-user-static)"
    if not (BINFMT_DIR / "status").exists():
        return Binfmt(False, None, f"binfmt_misc is not mounted at {BINFMT_DIR}: {setup}")
    try:
        text = entry.read_text()
    except OSError:
        return Binfmt(False, None, f"no binfmt entry for {arch} ({entry}): {setup}")
    if not text.startswith("enabled"):
        return Binfmt(False, None, f"the binfmt entry {entry} is disabled: echo 1 > {entry}")
    fields = dict(line.split(" ", 1) for line in text.splitlines()[1:] if " " in line)
    interpreter = fields.get("interpreter", "").strip() or None
    flags = text.split("flags:", 1)[1].splitlines()[0].strip() if "flags:" in text else ""
    if "F" not in flags:
        return Binfmt(False, interpreter,
                      f"the binfmt entry {entry} lacks the F flag (flags: {flags or 'none'})")
    return Binfmt(True, interpreter, "")


def static_qemu(arch: str) -> Path | None:
    """The host's static qemu for `arch`, under either name distributions use."""
    _, qemu = QEMU[arch]
    for name in (f"{qemu}-static", qemu):
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


# The CPU qemu-user emulates for the image's programs (QEMU_CPU), by architecture: the
# fastest model that ran every program of the images, measured with ci/bench-emulation.
# qemu's default for aarch64 is "max", which before QEMU 10 computes pointer authentication
# with the QARMA5 cipher in software: pure Python ran 23 times slower on QEMU 7.2 (40.0 s
# against 1.7 s), and cortex-a53 is still the fastest on QEMU 10.0 (2.2 s against 4.5 s).
# For armhf no model was faster than qemu's default (cortex-a7, cortex-a15, max all within
# 3 %): it keeps it. cortex-a53 is the oldest arm64 core of the boards: nothing built for
# them needs more.
FAST_CPU = {"arm64": "cortex-a53"}
CPU_AUTO, CPU_QEMU_DEFAULT = "auto", "qemu"


@dataclass(frozen=True)
class Emulation:
    """How the image's programs are emulated: `cpu` goes into QEMU_CPU (None: qemu's own
    default), `note` says which and why for the build log."""

    cpu: str | None
    note: str

    @property
    def env(self) -> dict[str, str]:
        return {"QEMU_CPU": self.cpu} if self.cpu else {}


def emulator(arch: str) -> Path | None:
    """The qemu that runs the image's programs, to ask for its version and CPU models.
    Debian's binfmt entries name a wrapper (aarch64-binfmt-P) that only the kernel may start;
    it runs the qemu of the same package, the one found here."""
    qemu = static_qemu(arch)
    if qemu is not None:
        return qemu
    binfmt = binfmt_status(arch)
    return Path(binfmt.interpreter) if binfmt.interpreter else None


def qemu_cpu_models(qemu: Path) -> tuple[str, set[str]]:
    """The version of `qemu` and the CPU models it knows (`-cpu help`)."""
    version = run([qemu, "--version"], capture=True, what=f"ask {qemu} its version")
    words = version.stdout.decode(errors="replace").split()
    number = words[words.index("version") + 1] if "version" in words else "?"
    # QEMU 7.2 exits 1 after listing them.
    listing = run([qemu, "-cpu", "help"], capture=True, check=False)
    models = {line.split()[0] for line in listing.stdout.decode(errors="replace").splitlines()
              if line.startswith(" ") and line.split()}
    if not models:
        raise BuildError(f"{qemu} -cpu help listed no CPU models: reinstall qemu-user-static "
                         f"(sudo ci/setup-host)")
    return number, models


def choose_emulation(arch: str, setting: str = CPU_AUTO) -> Emulation:
    """The CPU model for `arch` under `setting` (emulation.cpu): "auto" is FAST_CPU's when
    this qemu has it, "qemu" is qemu's own default, anything else a model qemu must know."""
    qemu = emulator(arch)
    if setting == CPU_QEMU_DEFAULT:
        return Emulation(None, f"{arch} programs run on qemu's default CPU "
                               f"(emulation.cpu={setting})")
    if setting == CPU_AUTO and arch not in FAST_CPU:
        return Emulation(None, f"{arch} programs run on qemu's default CPU: no model was "
                               f"measured faster")
    if qemu is None:
        raise BuildError(f"no qemu for {arch} on this host: sudo ci/setup-host installs it")
    version, models = qemu_cpu_models(qemu)
    name = f"{qemu.name} {version}"
    if setting == CPU_AUTO:
        model = FAST_CPU[arch]
        if model not in models:
            return Emulation(None, f"{name} has no {model} CPU: {arch} programs run on its "
                                   f"default CPU, which may be many times slower")
        return Emulation(model, f"{arch} programs run as {model} (QEMU_CPU) on {name}: "
                                f"the fastest model measured; emulation.cpu=qemu for qemu's "
                                f"default")
    if setting not in models:
        raise BuildError(f"emulation.cpu={setting}: {name} has no such CPU model; choose one "
                         f"of `{qemu} -cpu help`, or auto")
    return Emulation(setting, f"{arch} programs run as {setting} (QEMU_CPU, emulation.cpu) "
                              f"on {name}")


def contained(root: Path, argv: Sequence[str]) -> list[str]:
    """argv run in the image with namespaces of its own, so its programs cannot reach the
    host's processes: a PID namespace with the image's own /proc (a maintainer script's
    `kill -9 -1` or a walk of /proc/1/root finds only its own run), a mount namespace (what
    it mounts vanishes with it; the session's mounts are shared with it), IPC and UTS (its
    `hostname` stays its own). The program is the namespace's first process: when it exits,
    the kernel ends everything it left running. unshare dies with the builder (Chroot.run),
    and --kill-child then ends the program, so a killed build leaves nothing running.
    Being /proc/1 itself, the program makes Debian's `ischroot` answer "not a chroot"; what
    tells a running system from the build is /run/systemd/system (our /run is empty).

    Root inside is still root (mknod, raw devices): this contains accidents and careless
    scripts, not a hostile image. Signatures are what keep those out."""
    return ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--ipc", "--uts",
            f"--mount-proc={in_root(root, 'proc')}", "chroot", str(root), *argv]


@dataclass
class Chroot:
    root: Path
    arch: str
    env: dict[str, str]

    def path(self, inside: str) -> Path:
        """The host path of `inside`, resolved as the image resolves it."""
        return in_root(self.root, inside)

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
            prefix: str | None = None, what: str | None = None) -> None:
        """Run argv inside the image with a clean environment, streaming its output."""
        dies_with_builder = die_with_parent()

        def prepare() -> None:
            _limit_open_files()
            dies_with_builder()

        stream(contained(self.root, argv), env={**self.env, **(env or {})},
               prefix=prefix, what=what or " ".join(argv), preexec=prepare)

    def runs(self, argv: Sequence[str], env: Mapping[str, str]) -> bool:
        """Whether argv exits 0 in the image with env added, its output not shown."""
        proc = run(contained(self.root, argv), env={**self.env, **env}, capture=True,
                   check=False)
        return proc.returncode == 0


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a program in the image: nothing inherited from the host
    (no PIP_*, no proxy, no locale the image lacks)."""
    env = {
        "PATH": PATH,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": "/root",
        "TERM": os.environ.get("TERM", "dumb"),
        "DEBIAN_FRONTEND": "noninteractive",
        "DEBCONF_NONINTERACTIVE_SEEN": "true",
    }
    env.update(extra or {})
    return env


@contextmanager
def _replaced_file(root: Path, inside: str, content: bytes, mode: int,
                   keep_changes: bool = False) -> Iterator[None]:
    """`inside` holds `content` for a while; then exactly what was there before comes back:
    the same file, the same symlink, or nothing. With `keep_changes`, a symlink that a
    package put there meanwhile (systemd-resolved's resolv.conf) is left as it is. Its
    directory is resolved in the image; a symlink at `inside` itself is replaced, never
    written through."""
    path = entry_in_root(root, inside)
    saved: tuple[str, bytes | str, int] | None = None
    if path.is_symlink():
        saved = ("link", os.readlink(path), 0)
    elif path.is_file():
        st = path.stat()
        saved = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode))
    created: list[Path] = []   # directories made for it, deepest last, to remove again
    parent = path.parent
    while not parent.exists():
        created.insert(0, parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, content, mode)
    try:
        yield
    finally:
        # Only a package that made it a symlink (systemd-resolved, resolvconf) keeps its
        # version: anything else, such as a script that added the build host's resolvers,
        # must not reach the image.
        if not (keep_changes and path.is_symlink()):
            _restore(path, saved, created)


def _restore(path: Path, saved: tuple[str, bytes | str, int] | None,
             created: list[Path]) -> None:
    remove_entry(path)
    for directory in reversed(created):
        with contextlib.suppress(OSError):   # not empty: something else lives there now
            directory.rmdir()
    if saved is not None:
        kind, data, old_mode = saved
        if kind == "link":
            os.symlink(data, path)
        else:
            assert isinstance(data, bytes)
            write_file(path, data, old_mode)


# apt configuration for the build only. The hooks apt runs after `apt-get update` rebuild
# caches from the package lists (command-not-found's database, AppStream's metadata): under
# emulation they took most of an update (Armbian's build sets them aside for the same
# reason), and the finished image ships without package lists, so the board's first update
# runs them again anyway.
QUICK_APT_CONF = "etc/apt/apt.conf.d/99zz-build-image-hooks"
QUICK_APT = b"""// build-image: during the build only, gone from the finished image.
#clear APT::Update::Post-Invoke-Success;
"""
# apt's defaults refuse unsigned and weakly signed repositories; an image's own apt.conf.d
# could turn that off. This file sorts after every numbered one, so during the build its
# settings win. (A sources line marked [trusted=yes] is the image's explicit choice.)
SIGNED_APT_CONF = "etc/apt/apt.conf.d/zz-build-image-signed"
SIGNED_APT = b"""// build-image: during the build only, gone from the finished image.
Acquire::AllowInsecureRepositories "false";
Acquire::AllowWeakRepositories "false";
Acquire::AllowDowngradeToInsecureRepositories "false";
APT::Get::AllowUnauthenticated "false";
"""
# While this file exists, man-db's dpkg trigger rebuilds the whole manual database after each
# dpkg run (debconf man-db/auto-update); the session rebuilds it once at its end instead.
MAN_DB_AUTO_UPDATE = "var/lib/man-db/auto-update"
# apt closes every possible descriptor before it starts a program: in a container whose limit
# is a million or more that loop alone took hours under emulation.
OPEN_FILES = 1024


@contextmanager
def _set_aside(path: Path) -> Iterator[bool]:
    """`path` is out of the way for a while (renamed beside itself), then back. Yields
    whether there was anything to set aside. One that a package made anew meanwhile stays."""
    if not path.is_file() or path.is_symlink():
        yield False
        return
    aside = path.with_name(path.name + ".build-image-aside")
    os.rename(path, aside)
    try:
        yield True
    finally:
        if path.exists() or path.is_symlink():
            aside.unlink()
        else:
            os.rename(aside, path)


@contextmanager
def _quick_apt(root: Path, run_in_image: Callable[[list[str]], None]) -> Iterator[None]:
    """apt and dpkg without the work the board redoes, or that can wait for the end."""
    status = in_root(root, "var/lib/dpkg/status")
    before = status.stat().st_mtime_ns if status.exists() else None
    with _replaced_file(root, QUICK_APT_CONF, QUICK_APT, 0o644), \
            _set_aside(in_root(root, MAN_DB_AUTO_UPDATE)) as man_db_aside:
        yield
        # Once, as the trigger would have after the session's last dpkg run, so `man -k` on
        # the board knows the pages the build installed. Not after a failure.
        changed = status.exists() and status.stat().st_mtime_ns != before
        if man_db_aside and changed and in_root(root, "usr/bin/mandb").exists():
            run_in_image(["mandb", "--quiet"])


def _limit_open_files() -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > OPEN_FILES:
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, hard))


# A minimal /dev: the nodes programs in a chroot expect, and nothing that reaches the
# host's disks. (major, minor) of character devices.
DEV_NODES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
             "urandom": (1, 9), "tty": (5, 0)}


def populate_dev(dev: Path) -> None:
    for name, (major, minor) in DEV_NODES.items():
        os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    for name, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"),
                         ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, dev / name)
    (dev / "pts").mkdir()
    (dev / "shm").mkdir(mode=0o1777)
    (dev / "shm").chmod(0o1777)


def host_resolv_conf() -> bytes:
    try:
        return Path("/etc/resolv.conf").read_bytes()
    except OSError:
        return b""


def _checked_emulation(session: Chroot, emulation: Emulation) -> Emulation:
    """A CPU model the image's programs fail on (built for newer cores) is no model: then
    qemu's default, said once."""
    if emulation.cpu is None:
        return emulation
    probe = ["/bin/sh", "-c", "exec dpkg --version" if session.path("usr/bin/dpkg").exists()
             else "exit 0"]
    if session.runs(probe, emulation.env) or not session.runs(probe, {}):
        return emulation
    log.warn(f"this image's programs do not run on an emulated {emulation.cpu}: qemu's "
             f"default CPU instead, which may be many times slower (emulation.cpu)")
    return Emulation(None, "qemu's default CPU")


@contextmanager
def chroot_session(ledger: Ledger, root: Path, arch: str, *, apt_cache: Path | None,
                   apt_proxy: str | None, env: Mapping[str, str],
                   emulation: Emulation | None = None, quick_apt: bool = True,
                   binds: Mapping[str, Path] | None = None) -> Iterator[Chroot]:
    """A chroot into `root` for `arch` programs, emulated as `emulation` says (by default the
    fast CPU model), with apt's slow hooks set aside unless `quick_apt` is false, and each
    host directory of `binds` mounted at its path in the image (below /tmp)."""
    if emulation is None:
        emulation = choose_emulation(arch)
    with ExitStack() as stack:
        binfmt = binfmt_status(arch)
        if not binfmt.usable:
            # Without the F flag the interpreter must exist inside the chroot, at the path
            # the entry names: put the static qemu there for the build (the classic
            # workaround), and take it out again.
            qemu = static_qemu(arch)
            if qemu is None or binfmt.interpreter is None:
                raise BuildError(f"cannot run {arch} programs: {binfmt.problem}")
            stack.enter_context(_replaced_file(root, binfmt.interpreter, qemu.read_bytes(),
                                               0o755))
        # No proc here: each program gets its own, of its PID namespace (`contained`).
        in_root(root, "proc").mkdir(exist_ok=True)
        for source, target, fstype, options in (
            ("sysfs", "sys", "sysfs", ("nosuid", "nodev", "noexec", "ro")),
            ("tmpfs", "dev", "tmpfs", ("mode=755", "nosuid", "size=16m")),
            ("devpts", "dev/pts", "devpts", ("gid=5", "mode=620", "ptmxmode=666")),
            ("tmpfs", "dev/shm", "tmpfs", ("mode=1777", "nosuid", "nodev")),
            ("tmpfs", "run", "tmpfs", ("mode=755", "nosuid", "nodev")),
            ("tmpfs", "tmp", "tmpfs", ("mode=1777", "nosuid", "nodev")),
        ):
            stack.enter_context(mounted(ledger, source, in_root(root, target), fstype=fstype,
                                        options=options))
            if target == "dev":
                populate_dev(in_root(root, "dev"))
        stack.enter_context(_replaced_file(root, "usr/sbin/policy-rc.d",
                                           b"#!/bin/sh\n# build-image: no services now\nexit 101\n",
                                           0o755))
        stack.enter_context(_replaced_file(root, "etc/resolv.conf", host_resolv_conf(), 0o644,
                                           keep_changes=True))
        stack.enter_context(_replaced_file(root, SIGNED_APT_CONF, SIGNED_APT, 0o644))
        if apt_proxy:
            # http only: an apt cache such as apt-cacher-ng refuses to tunnel HTTPS.
            conf = f'Acquire::http::Proxy "{apt_proxy}";\n'
            stack.enter_context(_replaced_file(root, PROXY_CONF, conf.encode(), 0o644))
        if apt_cache is not None:
            apt_cache.mkdir(parents=True, exist_ok=True)
            (apt_cache / "partial").mkdir(exist_ok=True)
            # apt does not wait for the archive's lock: two builds of one release and
            # architecture take turns on the shared cache instead of failing at random.
            stack.enter_context(locked(
                apt_cache.with_name(apt_cache.name + ".lock"),
                on_wait=lambda: log.info(f"waiting for another build using the apt cache "
                                         f"{apt_cache}")))
            stack.enter_context(mounted(ledger, str(apt_cache),
                                        in_root(root, "var/cache/apt/archives"), bind=True))
        for inside, directory in (binds or {}).items():
            if not inside.startswith("/tmp/"):
                raise BuildError(f"{inside}: only directories below /tmp are mounted into "
                                 f"a session")
            mount_point = in_root(root, inside)
            mount_point.mkdir(parents=True, exist_ok=True)
            stack.enter_context(mounted(ledger, str(directory), mount_point, bind=True))
        session = Chroot(root=root, arch=arch, env=clean_env(env))
        session.env.update(_checked_emulation(session, emulation).env)
        if quick_apt:
            stack.enter_context(_quick_apt(root, lambda argv: session.run(
                argv, prefix=argv[0], what=f"{argv[0]} in the image")))
        # Registered last, so it runs first on the way out: nothing may still run in the
        # image when its mounts go.
        stack.callback(kill_processes_under, root)
        yield session
