"""The appliance: the built-in customize.d/ and overlays/ built for an armhf board the way users
build it, from an Armbian image (an Armbian-like one made from the Debian base, published with
its .sha and signature on a local mirror that mimics Armbian's, with a --preseed), and for an
arm64 board on the Debian base; then inspected offline in a qemu chroot of the finished image:
the stack imports, the units are enabled and verify, nothing secret is in the image, and after
the first-boot wizard has run in it (from the preseed), Jupyter answers over HTTP to the
password and the token it set. Both images are booted with try-image --smoke."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from armbian_like import CNF_HOOK, make_armbian_like
from conftest import (
    BUILD_CACHE,
    BUILD_IMAGE,
    REPO,
    TRY_IMAGE,
    UNSIGNED_BASE,
    BaseImage,
    FakeArmbian,
    Gpg,
    cli_env,
    engine_capable,
    error_line,
    leftover_resources,
    make_base_image,
    progress,
    run_cli,
)
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from mirror import Mirror
from packageurl import PackageURL

from builder import jupyter_client, pinning
from builder.cache import Cache
from builder.chroot import Chroot, chroot_session, contained
from builder.firstboot import tls
from builder.firstboot.answers import KEYS, Answers, parse_preseed
from builder.firstboot.card import Settings
from builder.image import find_root, read_table
from builder.ledger import Ledger
from builder.mount import loop_device, mounted
from builder.setup_partition import find_setup_drive, read_setup_file

pytestmark = [pytest.mark.root, pytest.mark.slow]

# Boards Debian has U-Boot for, one per architecture; their bases are cached between runs.
BOARDS = {"armhf": "orangepipcplus", "arm64": "orangepizeroplus2-h5"}
# The armhf build starts from an Armbian-like image of this board (tests/armbian_like.py).
ARMBIAN_BOARD = ("Orange Pi PC +", "sun8i-h3-orangepi-pc-plus.dtb")
CACHE = BUILD_CACHE
VENV = "/opt/jupyter"
# What the armhf build's preseed sets: hashes only, so no plain password is in the image.
LOGIN = "login pässword; 'quoted' $HOME"
JUPYTER = "jupyter pässword \"$(true)\""
TOKEN = "appliance-test-token-0123456789"
# The systemd units overlays/ (and --base debian) add to an image.
OUR_UNITS = {path.name.removesuffix(".j2")
             for path in (REPO / "overlays/etc/systemd/system").glob("*.service*")} | \
    {"grow-root-filesystem.service"}
STACK = ("numpy", "scipy", "pandas", "matplotlib", "sympy", "xlrd", "requests", "PIL", "geopy",
         "shapely", "pyproj", "geopandas", "osmnx")


@dataclass
class Appliance:
    arch: str
    board: str
    outputs: dict[str, Path]
    log: str
    raw: Path
    base: Path              # the base image the build started from, uncompressed
    resolv_conf: str        # debugfs's stat of /etc/resolv.conf, before any test mounts it


@dataclass
class Image:
    appliance: Appliance
    root: Path
    chroot: Chroot
    device: str

    def run(self, *argv: str, user: str | None = None, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
        if user:
            argv = ("runuser", "-u", user, "--", *argv)
        result = subprocess.run(contained(self.root, argv), env=self.chroot.env,
                                capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, (argv, result.stdout, result.stderr)
        return result


@dataclass
class Smoke:
    proc: subprocess.Popen[str]
    work: Path
    image: Path
    sha256: str         # of the image before try-image (or flash-image) read it
    shown: threading.Thread     # showing try-image's log as it grows


# The armhf smoke's card: flash-image puts the Jupyter password and token (and its
# --hostname) onto the setup drive; Armbian Imager's presets give the login password, a time
# zone and a locale, and what this image ignores (quoted as Imager quotes: the password is
# `smoke login pässword "$5"`); the image's preseed has the rest. Every password is known, so
# nobody answers the wizard.
SMOKE_PRESEED = ("jupyter_password = smoke jupyter pw\n"
                 "jupyter_token = smoke-test-token-0123456789abcdef\n")
SMOKE_PRESET = ('PRESET_LOCALE="en_GB.UTF-8"\nPRESET_TIMEZONE="Europe/Paris"\n'
                'SET_LANG_BASED_ON_LOCATION="n"\nPRESET_ROOT_PASSWORD="1234"\n'
                'PRESET_USER_NAME="jupyter"\n'
                'PRESET_USER_PASSWORD="smoke login pässword \\"\\$5\\""\n'
                'PRESET_USER_SHELL="bash"\nPRESET_DEFAULT_REALNAME="Smoke"\n')
# The arm64 smoke's setup drive, filled in as on Windows (try-image --preseed): no
# passwords, so the smoke answers the wizard for them.
ARM64_DRIVE = "hostname = lab-arm64\ntimezone = Asia/Tokyo\n"


# The armhf image is flashed onto a card (a loop device) with flash-image first, with this
# hostname over the image's own preseed: the smoke boots the card as flash-image left it.
FLASHED_HOSTNAME = "flashed-pc"
FLASH_IMAGE = [sys.executable, "-m", "builder.flash"]

# What try-image says when the wizard's unit on the serial console failed.
EMULATOR_CRASH = "the setup wizard's unit on the serial console failed"

# The smoke's phases that can take longest, limited to what fits CI's time: about six times
# what they took here alone (userspace 178 s, second boot 223 s) and twice the slowest seen
# while the rest of the suite ran beside them (a second boot of 570 s), where try-image's
# defaults, made for any machine, allow 25 and 40 minutes. A hung guest fails with its log.
SMOKE_TIMEOUTS = {"userspace": 1200, "jupyter": 900, "cell": 900, "second-boot": 1200}


def show_log(proc: subprocess.Popen[str], log: Path, name: str) -> threading.Thread:
    """Shows on the terminal, until `proc` ends, each line of the program's own that its log
    gains (not the indented or bracketed output of what it runs), so that a long build or boot
    says where it is while it runs, also in a CI log cut short. Returns the thread doing it."""
    def show_new_lines(shown: int) -> int:
        with open(log, "rb") as f:
            f.seek(shown)
            data = f.read()
        done = data[:data.rfind(b"\n") + 1]
        for line in done.decode(errors="replace").splitlines():
            if line.strip() and not line.startswith((" ", "\t", "[")):
                progress(f"{name}: {line[:160]}")
        return shown + len(done)

    def run() -> None:
        shown = 0
        while True:
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                shown = show_new_lines(shown)
        show_new_lines(shown)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def finish(proc: subprocess.Popen[str], shown: threading.Thread, limit: float) -> str:
    """`proc`'s stdout once it ended, killed after `limit` seconds; its log shown to the end."""
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        progress(f"{shown.name}: still running after {limit:.0f} s: killed")
        proc.kill()
        out, _ = proc.communicate()
    shown.join()
    return out or ""


class Builds:
    """Both appliance builds, started together: each spends most of its time in one
    emulated dpkg or Python process, so two of them use a 2-core machine's second core. Each
    finished image is booted with try-image --smoke at once, while the other tests run."""

    def __init__(self, work: Path, gpg: Gpg) -> None:
        self.work = work
        self.gpg = gpg
        self.started: dict[str, tuple[subprocess.Popen[str], Path]] = {}
        self.bases: dict[str, Path] = {}
        self.smokes: dict[str, Smoke] = {}
        self.finishing: dict[str, threading.Thread] = {}
        self.failures: dict[str, str] = {}
        self.stopping = False
        self.servers = ExitStack()
        self.armbian_sha: str | None = None

    def start(self) -> None:
        for arch in BOARDS:
            self.finishing[arch] = threading.Thread(target=self._build, args=(arch,))
            self.finishing[arch].start()

    def _build(self, arch: str) -> None:
        """Builds, then boots the image with try-image the moment it is there."""
        board = BOARDS[arch]
        log = self.work / f"{arch}.log"
        argv = [*BUILD_IMAGE, "--board", board, "--cache-dir", str(CACHE), "--output",
                str(self.work / arch / "out"), "--compress", "zstd", "--set",
                "image.compression_level=3"]
        try:
            if arch == "arm64":
                # Emulated imports that test_stack_imports_from_the_venv repeats on the
                # finished image; the armhf build runs the check as shipped. The tests prove
                # what the scripts do, so they all run every time (--no-cache), and their
                # stages are kept anew: keeping a real appliance's image is tested too. Room
                # for this run's two (5.3 GB here), so that the test cache does not grow by
                # that much with every change of the code until the default 16 GiB.
                argv += ["--base", "debian", "--set", "packages.check_imports=[]",
                         "--no-cache", "--set", "cache.stages_size=7GiB"]
            else:
                # A base made anew for each run: no stage of it could ever be used again.
                argv += [*self.publish_armbian_like(arch), "--preseed", str(self.preseed()),
                         "--set", "cache.stages_size=0"]
        except (AssertionError, subprocess.CalledProcessError) as exc:
            self.failures[arch] = f"making the base failed: {exc}"
            return
        if self.stopping:
            return
        with open(log, "w") as stderr:
            proc = subprocess.Popen(argv, cwd=REPO, env=cli_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=stderr)
        self.started[arch] = (proc, log)
        finish(proc, show_log(proc, log, f"build-image {arch}"), 3600)
        self.forget_armbian_like()
        if proc.returncode == 0 and not self.stopping:
            image = next((self.work / arch / "out").glob("*.img.zst"))
            try:
                self.start_smoke(arch, image)
            except (AssertionError, subprocess.CalledProcessError) as exc:
                self.failures[arch] = str(exc)

    def forget_armbian_like(self) -> None:
        """Every run makes the Armbian-like base anew (another sha256): once built on, its
        download and decompressed image leave the test cache, which would otherwise grow by
        a gigabyte a run. The Debian base, apt's archives and the wheels stay."""
        if self.armbian_sha is None:
            return
        cache = Cache(CACHE)
        shutil.rmtree(cache.downloads / self.armbian_sha, ignore_errors=True)
        for path in (cache.image_path(self.armbian_sha), cache.image_record(self.armbian_sha),
                     cache.locks / f"{self.armbian_sha}.lock"):
            path.unlink(missing_ok=True)

    def publish_armbian_like(self, arch: str) -> list[str]:
        """The board's Debian base (built, or from the cache) made Armbian-like and published
        on a local mirror laid out like Armbian's, signed by the test's key: build-image finds
        it in the index, downloads it, checks its sha256 and signature, as with Armbian's own.
        Returns the build's arguments for it."""
        board = BOARDS[arch]
        progress(f"build-image {arch}: the Debian base (debootstrap, unless in the test cache)")
        debian = run_cli("--board", board, "--base", "debian", "--fetch-only", "--cache-dir",
                         CACHE, timeout=3600)
        assert debian.returncode == 0, f"the Debian base: {debian.stderr[-3000:]}"
        raw = self.work / arch / "armbian-like.img"
        raw.parent.mkdir(parents=True, exist_ok=True)
        make_armbian_like(Path(debian.stdout.splitlines()[-1]), raw, board, *ARMBIAN_BOARD)
        self.bases[arch] = raw
        root = self.work / "armbian-mirror"
        root.mkdir()
        mirror = self.servers.enter_context(Mirror(root))
        armbian = FakeArmbian(mirror=mirror, root=root, gpg=self.gpg)
        asset = armbian.publish_image(board, raw)
        sha = root / board / "archive" / (asset["file_url"].rsplit("/", 1)[1] + ".sha")
        self.armbian_sha = sha.read_text().split()[0]
        return ["--armbian-index", armbian.index_url, "--gpg-keyring", str(self.gpg.keyring)]

    def preseed(self) -> Path:
        from jupyter_server.auth import passwd

        from builder.firstboot.answers import hash_login_password
        path = self.work / "jupyter-firstboot.conf"
        path.write_text(f"# hashes only: every card from this image would share them\n"
                        f"login_password_hash = {hash_login_password(LOGIN)}\n"
                        f"jupyter_password_hash = {passwd(JUPYTER)}\n"
                        f"jupyter_token = {TOKEN}\nhostname = pcplus-lab\n"
                        f"timezone = Europe/Berlin\n")
        return path

    def result(self, arch: str) -> tuple[int, str]:
        self.finishing[arch].join()
        assert arch in self.started, self.failures.get(arch)
        proc, log = self.started[arch]
        return proc.returncode, log.read_text()

    def start_smoke(self, arch: str, image: Path, attempt: int = 1) -> None:
        """try-image --smoke on a finished image, started as soon as it is built: booting
        takes minutes of emulation, which run while the other tests inspect the images."""
        work = self.work / arch / ("try" if attempt == 1 else f"try{attempt}")
        work.mkdir()
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        boot, extra = image, []
        if arch == "armhf":
            preseed = work / "smoke.conf"
            preseed.write_text(SMOKE_PRESEED)
            progress(f"flash-image {arch}: the image onto a card (a loop device)")
            boot, _ = self.flash_card(image, work, preseed)
            # The card as flashed, with Armbian Imager's presets where Imager writes them.
            (work / "preset.txt").write_text(SMOKE_PRESET)
            extra = ["--armbian-preset", str(work / "preset.txt")]
        else:
            (work / "drive.conf").write_text(ARM64_DRIVE)
            extra = ["--preseed", str(work / "drive.conf")]
        limits = [f"--timeout={phase}={seconds}" for phase, seconds in SMOKE_TIMEOUTS.items()]
        argv = [*TRY_IMAGE, str(boot), "--smoke", "--report", str(work / "report"),
                "--workdir", str(work), *limits, *extra]
        with open(work / "try-image.log", "w") as stderr:
            proc = subprocess.Popen(argv, cwd=REPO, env=cli_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=stderr)
        shown = show_log(proc, work / "try-image.log", f"try-image {arch}")
        self.smokes[arch] = Smoke(proc, work, image, digest, shown)

    @staticmethod
    def flash_card(image: Path, work: Path, preseed: Path) -> tuple[Path, Path]:
        """flash-image onto a 4 GiB card (a loop device over a sparse file), with the smoke's
        passwords and a hostname of its own, which go onto the card's setup drive (the card
        merges them into the image's preseed at first boot). Returns the card and the file
        flash-image wrote on the drive (with LF line ends)."""
        card = work / "card.img"
        with open(card, "wb") as f:
            f.truncate(4 << 30)
        device = subprocess.run(["losetup", "--find", "--show", str(card)], check=True,
                                capture_output=True, text=True).stdout.strip()
        try:
            flashed = subprocess.run([*FLASH_IMAGE, str(image), device, "--yes", "--force",
                                      "--preseed", str(preseed), "--hostname",
                                      FLASHED_HOSTNAME], cwd=REPO, capture_output=True,
                                     text=True, timeout=1800)
        finally:
            subprocess.run(["losetup", "--detach", device], check=True)
        (work / "flash-image.log").write_text(flashed.stderr)
        assert flashed.returncode == 0, f"flash-image failed: {flashed.stderr[-3000:]}"
        assert "verified: the card holds the image" in flashed.stderr
        drive = find_setup_drive(card)
        assert drive is not None, "the flashed card has no setup drive"
        data = read_setup_file(card, drive[0])
        assert data is not None, "flash-image left no jupyter-firstboot.conf on the setup drive"
        assert data.count(b"\r\n") == data.count(b"\n"), "CRLF, as the template has"
        text = data.decode().replace("\r\n", "\n")
        lines = text.splitlines()
        assert f"hostname = {FLASHED_HOSTNAME}" in lines, text
        assert [line for line in preseed.read_text().splitlines()
                if not line.startswith("hostname")
                and line not in lines] == [], "the card lines of --preseed"
        on_card = work / "card-preseed.conf"
        on_card.write_text(text)
        return card, on_card

    def smoke(self, arch: str) -> tuple[Smoke, str, str]:
        assert arch not in self.failures, self.failures.get(arch)
        assert arch in self.smokes, f"try-image was not started for {arch} (see the build)"
        smoke, stdout, stderr = self._wait(self.smokes[arch])
        if smoke.proc.returncode != 0 and EMULATOR_CRASH in stderr:
            # QEMU's emulated H3 once crashed python3 (SIGSEGV) running the wizard: a fault of
            # the emulator, not of the image. Once more, said out loud; twice is a failure.
            print(f"try-image --smoke on {arch}: the wizard crashed under emulation; "
                  f"booting a second time\n{stdout}")
            self.start_smoke(arch, smoke.image, attempt=2)
            smoke, stdout, stderr = self._wait(self.smokes[arch])
        return smoke, stdout, stderr

    @staticmethod
    def _wait(smoke: Smoke) -> tuple[Smoke, str, str]:
        # Every phase has its limit; this one is for try-image itself.
        stdout = finish(smoke.proc, smoke.shown, 2 * 3600)
        # The flashed card (2 GiB of a machine's disk) is not needed once it was booted.
        (smoke.work / "card.img").unlink(missing_ok=True)
        return smoke, stdout, (smoke.work / "try-image.log").read_text()

    def stop(self) -> None:
        self.stopping = True
        for proc, _ in self.started.values():
            if proc.poll() is None:
                proc.terminate()
        for thread in self.finishing.values():
            thread.join()
        for proc in [p for p, _ in self.started.values()] + \
                [s.proc for s in self.smokes.values()]:
            if proc.poll() is None:
                proc.terminate()
                proc.communicate()
        self.servers.close()


# For the session: the boots it starts are awaited by the last tests of the run (marked late),
# so that every other test runs meanwhile.
@pytest.fixture(scope="session")
def builds(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           gpg: Gpg) -> Iterator[Builds]:
    reason = engine_capable()
    if reason:
        pytest.skip(reason)
    builds = Builds(tmp_path_factory.mktemp("appliance"), gpg)
    failed_before = request.session.testsfailed
    builds.start()
    yield builds
    builds.stop()
    if request.session.testsfailed == failed_before:
        # Some 15 GB of images, built, decompressed and flashed, that nothing needs now; the
        # logs and try-image's reports stay. After a failure, all stay for looking into.
        # Named places only: a walk of the tree could enter a chroot's mounts.
        for pattern in ("*/*.img", "*/out/*.img*", "*/try*/*.img"):
            for path in builds.work.glob(pattern):
                path.unlink()


@pytest.fixture(scope="module", params=sorted(BOARDS))
def appliance(request: pytest.FixtureRequest, builds: Builds) -> Appliance:
    arch = request.param
    code, log = builds.result(arch)
    assert code == 0, log[-5000:]
    work = builds.work / arch
    assert leftover_resources(work) == []
    if arch not in builds.bases:
        # The Debian base the build started from, from the cache now.
        base = run_cli("--board", BOARDS[arch], "--base", "debian", "--fetch-only",
                       "--cache-dir", CACHE)
        assert base.returncode == 0, base.stderr
        builds.bases[arch] = Path(base.stdout.splitlines()[-1])
    outputs = {p.name.split(".", 1)[1]: p for p in (work / "out").iterdir()}
    raw = work / "image.img"
    subprocess.run(["zstd", "-q", "-d", "-f", str(outputs["img.zst"]), "-o", str(raw)],
                   check=True)
    ledger = Ledger()
    part = find_root(ledger, raw, read_table(raw)).partition
    with loop_device(ledger, raw, part.start, part.size, read_only=True) as device:
        resolv = subprocess.run(["debugfs", "-R", "stat /etc/resolv.conf", device],
                                capture_output=True, text=True, check=True).stdout
    return Appliance(arch, BOARDS[arch], outputs, log, raw, builds.bases[arch], resolv)


@pytest.fixture(scope="module")
def image(appliance: Appliance) -> Iterator[Image]:
    """The finished image's root filesystem, mounted from a copy, in a chroot session."""
    ledger = Ledger()
    with ExitStack() as stack:
        table = read_table(appliance.raw)
        part = find_root(ledger, appliance.raw, table).partition
        device = stack.enter_context(loop_device(ledger, appliance.raw, part.start, part.size))
        root = stack.enter_context(mounted(ledger, device, appliance.raw.parent / "root",
                                           fstype="ext4"))
        session = stack.enter_context(chroot_session(ledger, root, appliance.arch,
                                                     apt_cache=None, apt_proxy=None, env={}))
        yield Image(appliance, root, session, device)
    assert leftover_resources(appliance.raw.parent) == []


def test_the_setup_drive_follows_the_root_with_the_template(appliance: Appliance) -> None:
    """After flashing, any computer shows the image's last partition as a drive named
    JUPYTER-CFG, with the settings file (every key there, none answered) and a README in the
    line ends Notepad wants; the card reads and removes it at first boot."""
    table = read_table(appliance.raw)
    root = find_root(Ledger(), appliance.raw, table).partition
    drive = table.last
    assert drive.number == root.number + 1 and drive.start >= root.end
    assert drive.size == 8 << 20 and drive.type == "e"
    assert drive.end == appliance.raw.stat().st_size, "nothing after it"
    where = f"{appliance.raw}@@{drive.start}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    listing = subprocess.run(["mdir", "-b", "-i", where, "::/"], capture_output=True,
                             text=True, env=env, check=True).stdout.split()
    assert listing == ["::/README.txt", "::/jupyter-firstboot.conf"]
    label = subprocess.run(["blkid", "-p", "-o", "value", "-s", "LABEL", "-O",
                            str(drive.start), str(appliance.raw)], capture_output=True,
                           text=True).stdout.strip()
    assert label == "JUPYTER-CFG"
    conf = subprocess.run(["mcopy", "-n", "-i", where, "::/jupyter-firstboot.conf", "-"],
                          capture_output=True, env=env, check=True).stdout
    assert conf.count(b"\r\n") == conf.count(b"\n") > 20, "CRLF, for Notepad"
    text = conf.decode()
    for key in KEYS:
        assert re.search(rf"^#{key} =", text, re.MULTILINE), key
    answers, problems = parse_preseed(conf, Path("/"), Settings())
    assert problems == [] and answers == Answers(), "the template answers nothing"
    manifest = json.loads(appliance.outputs["manifest.json"].read_text())
    assert manifest["setup_partition"] == {"number": drive.number, "label": "JUPYTER-CFG",
                                           "size": 8 << 20,
                                           "files": ["README.txt", "jupyter-firstboot.conf"]}


def test_outputs_name_what_the_venv_holds(appliance: Appliance) -> None:
    assert set(appliance.outputs) >= {"img.zst", "img.zst.sha256", "img.bmap", "manifest.json",
                                      "build.log", "requirements.txt"}
    lock = appliance.outputs["requirements.txt"].read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) --hash=sha256:[0-9a-f]{64}$", lock,
                           re.MULTILINE))
    assert {"jupyterlab", "notebook", "ipykernel", "ipywidgets"} <= set(pins)
    assert pins["notebook"].startswith("7.")
    manifest = json.loads(appliance.outputs["manifest.json"].read_text())
    python = manifest["python"]
    assert python["venv"] == VENV and python["version"].startswith("3.")
    assert {name.lower(): v for name, v in python["venv_packages"].items()}["jupyterlab"] == \
        pins["jupyterlab"]
    # Jupyter's compiled dependencies are Debian's, held at Debian's version, on both arches.
    assert "pyzmq" not in pins and "tornado" not in pins
    assert {"pyzmq", "tornado"} <= set(python["debian_packages"])
    debs = {p["name"] for p in manifest["packages"]}
    assert {"python3-numpy", "python3-geopandas", "python3-osmnx", "build-essential",
            "libgdal-dev", "python3-zmq"} <= debs
    if appliance.arch == "armhf":     # the arm64 build skips the check (see Builds)
        for module in STACK:
            assert re.search(rf"\[42-check-stack.chroot\]   {module} \S+ from ",
                             appliance.log), module
        assert "[42-check-stack.chroot]   pyproj transforms with PROJ data from " \
            f"{VENV}/share/proj" in appliance.log
    assert re.search(r"\[42-check-stack.chroot\] jupyter lab \d+\.\d+", appliance.log)
    # Kept in the step cache after the apt step and after the venv and its check (arm64;
    # the armhf build keeps none, its base is new every run).
    kept = [(s["after"], s["from_cache"]) for s in manifest["stages"]]
    if appliance.arch == "arm64":
        assert kept == [("20-install-packages.chroot", False), ("42-check-stack.chroot", False)]
        for stage in manifest["stages"]:
            entry = json.loads((CACHE / "stages" / stage["key"] / "entry.json").read_text())
            assert entry["script"] == stage["after"]
    else:
        assert kept == []


def test_sbom_validates_and_lists_what_the_image_holds(appliance: Appliance, builds: Builds,
                                                       image: Image) -> None:
    """The published SBOM passes CycloneDX's strict schema and lists every package at the
    version the image really has: dpkg's, read by the host's dpkg-query from the image's
    database, and the venv's, read by the image's own Python. Its subject is the image, and
    the base image it was built from that subject's ancestor."""
    assert "sbom.cdx.json" in appliance.outputs
    sbom_file = appliance.outputs["sbom.cdx.json"]
    manifest = json.loads(appliance.outputs["manifest.json"].read_text())
    assert manifest["sbom"] == sbom_file.name
    text = sbom_file.read_text()
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    assert error is None, str(error)
    bom = json.loads(text)
    release, arch = manifest["config"]["base"]["release"], appliance.arch

    listed: dict[tuple[str, str, str], str] = {}
    for component in bom["components"]:
        purl = PackageURL.from_string(component["purl"])
        assert component["version"] == purl.version, component
        qualifiers = purl.qualifiers if isinstance(purl.qualifiers, dict) else {}
        if purl.type == "deb":
            # Both images are Debian's underneath (the Armbian-like one keeps ID=debian).
            assert (purl.namespace, qualifiers.get("distro")) == ("debian", release), purl
        listed[(purl.type, purl.name, qualifiers.get("arch", ""))] = str(purl.version)
    shown = subprocess.run(
        ["dpkg-query", f"--admindir={image.root}/var/lib/dpkg", "--show", "--showformat="
         "${db:Status-Abbrev}\t${Package}\t${Architecture}\t${Version}\n"],
        capture_output=True, text=True, check=True).stdout
    debs = {("deb", name, deb_arch): version for status, name, deb_arch, version in
            (line.split("\t") for line in shown.splitlines()) if status[1:2] == "i"}
    code = ("import importlib.metadata, json, sysconfig\n"
            "site = sysconfig.get_paths()['purelib']\n"
            "print(json.dumps({d.metadata['Name']: d.version\n"
            "                  for d in importlib.metadata.distributions(path=[site])}))\n")
    in_venv = json.loads(image.run(f"{VENV}/bin/python", "-c", code).stdout)
    venv = {("pypi", re.sub(r"[-_.]+", "-", name).lower(), ""): version
            for name, version in in_venv.items()}
    assert listed[("deb", "python3", arch)] == debs[("deb", "python3", arch)]
    # numpy is Debian's (test_stack_imports_from_the_venv), JupyterLab the venv's.
    assert listed[("deb", "python3-numpy", arch)] == debs[("deb", "python3-numpy", arch)]
    assert ("pypi", "numpy", "") not in listed
    assert listed[("pypi", "jupyterlab", "")] == venv[("pypi", "jupyterlab", "")]
    assert listed == {**debs, **venv}

    subject = bom["metadata"]["component"]
    assert subject["name"] == f"orangepi-jupyter-{appliance.board}-{release}"
    assert sbom_file.name == f"{subject['name']}-{subject['version']}.sbom.cdx.json"
    assert bom["metadata"]["timestamp"] == manifest["built"]
    (base,) = subject["pedigree"]["ancestors"]
    if arch == "armhf":
        assert base["hashes"] == [{"alg": "SHA-256", "content": builds.armbian_sha}]
        assert base["version"] == "26.5.1"
        (distribution,) = base["externalReferences"]
        assert distribution["type"] == "distribution"
        assert distribution["url"].endswith(f"/{base['name']}")
    else:
        # Made here by debootstrap: no published file, so no file hash nor URL.
        assert base["description"].startswith(f"Debian {release} for ")
        assert "hashes" not in base and "externalReferences" not in base


def test_base_is_kept_where_it_must_be(appliance: Appliance, image: Image) -> None:
    machine = {"armhf": "armv7l", "arm64": "aarch64"}[appliance.arch]
    assert f"[10-check-base.chroot] base: Debian GNU/Linux 13 (trixie), {machine}" in \
        appliance.log
    with open(appliance.raw, "rb") as built, open(appliance.base, "rb") as base:
        assert built.read(4 << 20)[512:] == base.read(4 << 20)[512:], "U-Boot kept as it was"
    # As built: the test's own chroot session has put a file there since.
    assert "Type: symlink" in appliance.resolv_conf, \
        "systemd-resolved's link, restored after the build"
    release = (image.root / "etc/orangepi-jupyter-release").read_text()
    assert f"BOARD={appliance.board}\n" in release and "JUPYTER_USER=jupyter\n" in release


def test_base_came_the_way_the_build_asked_for_it(appliance: Appliance, builds: Builds,
                                                  image: Image) -> None:
    """armhf: found in the mirror's index, its sha256 and signature checked like an Armbian
    image's, Armbian's own first-boot services kept, and this run's copy of the base not left
    in the test cache. arm64: Debian's base, with nothing of Armbian's."""
    services = ("armbian-resize-filesystem.service", "armbian-firstrun.service")
    if appliance.arch == "arm64":
        assert re.search(r"^building \S+ for .* from Debian trixie for ", appliance.log, re.M)
        assert "signature good:" not in appliance.log
        assert not any((image.root / "usr/lib/systemd/system" / s).exists() for s in services)
        assert "arm64 programs run as cortex-a53 (QEMU_CPU)" in appliance.log
        return
    assert "base image: Armbian 26.5.1 trixie current minimal" in appliance.log
    assert "sha256 verified: Armbian_26.5.1_Orangepipcplus_trixie_current" in appliance.log
    assert "signature good:" in appliance.log
    for unit in services:
        assert image.run("systemctl", "is-enabled", unit).stdout.strip() == "enabled", unit
    # command-not-found's hook did not run in the build, and the image keeps it as it was.
    assert (image.root / "etc/apt/apt.conf.d/50command-not-found").read_text() == CNF_HOOK
    assert not (image.root / "var/lib/command-not-found/updated").exists()
    assert "armhf programs run on qemu's default CPU: no model was measured faster" \
        in appliance.log
    assert builds.armbian_sha is not None
    cache = Cache(CACHE)
    assert not (cache.downloads / builds.armbian_sha).exists()
    assert not cache.image_path(builds.armbian_sha).exists()


def test_debian_packages_are_compiled_and_py3compile_is_back(image: Image) -> None:
    assert "py3compile" not in image.run("dpkg-divert", "--list").stdout
    real = (image.root / "usr/bin/py3compile").read_text()
    assert "build-image" not in real and "py_compile" in real, "Debian's own, back in place"
    assert not (image.root / "usr/bin/py3compile.build-image").exists()
    for module in ("numpy/__init__", "pandas/__init__", "sympy/__init__"):
        directory, name = module.split("/")
        pyc = image.root / f"usr/lib/python3/dist-packages/{directory}/__pycache__"
        assert list(pyc.glob(f"{name}.cpython-3*.pyc")), module


def test_stack_imports_from_the_venv(image: Image) -> None:
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    m = importlib.import_module(name)\n"
            "    print(name, getattr(m, '__version__', '?'), m.__file__)\n")
    out = image.run(f"{VENV}/bin/python", "-c", code, *STACK, user="jupyter").stdout
    versions = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert set(versions) == set(STACK)
    assert all(re.match(r"\d", v) for k, v in versions.items() if k != "xlrd"), versions
    # Debian's copy of numpy, seen through the venv's system site.
    assert "/usr/lib/python3/dist-packages/numpy" in out
    # The stack works, not only imports: PROJ's data is found from the venv, a GeoDataFrame
    # is reprojected, a sympy integral and a scipy optimisation come out right.
    code = ("import geopandas, shapely, sympy, scipy.optimize\n"
            "frame = geopandas.GeoDataFrame(geometry=[shapely.Point(8.5, 47.4)], crs=4326)\n"
            "print(round(frame.to_crs(3857).geometry[0].x))\n"
            "x = sympy.Symbol('x'); print(sympy.integrate(2 * x, (x, 0, 3)))\n"
            "print(round(scipy.optimize.brentq(lambda v: v * v - 2, 0, 2), 6))\n")
    result = image.run(f"{VENV}/bin/python", "-c", code, user="jupyter")
    assert result.stdout.split() == ["946216", "9", "1.414214"], result
    assert "PROJ data directory not found" not in result.stderr
    assert re.fullmatch(r"[4-9]\.\d+\.\d+", image.run(f"{VENV}/bin/jupyter", "lab",
                                                    "--version").stdout.strip())
    assert image.run(f"{VENV}/bin/jupyter", "notebook", "--version").stdout.startswith("7.")
    assert image.run("stat", "-c", "%U", VENV, f"{VENV}/bin/python").stdout.split() == \
        ["root", "root"]


def test_default_kernel_is_the_stack(image: Image) -> None:
    specs = json.loads(image.run(f"{VENV}/bin/jupyter", "kernelspec", "list", "--json",
                                 user="jupyter").stdout)["kernelspecs"]
    assert "scientific" in specs
    assert specs["scientific"]["spec"]["display_name"] == "Python 3 (scientific stack)"
    assert specs["scientific"]["spec"]["argv"][0] in (f"{VENV}/bin/python",
                                                      f"{VENV}/bin/python3")


def test_service_is_enabled_and_verifies(image: Image) -> None:
    assert image.run("systemctl", "is-enabled", "jupyter.service").stdout.strip() == "enabled"
    # Enabled by a script: a link in overlays/ would become a plain file in the wheel.
    assert image.run("systemctl", "is-enabled",
                     "regenerate-ssh-host-keys.service").stdout.strip() == "enabled"
    verify = image.run("systemd-analyze", "verify", "jupyter.service", check=False)
    assert verify.returncode == 0 and "jupyter" not in verify.stdout + verify.stderr, verify
    unit = (image.root / "etc/systemd/system/jupyter.service").read_text()
    for line in ("Type=exec", "User=jupyter", f"ExecStart={VENV}/bin/jupyter lab",
                 "Restart=always", "RestartSec=5", "After=network-online.target",
                 "ConditionPathExists=/var/lib/jupyter/credentials.json"):
        assert re.search(rf"^{re.escape(line)}", unit, re.MULTILINE), line
    for implies_no_new_privileges in ("SystemCallFilter", "PrivateDevices", "NoNewPrivileges",
                                      "ProtectKernel", "RestrictSUIDSGID"):
        assert not re.search(rf"^{implies_no_new_privileges}", unit, re.MULTILINE)


def test_user_can_log_in_only_after_first_boot(image: Image) -> None:
    groups = image.run("id", "-nG", "jupyter").stdout.split()
    assert {"jupyter", "sudo", "dialout"} <= set(groups)
    shadow = (image.root / "etc/shadow").read_text()
    password = re.search(r"^jupyter:([^:]*):", shadow, re.MULTILINE)
    assert password and password.group(1).startswith("!"), "locked until first boot sets it"
    notebooks = image.run("stat", "-c", "%U %a", "/home/jupyter/notebooks").stdout.split()
    assert notebooks == ["jupyter", "755"]
    assert image.run("stat", "-c", "%U %a", "/var/lib/jupyter").stdout.split() == \
        ["jupyter", "700"]


def test_rendered_config_has_the_keys_and_no_secret(image: Image) -> None:
    text = (image.root / "etc/jupyter/jupyter_server_config.py").read_text()
    compile(text, "jupyter_server_config.py", "exec")
    for key, value in (("ServerApp.ip", '"*"'), ("ServerApp.port", "8888"),
                       ("ServerApp.port_retries", "0"), ("ServerApp.base_url", '"/"'),
                       ("ServerApp.root_dir", '"/home/jupyter/notebooks"'),
                       ("ServerApp.open_browser", "False"), ("ServerApp.allow_root", "False"),
                       ("ServerApp.allow_unauthenticated_access", "False"),
                       ("PasswordIdentityProvider.password_required", "True"),
                       ("PasswordIdentityProvider.allow_password_change", "False"),
                       ("MappingKernelManager.default_kernel_name", '"scientific"')):
        assert f"c.{key} = {value}\n" in text, key
    assert "NotebookApp" not in text and "c.ServerApp.password" not in text
    assert not re.search(r"(argon2|sha1):|token = \"", text)
    # No news popup and no update checks: the overrides name settings the image's JupyterLab
    # has, with values of the types its schema wants.
    share = image.root / VENV.lstrip("/") / "share/jupyter/lab"
    overrides = json.loads((share / "settings/overrides.json").read_text())
    plugin = "@jupyterlab/apputils-extension:notification"
    assert overrides[plugin] == {"fetchNews": "false", "checkForUpdates": False}
    schema = json.loads((share / "schemas/@jupyterlab/apputils-extension/notification.json")
                        .read_text())["properties"]
    assert schema["fetchNews"]["type"] == "string" and schema["checkForUpdates"]["type"] == \
        "boolean"


def test_nothing_secret_or_build_only_is_left(image: Image) -> None:
    root = image.root
    # No id, and the word that makes systemd take the card's first boot as the first boot;
    # systemd-firstboot, which would then ask on the serial console, is masked.
    assert (root / "etc/machine-id").read_text() == "uninitialized\n"
    assert os.readlink(root / "etc/systemd/system/systemd-firstboot.service") == "/dev/null"
    for path in ("var/lib/dbus/machine-id", "var/lib/systemd/random-seed",
                 "var/lib/systemd/credential.secret", "var/lib/jupyter/credentials.json",
                 "root/.bash_history", "root/.cache"):
        assert not (root / path).exists(), path
    assert not list((root / "etc/ssh").glob("ssh_host_*")) if (root / "etc/ssh").exists() \
        else True
    # The image's own /tmp, under the session's tmpfs, seen by debugfs: the wheelhouse and
    # the scripts' hand-over files lived in a tmpfs there, never on the image.
    listing = subprocess.run(["debugfs", "-R", "ls -p /tmp", image.device],
                             capture_output=True, text=True, check=True).stdout
    names = {line.split("/")[5] for line in listing.splitlines() if line.count("/") >= 6}
    assert names <= {".", ".."}, names
    found = subprocess.run(
        ["find", str(root), "-xdev", "-path", f"{root}/usr/share/python-wheels", "-prune",
         "-o", "(", "-name", "jupyter_cookie_secret", "-o", "-name", "cookie_secret", "-o",
         "-name", "jpserver-*", "-o",
         "-name", "*.whl", "-o", "-name", ".bash_history", "-o", "-name", ".python_history",
         "-o", "-path", "*/jupyter/runtime", "-o", "-name", "build-image", ")", "-print"],
        capture_output=True, text=True, check=True).stdout.split()
    assert found == []
    hashes = subprocess.run(
        ["grep", "-rIlE", r"argon2:\$argon2|sha1:[0-9a-f]{12}:|BEGIN [A-Z ]*PRIVATE KEY",
         *(str(root / d) for d in ("etc", "home", "root", "var/lib", f"{VENV[1:]}/etc",
                                    "usr/local/etc") if (root / d).exists())],
        capture_output=True, text=True)
    assert hashes.stdout == "", hashes.stdout


def test_first_boot_units_are_enabled_and_verify(image: Image) -> None:
    # A serial console's instance starts when its device appears; tty1 has no device unit
    # and starts with multi-user.target. The arm64 board's USB gadget console (ttyGS0),
    # which anyone with a cable reaches, gets no wizard (firstboot.consoles: local), and its
    # getty shows no file of /etc/issue.d but where Jupyter is.
    wanted_by = {"ttyS0": "dev-ttyS0.device", "tty1": "multi-user.target"}
    units = [f"jupyter-firstboot@{console}.service" for console in wanted_by]
    # The setup drive is read before the wizards, and before the root grows over it.
    assert (image.root / "etc/systemd/system/sysinit.target.wants/"
            "jupyter-setup-drive.service").is_symlink()
    units.append("jupyter-setup-drive.service")
    for console, by in wanted_by.items():
        link = image.root / f"etc/systemd/system/{by}.wants/jupyter-firstboot@{console}.service"
        assert link.is_symlink() and link.resolve().name == "jupyter-firstboot@.service", link
    assert not list((image.root / "etc/systemd/system").glob("*.wants/*firstboot@ttyGS0*"))
    # The gettys' command lines are the image's own, with what they show added.
    dropin = image.root / ("etc/systemd/system/serial-getty@ttyGS0.service.d/"
                           "50-orangepi-jupyter-issue.conf")
    if image.appliance.arch == "arm64":
        assert re.search(r"^ExecStart=-/sbin/agetty --issue-file "
                         r"/etc/issue:/etc/issue\.d/jupyter-url\.issue .*--keep-baud",
                         dropin.read_text(), re.MULTILINE), dropin.read_text()
        units.append("serial-getty@ttyGS0.service")
    else:
        assert not dropin.exists()
    screen = (image.root / "etc/systemd/system/getty@tty1.service.d/"
              "50-orangepi-jupyter-issue.conf").read_text()
    assert re.search(r"^ExecStart=-/sbin/agetty --issue-file /etc/issue:/etc/issue\.d:"
                     r"/etc/orangepi-jupyter/jupyter-qr\.issue .*--noclear", screen,
                     re.MULTILINE), screen
    units.append("getty@tty1.service")
    verify = image.run("systemd-analyze", "verify", "--man=no", *units, check=False)
    assert verify.returncode == 0 and "firstboot" not in verify.stdout + verify.stderr, verify
    unit = (image.root / "etc/systemd/system/jupyter-firstboot@.service").read_text()
    for line in ("StandardInput=tty", "TTYPath=/dev/%I", "TTYReset=yes", "TTYVHangup=yes",
                 "Before=serial-getty@%i.service getty@%i.service jupyter.service",
                 "ConditionPathExists=|!/var/lib/orangepi-jupyter/firstboot-done",
                 "ConditionPathExists=|/boot/jupyter-firstboot.conf",
                 "TimeoutStartSec=infinity"):
        assert re.search(rf"^{re.escape(line)}$", unit, re.MULTILINE), line
    assert not re.search(r"^ConditionFirstBoot", unit, re.MULTILINE), "never fires on Armbian"
    # A failed or restarted wizard would let the getty take its line.
    assert not re.search(r"^(Restart|BindsTo)=", unit, re.MULTILINE)
    jupyter = (image.root / "etc/systemd/system/jupyter.service").read_text()
    assert "\nConditionPathExists=/var/lib/orangepi-jupyter/firstboot-done\n" in jupyter
    settings = json.loads((image.root / "etc/orangepi-jupyter/firstboot.json").read_text())
    assert settings["user"] == "jupyter" and settings["consoles"][0] == \
        {"device": "ttyS0", "baud": 115200, "gadget": False}
    assert settings["wizard_consoles"] == ["ttyS0", "tty1"]
    help_text = image.run("jupyter-setup", "--help").stdout
    assert "--rotate-token" in help_text


def test_the_units_the_image_adds_are_scored(image: Image) -> None:
    """systemd-analyze security of every unit the image adds (the host's systemd, offline on
    the image's root), printed for whoever reads the log; the first-boot wizard's hardening
    in effect."""
    root = image.root
    units = sorted(path.name for path in (root / "etc/systemd/system").iterdir()
                   if path.suffix == ".service" and not path.is_symlink()
                   and path.name in OUR_UNITS)
    assert units, "the image adds its units"
    scores = {}
    for unit in units:
        name = unit.replace("@.service", "@ttyS0.service")
        result = subprocess.run(["systemd-analyze", "security", "--offline=true",
                                 f"--root={root}", "--no-pager", name],
                                capture_output=True, text=True, timeout=120)
        found = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", result.stdout)
        assert found, (name, result.stdout[-2000:], result.stderr[-2000:])
        scores[name] = f"{found.group(1)} {found.group(2)}"
        if name.startswith("jupyter-firstboot@"):
            for setting in ("RestrictNamespaces=~user", "RestrictRealtime=",
                            "LockPersonality=", "SystemCallArchitectures="):
                assert re.search(rf"^✓ {re.escape(setting)}", result.stdout, re.MULTILINE), \
                    setting
    progress(f"systemd-analyze security ({image.appliance.arch}): " +
             ", ".join(f"{unit} {score}" for unit, score in scores.items()))


def test_no_way_in_before_first_boot(image: Image) -> None:
    """Root locked with no password, no autologin anywhere, no root over SSH."""
    shadow = (image.root / "etc/shadow").read_text()
    assert re.search(r"^root:!\*:", shadow, re.MULTILINE)
    for dropin in (image.root / "etc/systemd/system").glob("*getty*.service.d/*"):
        # Only ours, which sets what a login prompt shows.
        assert dropin.name == "50-orangepi-jupyter-issue.conf", dropin
        assert "autologin" not in dropin.read_text()
    assert not (image.root / "root/.not_logged_in_yet").exists()
    # sshd's effective settings need a host key and its run directory: both made in the
    # session's /tmp and /run (tmpfs), never in the image.
    image.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "/tmp/test-host-key")
    image.run("mkdir", "-p", "/run/sshd")
    sshd = image.run("/usr/sbin/sshd", "-T", "-h", "/tmp/test-host-key", check=False)
    assert "permitrootlogin no" in sshd.stdout.lower(), sshd.stderr
    assert not (image.root / "var/lib/orangepi-jupyter/firstboot-done").exists()
    preseed = image.root / "boot/jupyter-firstboot.conf"
    if image.appliance.arch == "armhf":
        info = preseed.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0
        assert "_password =" not in preseed.read_text(), "hashes only"
    else:
        assert not preseed.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def first_boot(image: Image) -> None:
    """What jupyter-firstboot@ttyS0 does at first boot, run in the image: from the build's
    preseed on armhf (hashes; nobody at the console), with `jupyter-setup --preseed` and
    plain passwords on arm64 (hashed by the image's own jupyter_server and libcrypt)."""
    if image.appliance.arch == "armhf":
        result = subprocess.run(
            contained(image.root, ["python3", "/usr/lib/orangepi-jupyter/firstboot.pyz",
                                   "--boot", "--console", "ttyS0"]),
            stdin=subprocess.DEVNULL, env=image.chroot.env, capture_output=True, text=True,
            timeout=600)
    else:
        preseed = image.root / "root/setup.conf"
        preseed.write_text(f"login_password = {LOGIN}\njupyter_password = {JUPYTER}\n"
                           f"jupyter_token = {TOKEN}\nhostname = zero-lab\n")
        result = image.run("jupyter-setup", "--preseed", "/root/setup.conf", check=False)
        preseed.unlink()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Setup is complete" in result.stdout
    assert "starts at the next boot (not started here" in result.stdout
    assert not (image.root / "boot/jupyter-firstboot.conf").exists()
    assert (image.root / "var/lib/orangepi-jupyter/firstboot-done").exists()
    credentials = image.root / "var/lib/jupyter/credentials.json"
    assert image.run("stat", "-c", "%U %a", "/var/lib/jupyter/credentials.json").stdout.split() \
        == ["jupyter", "600"]
    assert json.loads(credentials.read_text())["token"] == TOKEN
    assert image.run("stat", "-c", "%U %a", "/var/lib/jupyter/cookie_secret").stdout.split() \
        == ["jupyter", "600"], "the cookie secret is the card's own, made with the credentials"
    check = image.run("python3", "-c",
                      "import sys; sys.path.insert(0, '/usr/lib/orangepi-jupyter/firstboot.pyz');"
                      " from builder.firstboot.answers import _crypt; h = open('/etc/shadow')"
                      ".read().split('jupyter:')[1].split(':')[0]; print(_crypt(sys.argv[1]"
                      ".encode(), h.encode()).decode() == h)", LOGIN)
    assert check.stdout.strip() == "True", "the login password is the preseed's"
    hostname = {"armhf": "pcplus-lab", "arm64": "zero-lab"}[image.appliance.arch]
    assert (image.root / "etc/hostname").read_text() == f"{hostname}\n"
    # The card's own certificate, made by the image's own python3-cryptography: the key the
    # Jupyter user's alone, the fingerprint shown, and again by the check before each start.
    assert image.run("stat", "-c", "%U %a", "/var/lib/jupyter/tls/jupyter.key").stdout.split() \
        == ["jupyter", "600"]
    cert = tls.read((image.root / "var/lib/jupyter/tls/jupyter.crt").read_bytes())
    assert cert.dns_names == (f"{hostname}.local", hostname)
    assert f"Certificate SHA-256 fingerprint: {cert.fingerprint}" in result.stdout
    again = image.run("/usr/lib/orangepi-jupyter/firstboot.pyz", "--ensure-certificate")
    assert again.stdout.strip() == f"Certificate SHA-256 fingerprint: {cert.fingerprint}"
    # For the screen's login prompt: the .local address as a QR code (the image's qrencode).
    qr = (image.root / "etc/orangepi-jupyter/jupyter-qr.issue").read_text()
    assert "\u2580" in qr and "\u2584" in qr and "\\" not in qr


def unit_environment(image: Image) -> dict[str, str]:
    """The Environment= settings of the image's jupyter.service: what systemd gives it."""
    unit = (image.root / "etc/systemd/system/jupyter.service").read_text()
    return dict(line.removeprefix("Environment=").split("=", 1)
                for line in unit.splitlines() if line.startswith("Environment="))


def card_pin(image: Image) -> pinning.Pin:
    """The card's certificate as a browser that checked its fingerprint trusts it: alone,
    for the card's .local name."""
    pem = (image.root / "var/lib/jupyter/tls/jupyter.crt").read_text()
    hostname = (image.root / "etc/hostname").read_text().strip()
    return pinning.Pin(ssl.PEM_cert_to_DER_cert(pem), f"{hostname}.local")


def https(image: Image) -> requests.Session:
    """A client with no cookies that trusts the card's certificate and nothing else."""
    return jupyter_client._session(card_pin(image))


@contextmanager
def jupyter_server(image: Image, name: str) -> Iterator[str]:
    """jupyter.service's command and environment on loopback, until it answers over HTTPS;
    its URL."""
    port = free_port()
    log = image.appliance.raw.parent / f"{name}.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            contained(image.root, ["runuser", "-u", "jupyter", "--", f"{VENV}/bin/jupyter",
                                   "lab", "--ServerApp.ip=127.0.0.1",
                                   f"--ServerApp.port={port}"]),
            env={**image.chroot.env, **unit_environment(image)}, stdout=output,
            stderr=subprocess.STDOUT)
    base = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300     # Jupyter's start under emulation is slow
        while True:
            assert server.poll() is None, log.read_text()
            try:
                with https(image) as client:
                    client.get(f"{base}/api/status", timeout=30)
                break
            except requests.RequestException:
                assert time.monotonic() < deadline, "Jupyter did not start in 300 s"
                time.sleep(2)
        yield base
    finally:
        # unshare, which started it, ignores SIGTERM while it waits: killed, it takes the
        # server's whole PID namespace with it (--kill-child).
        server.kill()
        server.wait()


def test_first_boot_then_jupyter_admits_the_password_and_the_token(image: Image) -> None:
    """The wizard's credentials, then jupyter.service's command on loopback: over HTTPS with
    the card's certificate only (plain HTTP gets no page, another certificate is refused), a
    stranger is refused, the password and the token get in, the cookies are Secure, the
    default kernel is the stack's. A new token (jupyter-setup --rotate-token) signs out the
    browser signed in with the password, and the old token no longer gets in; the
    certificate stays the same."""
    first_boot(image)
    pin = card_pin(image)

    def stranger(base: str, token: str | None = None) -> int:
        headers = {"Authorization": f"token {token}"} if token else {}
        with https(image) as client:
            return int(client.get(f"{base}/api/status", timeout=30, headers=headers)
                       .status_code)

    with https(image) as browser:
        with jupyter_server(image, "jupyter") as base:
            port = int(base.rsplit(":", 1)[1])
            assert pinning.peer_certificate("127.0.0.1", port, 30) == pin.certificate
            pinning.no_login_page_over_http("127.0.0.1", port)
            other = pinning.Pin(ssl.PEM_cert_to_DER_cert(tls.make(
                pin.hostname.removesuffix(".local"), [], datetime.now(UTC))[0].decode()),
                pin.hostname)
            with jupyter_client._session(other) as impostor, \
                    pytest.raises(requests.exceptions.SSLError):
                impostor.get(f"{base}/api/status", timeout=30)
            assert stranger(base) == 403
            assert stranger(base, TOKEN) == 200
            assert stranger(base, "wrong") == 403
            browser.get(f"{base}/login", timeout=30)
            xsrf = browser.cookies.get("_xsrf")
            wrong = browser.post(f"{base}/login", data={"password": LOGIN, "_xsrf": xsrf},
                                 allow_redirects=False, timeout=60)
            assert wrong.status_code != 302, "the login password is not Jupyter's"
            login = browser.post(f"{base}/login", data={"password": JUPYTER, "_xsrf": xsrf},
                                 allow_redirects=False, timeout=60)
            assert login.status_code == 302, login.text[:500]
            # Neither cookie would ever be sent over plain HTTP.
            assert {c.name.split("-")[0]: c.secure for c in browser.cookies} == \
                {"_xsrf": True, "username": True}, list(browser.cookies)
            assert browser.get(f"{base}/api/status", timeout=30).status_code == 200
            specs = browser.get(f"{base}/api/kernelspecs", timeout=60).json()
            assert specs["default"] == "scientific" and set(specs["kernelspecs"]) == \
                {"scientific"}
        rotated = image.run("jupyter-setup", "--rotate-token")
        assert "signed out (new cookie secret)" in rotated.stdout, rotated.stdout
        assert f"Certificate SHA-256 fingerprint: {pin.fingerprint}" in rotated.stdout
        token = json.loads((image.root / "var/lib/jupyter/credentials.json").read_text())["token"]
        assert token != TOKEN
        with jupyter_server(image, "jupyter-rotated") as base:
            # The same cookies, sent to the same address: the old session is over.
            assert browser.get(f"{base}/api/status", timeout=30).status_code == 403
            assert stranger(base, TOKEN) == 403
            assert stranger(base, token) == 200


def test_damaged_credentials_stop_jupyter_with_the_reason(image: Image) -> None:
    """Fail closed: jupyter.service's environment makes a settings file that raises (here a
    half-written credentials file) stop Jupyter, with the reason in what the journal gets,
    instead of a server started on its defaults."""
    assert unit_environment(image).get("TRAITLETS_APPLICATION_RAISE_CONFIG_FILE_ERROR") == "1"
    credentials = image.root / "var/lib/jupyter/credentials.json"
    # Written in place: the owner and mode stay those the first boot gave it.
    saved = credentials.read_bytes() if credentials.exists() else None
    credentials.parent.mkdir(parents=True, exist_ok=True)
    credentials.write_text('{"hashed_password": "argon2:$argon2id$v=19$m=10240,t=10,p=8$')
    try:
        result = subprocess.run(
            contained(image.root, ["runuser", "-u", "jupyter", "--", f"{VENV}/bin/jupyter",
                                   "lab", "--ServerApp.ip=127.0.0.1",
                                   f"--ServerApp.port={free_port()}"]),
            env={**image.chroot.env, **unit_environment(image)}, capture_output=True,
            text=True, timeout=300)
    finally:
        if saved is None:
            credentials.unlink()
        else:
            credentials.write_bytes(saved)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "jupyter_server_config.py" in output and "JSONDecodeError" in output, output[-3000:]


# Booted: try-image --smoke on the compressed output, as a user would try it (started by the
# appliance fixture). armhf on QEMU's Orange Pi PC from its own U-Boot, with a preseed put on
# the trial card; arm64 on QEMU's virt machine, where try-image answers the wizard itself.


@pytest.mark.late
@pytest.mark.parametrize("arch", sorted(BOARDS))
def test_try_image_smoke_boots_the_image(arch: str, builds: Builds) -> None:
    code, log = builds.result(arch)
    assert code == 0, log[-5000:]
    smoke, stdout, stderr = builds.smoke(arch)
    print(stdout)
    assert smoke.proc.returncode == 0, stdout + stderr[-6000:]
    (report,) = [p for p in (smoke.work / "report").iterdir() if not p.is_symlink()]
    assert (smoke.work / "report/latest").resolve() == report.resolve()
    assert f"try-image: report in {report}" in stdout
    result = json.loads((report / "report.json").read_text())
    assert result["ok"] and result["failed_phase"] is None
    machine = {"armhf": "orangepi-pc", "arm64": "virt"}[arch]
    assert result["machine"] == machine and result["board"] == BOARDS[arch]
    phases = {"kernel", "userspace", "wizard", "jupyter", "cell", "browser", "login", "shutdown",
              "second-boot"}
    if arch == "armhf":
        phases.add("u-boot")
    assert set(result["phases"]) == phases, result["phases"]
    assert result["stack"]["user"] == "jupyter"
    assert set(result["stack"]["versions"]) == {"numpy", "scipy", "pandas", "matplotlib",
                                                "sympy", "geopandas"}
    checks = "\n".join(result["checks"])
    for expected in ("wizard ran on the serial console", "no password appeared",
                     "without credentials", "(403) over HTTPS",
                     "token shown by the wizard gets in", "password logs in",
                     "Jupyter runs as jupyter", "root filesystem grew",
                     "JupyterLab loads in headless Chromium", "login prompt on the serial",
                     "wizard does not run again", "Jupyter started by itself",
                     "whose fingerprint the card showed on its console",
                     "plain HTTP gets no login page", "trusting only the card's certificate",
                     "the second boot serves the same certificate"):
        assert expected in checks, (expected, checks)
    assert not [n for n in result["notes"] if n.startswith("plain HTTP:")], result["notes"]
    assert (report / "jupyterlab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    serial = (report / "serial-boot1.log").read_bytes()
    assert b"=== Jupyter workstation setup" in serial
    # The fingerprint the card showed is the one the smoke pinned, and the second boot's
    # login banner shows it again.
    (fingerprint,) = set(re.findall(rb"Certificate SHA-256 fingerprint: ([0-9A-F:]{95})",
                                    serial))
    assert fingerprint.decode() in checks
    assert fingerprint in (report / "serial-boot2.log").read_bytes()
    hostname = {"armhf": FLASHED_HOSTNAME, "arm64": "lab-arm64"}[arch]
    assert f"https://{hostname}.local:" in checks, checks
    assert "no partition follows the root: the setup drive is gone" in checks
    assert b"=== Jupyter workstation setup" not in (report / "serial-boot2.log").read_bytes()
    said = serial.decode(errors="replace")
    assert "the setup drive was wiped and removed" in said
    if arch == "armhf":
        # The card flash-image wrote, with Armbian Imager's presets: its own hostname and
        # Jupyter password from the drive, the login password (the smoke logged in with it),
        # time zone and locale from the presets, over the image's hashes; the ignored said.
        assert b"Starting kernel" in serial and f"{FLASHED_HOSTNAME} login:".encode() in serial
        assert "jupyter-firstboot.conf on the setup drive: hostname, jupyter_password, " \
               "jupyter_token taken" in said, said[-4000:]
        assert "Armbian presets (/root/.not_logged_in_yet): login_password, timezone, " \
               "locale taken" in said
        assert "PRESET_ROOT_PASSWORD ignored: root stays locked" in said
        assert "PRESET_DEFAULT_REALNAME ignored" in said
        # (Unattended, setup runs on whichever console takes the lock first, often the
        # screen: its progress lines, time zone and locale among them, need not reach the
        # serial line. tests/test_armbian_preset.py checks what they set.)
        assert "the user password is Jupyter's password too" not in said
    else:
        # Filled in as on Windows: a BOM, CRLF; the wizard asked only for the passwords.
        assert "jupyter-firstboot.conf on the setup drive: hostname, timezone taken" in said
        assert "time zone: Asia/Tokyo" in said
    # The image is untouched, and nothing is left running or lying around.
    assert hashlib.sha256(smoke.image.read_bytes()).hexdigest() == smoke.sha256
    assert list(smoke.work.glob("try-image-*")) == []
    running = subprocess.run(["pgrep", "-f", f"qemu-system.*{smoke.work}"], capture_output=True,
                             text=True)
    assert running.stdout == ""


# The apt step alone, on the engine tests' small arm64 image: the failures a user's package
# list or a base's sources can cause.


@pytest.fixture
def apt_step(debian_rootfs: Path, tmp_path: Path) -> tuple[BaseImage, Path]:
    scripts = tmp_path / "apt.d"
    scripts.mkdir()
    (scripts / "20-install-packages.chroot").symlink_to(
        REPO / "customize.d/20-install-packages.chroot")
    # A third-party source that cannot be reached, as Armbian's is when building offline.
    unreachable = scripts / "15-add-unreachable-source.chroot"
    unreachable.write_text("#!/bin/sh\necho 'deb [trusted=yes] http://127.0.0.1:9/armbian "
                           "trixie main' > /etc/apt/sources.list.d/armbian.list\n")
    unreachable.chmod(0o755)
    return make_base_image(debian_rootfs, tmp_path), scripts


def apt_build(base: BaseImage, scripts: Path, tmp_path: Path,
              packages: str) -> subprocess.CompletedProcess[str]:
    return run_cli("--board", "orangepi5", "--base", base.path, "--cache-dir", tmp_path / "c",
                   "--output", tmp_path / "out", "--compress", "zstd", "--set",
                   "customize.builtin=false", "--customize", scripts, "--set",
                   f"packages.apt={packages}", "--set", "image.headroom=512MiB",
                   *UNSIGNED_BASE, timeout=1200)


def test_an_unreachable_source_is_a_warning(apt_step: tuple[BaseImage, Path],
                                            tmp_path: Path) -> None:
    base, scripts = apt_step
    result = apt_build(base, scripts, tmp_path, "[hello]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[20-install-packages.chroot] WARNING: apt could not reach these sources" in \
        result.stderr
    assert "http://127.0.0.1:9/armbian" in result.stderr
    (manifest,) = (tmp_path / "out").glob("*.manifest.json")
    assert "hello" in {p["name"] for p in json.loads(manifest.read_text())["packages"]}
    assert leftover_resources(tmp_path) == []


def test_a_package_that_does_not_exist_stops_the_build(apt_step: tuple[BaseImage, Path],
                                                       tmp_path: Path) -> None:
    base, scripts = apt_step
    result = apt_build(base, scripts, tmp_path, "[hello, no-such-package-anywhere]")
    assert result.returncode == 1
    assert "Unable to locate package no-such-package-anywhere" in result.stderr
    assert error_line(result) == ("build-image: error: customize.d/20-install-packages.chroot "
                                  "failed with exit code 100")
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True
    assert leftover_resources(tmp_path) == []
