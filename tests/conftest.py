"""Shared fixtures: a fake Armbian mirror on loopback, a real gpg key, the CLI as a subprocess."""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))

from firstboot_card import card, wizard_program  # noqa: F401 - fixtures of every test
from mirror import Mirror

REPO = Path(__file__).resolve().parent.parent
SNAPSHOT = REPO.parent / "shared" / "data" / "armbian-images.json"
BUILD_IMAGE = [sys.executable, "-m", "builder"]
TRY_IMAGE = [sys.executable, "-m", "builder.tryimage"]


_config: pytest.Config | None = None
_terminal: int | None = None
_width_seen = 0       # the reporter's line width when progress() last wrote
_progress_lock = threading.Lock()


def pytest_configure(config: pytest.Config) -> None:
    global _config, _terminal
    _config = config
    # pytest points descriptor 1 at a capture file while a test runs (and its reporter with
    # it); a copy taken now, outside any test, still reaches the terminal or CI's log.
    _terminal = os.dup(1)


def progress(text: str) -> None:
    """A line on the terminal at once, while a long test waits (the appliance's builds and
    boots take many minutes): pytest shows a test's own output only when it has ended, and a
    run stopped by CI's time limit would otherwise not say where it was. Safe from threads."""
    reporter = _config.pluginmanager.get_plugin("terminalreporter") if _config else None
    line = f"[{time.strftime('%H:%M:%S')}] {text}\n"
    with _progress_lock:
        if _terminal is None:
            print(line, end="", file=sys.__stderr__, flush=True)
            return
        global _width_seen
        width = reporter._tw.width_of_current_line if reporter is not None else 0
        if width and width != _width_seen:
            line = "\n" + line     # after the dots pytest wrote since
        _width_seen = width
        os.write(_terminal, line.encode(errors="replace"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests that await work started in the background (the appliance's boots, minutes of
    # emulation on one core) run last, so that all the others run on the other core meanwhile.
    items.sort(key=lambda item: item.get_closest_marker("late") is not None)     # stable
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (loop devices, mounts): run the tests with sudo")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def make_raw_image(seed: int, size: int = 6 << 20) -> bytes:
    """A stand-in disk image: incompressible data at both ends (so downloads take real bytes)
    and zeros in between (so sparse decompression has something to skip)."""
    rng = random.Random(seed)
    edge = 1 << 20
    return rng.randbytes(edge) + bytes(size - 2 * edge) + rng.randbytes(edge)


@dataclass
class Published:
    asset: dict[str, Any]
    raw: bytes
    compressed: bytes
    path: str            # URL path of the .img.xz on the mirror

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.compressed).hexdigest()


@dataclass
class FakeArmbian:
    """Armbian's layout on a local server: /<board>/archive/<file>.img.xz with .sha and .asc,
    and /armbian-images.json listing them with URLs that point at the server."""

    mirror: Mirror
    root: Path
    gpg: Gpg | None = None
    assets: list[dict[str, Any]] = field(default_factory=list)

    @property
    def index_url(self) -> str:
        return f"{self.mirror.url}/armbian-images.json"

    @property
    def index_path(self) -> Path:
        return self.root / "armbian-images.json"

    @property
    def args(self) -> list[str]:
        """What a build needs to take images from here at the default base.verify
        (signature): the index, and the test's key added to Armbian's shipped one."""
        assert self.gpg is not None
        return ["--armbian-index", self.index_url, *self.gpg.args]

    def publish(self, board: str, version: str = "26.5.1", distro: str = "trixie",
                branch: str = "current", variant: str = "minimal", *, seed: int = 1,
                repository: str = "archive", application: str = "",
                sign: bool = True) -> Published:
        raw = make_raw_image(seed)
        compressed = lzma.compress(raw, format=lzma.FORMAT_XZ, preset=0)
        target = self._target(board, version, distro, branch, variant)
        target.write_bytes(compressed)
        asset = self._add(board, version, distro, branch, variant, target, repository,
                          application, sign)
        return Published(asset=asset, raw=raw, compressed=compressed,
                         path=f"/{target.relative_to(self.root)}")

    def publish_image(self, board: str, image: Path, version: str = "26.5.1",
                      distro: str = "trixie", branch: str = "current",
                      variant: str = "minimal") -> dict[str, Any]:
        """A real disk image, compressed as Armbian compresses its images (xz -0), with its
        .sha and .asc."""
        target = self._target(board, version, distro, branch, variant)
        with open(target, "wb") as out:
            subprocess.run(["xz", "-0", "-T0", "-c", str(image)], stdout=out, check=True)
        return self._add(board, version, distro, branch, variant, target, "archive", "", True)

    def _target(self, board: str, version: str, distro: str, branch: str,
                variant: str) -> Path:
        suffix = "" if variant == "server" else f"_{variant}"
        name = f"Armbian_{version}_{board.capitalize()}_{distro}_{branch}_6.18.33{suffix}.img.xz"
        target = self.root / board / "archive" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def _add(self, board: str, version: str, distro: str, branch: str, variant: str,
             target: Path, repository: str, application: str, sign: bool) -> dict[str, Any]:
        digest = hashlib.sha256()
        with open(target, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        name = target.name
        target.with_name(name + ".sha").write_text(f"{digest.hexdigest()} {name}\n")
        if sign and self.gpg is not None:
            self.gpg.sign(target)
        url = f"{self.mirror.url}/{target.relative_to(self.root)}"
        asset = {
            "board_slug": board, "board_name": board, "board_vendor": "xunlong",
            "board_support": "conf", "armbian_version": version, "file_url": url,
            "file_url_asc": url + ".asc", "file_url_sha": url + ".sha",
            "file_url_torrent": url + ".torrent",
            "redi_url": f"{self.mirror.url}/{board}/{distro.capitalize()}_{branch}_{variant}",
            "file_size": str(target.stat().st_size), "file_date": "2026-05-20T10:00:00Z",
            "distro": distro, "branch": branch, "variant": variant,
            "file_application": application, "promoted": "false",
            "download_repository": repository, "file_extension": "img.xz",
            "kernel_version": "6.18.33",
        }
        self.assets.append(asset)
        self.write_index()
        return asset

    def write_index(self) -> None:
        self.index_path.write_text(json.dumps({"assets": self.assets}, indent=1))


class Gpg:
    """A real OpenPGP key made for the test session in a throwaway GNUPGHOME."""

    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir(mode=0o700)
        self.env = {**os.environ, "GNUPGHOME": str(home)}
        self._gpg("--quick-gen-key", "Armbian Test <test@invalid>", "ed25519", "sign", "never")
        self.keyring = home.parent / "armbian-test.gpg"
        self.keyring.write_bytes(self._gpg("--export"))
        self.armored_keyring = home.parent / "armbian-test.asc"
        self.armored_keyring.write_bytes(self._gpg("--export", "--armor"))

    @property
    def args(self) -> list[str]:
        """Trust this key too (besides Armbian's, shipped with the builder)."""
        return ["--gpg-keyring", str(self.armored_keyring)]

    @property
    def fingerprint(self) -> str:
        listed = self._gpg("--with-colons", "--list-keys").decode()
        return next(line.split(":")[9] for line in listed.splitlines()
                    if line.startswith("fpr:"))

    def _gpg(self, *args: str) -> bytes:
        return subprocess.run(["gpg", "--batch", "--passphrase", "", *args], env=self.env,
                              check=True, capture_output=True).stdout

    def sign(self, path: Path) -> Path:
        asc = path.with_name(path.name + ".asc")
        asc.unlink(missing_ok=True)
        self._gpg("--armor", "--detach-sign", "--output", str(asc), str(path))
        return asc

    def close(self) -> None:
        subprocess.run(["gpgconf", "--kill", "all"], env=self.env, check=False)


@pytest.fixture(scope="session")
def gpg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gpg]:
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed: apt-get install gpg (ci/setup-host does)")
    key = Gpg(tmp_path_factory.mktemp("gpg") / "home")
    yield key
    key.close()


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    root = tmp_path / "srv"
    root.mkdir()
    with Mirror(root) as server:
        yield server


@pytest.fixture
def armbian(mirror: Mirror, gpg: Gpg) -> FakeArmbian:
    return FakeArmbian(mirror=mirror, root=mirror.root, gpg=gpg)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def run_cli(*args: str | os.PathLike[str], env: dict[str, str] | None = None,
            timeout: float = 120, user: int | None = None) -> subprocess.CompletedProcess[str]:
    """build-image as users run it: a separate process, output captured as text."""
    argv = [*BUILD_IMAGE, *map(os.fspath, args)]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(argv, cwd=REPO, env=env or cli_env(), capture_output=True,
                          text=True, timeout=timeout)


NOBODY = 65534


def require_nobody_can_run() -> None:
    """Skip unless the unprivileged user nobody can run the checkout's Python (a clone
    under /root, mode 700, cannot be)."""
    python = os.path.realpath(sys.executable)
    probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                            "--clear-groups", python, "-c",
                            f"import os; os.listdir({str(REPO)!r})"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"the checkout or its Python is not readable by user nobody: "
                    f"{probe.stderr.decode(errors='replace').strip()[-200:]}")


# The image engine's tests build on images made here (make_base_image), which nobody signs:
# they lower the base's check, which test_fetch.py tests on its own.
UNSIGNED_BASE = ("--base-verify", "none")
# The engine alone, quickly: no appliance scripts (test_appliance.py has them), a fast
# compression, little headroom, a base nobody signed.
ENGINE_ONLY = ("--set", "image.compression=zstd", "--set", "image.compression_level=3",
               "--set", "image.headroom=512MiB", "--set", "customize.builtin=false",
               *UNSIGNED_BASE)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def leftovers(cache: Path) -> list[str]:
    """Files under the cache that look finished or half-written; a failed fetch must leave
    neither (partial downloads kept for resuming are listed separately by the tests)."""
    found = []
    for sub in ("downloads", "images"):
        base = cache / sub
        if base.exists():
            found += [str(p.relative_to(cache)) for p in base.rglob("*") if p.is_file()]
    return found


def error_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The one-line error a failed run must end with: no traceback, exit status 1 (2 for a
    usage error: what the command line asks for cannot be)."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("build-image: error: "), result.stderr
    assert sum(line.startswith("build-image: error:") for line in lines) == 1
    return lines[-1]


# Base images for the image engine: a real Debian root filesystem for arm64, made once with
# debootstrap (qemu-user-static runs its second stage) and kept outside the checkout, so a
# later run reuses it; a cold run makes it again (about 3 minutes).

TEST_CACHE = Path(os.environ.get("BUILD_IMAGE_TEST_CACHE", "/var/cache/orangepi-jupyter-tests"))
# build-image's own cache for the tests that build with --base debian: the Debian bases,
# apt's archives and the wheels stay between runs.
BUILD_CACHE = TEST_CACHE / "build-cache"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")


def engine_capable() -> str | None:
    """Why this machine cannot run the image engine's tests, or None."""
    if os.geteuid() != 0:
        return "needs root (loop devices, mounts, chroot): run the tests with sudo"
    for tool in ("debootstrap", "losetup", "sfdisk", "mkfs.ext4", "bmaptool"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: run ci/setup-host --dev"
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return "qemu-aarch64 is not registered with binfmt_misc: run ci/setup-host --dev"
    return None


@pytest.fixture(scope="session")
def debian_rootfs() -> Path:
    import fcntl

    reason = engine_capable()
    if reason:
        pytest.skip(reason)
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    key = "trixie-arm64-minbase"
    target = TEST_CACHE / key
    with open(TEST_CACHE / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            tmp = TEST_CACHE / f".{key}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            # The CPU model the builder uses: debootstrap's second stage in a fraction of
            # the time qemu's default takes. The Release file checked as the builder
            # checks its Debian bases' (debian.debootstrap_argv).
            subprocess.run(["debootstrap", "--arch=arm64", "--variant=minbase",
                            "--keyring=/usr/share/keyrings/debian-archive-keyring.gpg",
                            "--force-check-gpg", "trixie",
                            str(tmp), DEBIAN_MIRROR], check=True, capture_output=True,
                           timeout=1500, env={**os.environ, "QEMU_CPU": "cortex-a53"})
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            (target / ".complete").touch()
    return target


@dataclass
class BaseImage:
    path: Path
    table: str
    first_partition: int     # bytes
    gap: bytes               # what lies between the partition table and the first partition


ARMBIAN_CNF_HOOK = ('## This file is provided by command-not-found\n'
                    'APT::Update::Post-Invoke-Success { "mkdir -p /var/lib/command-not-found '
                    '&& date >> /var/lib/command-not-found/hook-ran"; };\n')


def make_base_image(rootfs: Path, work: Path, *, table: str = "dos", armbian: bool = True,
                    size_mib: int = 600, label: str = "armbi_root") -> BaseImage:
    """An image laid out like Armbian's: MBR with root at 4 MiB (sunxi), or GPT with root at
    16 MiB (rk3588); random bytes where the bootloader would be."""
    tree = work / "tree"
    # Hard links: instant, and the cached root filesystem is never written to (files are only
    # added or replaced below, never changed in place).
    subprocess.run(["cp", "-al", str(rootfs), str(tree)], check=True)
    (tree / ".complete").unlink(missing_ok=True)
    if armbian:
        (tree / "etc/armbian-release").write_text(
            "BOARD=orangepi5\nBOARD_NAME=\"Orange Pi 5\"\nBOARDFAMILY=rockchip-rk3588\n"
            "LINUXFAMILY=rockchip-rk3588\nARCH=arm64\nVERSION=26.5.1\n")
        (tree / "root/.not_logged_in_yet").write_text("")
        for unit in ("getty@.service.d", "serial-getty@.service.d"):
            override = tree / "etc/systemd/system" / unit
            override.mkdir(parents=True, exist_ok=True)
            (override / "override.conf").write_text(
                "[Service]\nExecStart=\nExecStart=-/sbin/agetty --noissue --autologin root "
                "%I $TERM\n")
        ssh = tree / "etc/ssh"
        ssh.mkdir(exist_ok=True)
        (ssh / "ssh_host_ed25519_key").write_text("a key every card would share\n")
        (ssh / "sshd_config").write_text("Include /etc/ssh/sshd_config.d/*.conf\n"
                                         "PermitRootLogin yes\nUsePAM yes\n")
        # Armbian's root password, 1234 (replaced, not edited: the tree is hard-linked).
        shadow = tree / "etc/shadow"
        lines = shadow.read_text().splitlines()
        shadow.unlink()
        shadow.write_text("".join(
            ("root:$y$j9T$armbian$RZ6dsJ4pWw0ObVBPnAeV3ppT3aOajBzVTTxqGZPqGh8:20000:0:99999:7:::"
             if line.startswith("root:") else line) + "\n" for line in lines))
        shadow.chmod(0o640)
        resolv = tree / "etc/resolv.conf"
        resolv.unlink(missing_ok=True)
        resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
        # Armbian ships command-not-found's apt hook and man-db with auto-update on: the
        # build sets both aside. This hook leaves a mark where it ran.
        (tree / "etc/apt/apt.conf.d/50command-not-found").write_text(ARMBIAN_CNF_HOOK)
        (tree / "var/lib/man-db").mkdir(parents=True, exist_ok=True)
        (tree / "var/lib/man-db/auto-update").write_text("")
    start = (4 if table == "dos" else 16) << 20
    path = work / "base.img"
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    layout = f"label: {table}\nstart={start // 512}, type=" + \
        ("83" if table == "dos" else "0FC63DAF-8483-4772-8E79-3D69D8477DE4") + "\n"
    subprocess.run(["sfdisk", "-q", str(path)], input=layout.encode(), check=True)
    table_end = 512 if table == "dos" else 34 * 512
    gap = random.Random(42).randbytes(start - table_end)
    with open(path, "r+b") as f:
        f.seek(table_end)
        f.write(gap)
    size_k = ((size_mib << 20) - start - (33 * 512 if table == "gpt" else 0)) // 1024
    subprocess.run(["mkfs.ext4", "-q", "-L", label, "-d", str(tree), "-E",
                    f"offset={start}", str(path), f"{size_k}k"], check=True)
    shutil.rmtree(tree)
    return BaseImage(path, table, start, gap)


def leftover_resources(where: Path) -> list[str]:
    """Loop devices backed by files under `where` and mounts under it: a build must leave
    none, whether it succeeded, failed or was interrupted."""
    found = []
    loops = subprocess.run(["losetup", "--list", "--noheadings", "--output",
                            "NAME,BACK-FILE"], capture_output=True, text=True).stdout
    found += [line for line in loops.splitlines() if str(where) in line]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if line.split()[4].startswith(str(where)):
            found.append(line)
    return found


def root_partition(image: Path, offset: int) -> Path:
    """The root filesystem of an image, copied out once next to it, for debugfs to read
    without a loop device or a mount."""
    part = image.with_name(image.name + ".root")
    if not part.exists():
        subprocess.run(["dd", f"if={image}", f"of={part}", "bs=1M", f"skip={offset >> 20}",
                        "status=none"], check=True)
    return part


def debugfs(filesystem: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["debugfs", "-R", command, str(filesystem)], capture_output=True,
                          text=True, env={**os.environ, "DEBUGFS_PAGER": "cat"})


@contextmanager
def local_jupyter(base: Path, app: str, token: str, *args: str, scheme: str = "http",
                  ready: Callable[[str], bool] | None = None) -> Iterator[tuple[str, Path]]:
    """A real Jupyter server (`jupyter lab` or `jupyter server`) from the test venv on
    127.0.0.1, with every config, data and runtime dir under `base`; (URL, log) once
    `ready(URL)` says so (by default: the token gets an answer over plain HTTP), terminated
    afterwards. A server given a certificate in `args` serves `scheme` https."""
    env = dict(os.environ)
    # Jupyter's config, runtime and data dirs and IPython's all come from here, so the
    # server neither reads nor writes the user's.
    for var, sub in (("HOME", "home"), ("JUPYTER_CONFIG_DIR", "config"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTER_DATA_DIR", "data"),
                     ("IPYTHONDIR", "ipython"), ("XDG_CONFIG_HOME", "xdg-config"),
                     ("XDG_CACHE_HOME", "xdg-cache"), ("XDG_DATA_HOME", "xdg-data")):
        (base / sub).mkdir()
        env[var] = str(base / sub)
    (base / "notebooks").mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = base / "server.log"
    argv = [str(Path(sys.executable).parent / "jupyter"), app,
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
            # Without this a taken port is silently replaced by the next one, and the tests
            # would talk to whatever listens there (QEMU's port forward of another test).
            "--ServerApp.port_retries=0",
            f"--ServerApp.token={token}", "--ServerApp.open_browser=False",
            f"--ServerApp.root_dir={base / 'notebooks'}", "--allow-root", *args]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, env=env, cwd=base,
                                   start_new_session=True)
    try:
        url = f"{scheme}://127.0.0.1:{port}"

        def answers(url: str) -> bool:
            with requests.Session() as session:
                session.trust_env = False
                answer = session.get(f"{url}/api/status",
                                     headers={"Authorization": f"token {token}"}, timeout=5)
                return answer.status_code == 200

        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"jupyter {app} exited with {process.returncode}:\n"
                            f"{log.read_text()}")
            with contextlib.suppress(requests.RequestException):
                if (ready or answers)(url):
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter {app} did not answer in 120 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield url, log
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

