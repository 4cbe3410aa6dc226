"""`try-image`: boot a built image in QEMU, to use it, or (--smoke) to prove it works.

This module is the command and the trial's setup; the smoke scenario is builder/smoke.py. The
steps, in order: check the request; make the trial disk (decompressed or copied, never the
image itself); pick the machine for the board; refuse a disk that cannot boot; write into the
trial disk what emulation needs; boot, with the serial console on this terminal, or (--smoke)
hand the trial disk to builder.smoke in a report directory of the run's own. The trial disk is
removed at the end, also on an error or Ctrl-C (--keep-disk keeps a copy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from builder import log, qemu, smoke, smoke_report, trial_settings
from builder.boards import Board, load_catalog
from builder.compression import COMPRESSIONS, built_image_suffix, image_suffix
from builder.entry import (
    HelpFormatter,
    add_common_options,
    checking_usage,
    quiet_on_closed_pipe,
    run_reporting,
)
from builder.errors import BuildError
from builder.ext4 import Ext4, find_root_fs
from builder.firstboot import armbian_preset
from builder.guest_shell import Credentials
from builder.image import copy_sparse, read_table
from builder.preseed import load_preseed
from builder.run import require_programs
from builder.smoke import TIMEOUTS

REPORTS = "try-image-reports"
# The end of --help and the man page's EXAMPLES (builder/manpage.py; tests/test_manpages.py
# parses every command line here): an explanation, then its command, indented further.
EXAMPLES = f"""\
Examples:
  Boot an image; answer the setup wizard on this terminal, then open the
  URL it prints (Ctrl-A X quits QEMU):
    try-image out/orangepi-jupyter-orangepipc-trixie-20261126.img.xz
  The whole check, unattended; its report goes to {REPORTS}/latest:
    try-image out/orangepi-jupyter-orangepipc-trixie-20261126.img.xz --smoke
  An arm64 image on QEMU's virt machine, with settings on its setup drive as
  someone on Windows saves them:
    try-image out/orangepi-jupyter-orangepizero3-trixie-20261126.img.xz \\
        --smoke --preseed setup.conf
  On a slow machine, more time from systemd's start to the setup wizard:
    try-image out/orangepi-jupyter-orangepipc-trixie-20261126.img.xz \\
        --smoke --timeout userspace=3000
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="try-image",
        description="Boot an image made by build-image in QEMU: an Allwinner H3/H2+ board on "
                    "QEMU's orangepi-pc, an arm64 board on QEMU's virt machine. Without "
                    "--smoke, the serial console is this terminal (answer the setup wizard, "
                    "then open the URL printed here; Ctrl-A X quits QEMU). The image itself is "
                    "never modified.",
        epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("image", help="an .img, .img.xz, .img.zst or .img.gz made by build-image")
    p.add_argument("--board", help="the board the image is for (default: read from the image)")
    p.add_argument("--smoke", action="store_true",
                   help="answer the wizard, check Jupyter, the stack, a browser, a second "
                        "boot; exit non-zero on any failure")
    p.add_argument("--preseed", metavar="FILE", type=Path,
                   help="FILE's settings onto the trial card's setup drive, as someone on "
                        "Windows saves them (or as /boot/jupyter-firstboot.conf when the image "
                        "has no drive); with --smoke, plain login_password and "
                        "jupyter_password, or neither (the smoke answers the wizard)")
    p.add_argument("--armbian-preset", metavar="FILE", type=Path,
                   help="Armbian's first-login presets (PRESET_* lines, as Armbian Imager "
                        "writes them) onto the trial card as /root/.not_logged_in_yet")
    p.add_argument("--port", type=int, default=8888,
                   help="host port forwarded to Jupyter on 127.0.0.1 (default 8888; another "
                        "free one when it is taken; 0: any free one)")
    p.add_argument("--memory", type=int, metavar="MIB",
                   help="guest memory for the virt machine (default: the board's, at least "
                        "1024); the orangepi-pc machine always has 1024")
    p.add_argument("--timeout", action="append", default=[], metavar="PHASE=SECONDS",
                   help=f"change a phase's time limit; phases: {', '.join(TIMEOUTS)}")
    p.add_argument("--report", type=Path, default=Path(REPORTS), metavar="DIR",
                   help="where --smoke keeps its reports: each run writes its report, serial "
                        "logs and screenshot to a new directory in DIR named after the image "
                        "and the time, and DIR/latest points to it; older runs are kept "
                        f"(default ./{REPORTS})")
    p.add_argument("--no-browser", action="store_true",
                   help="skip the headless Chromium check")
    p.add_argument("--workdir", type=Path, metavar="DIR",
                   help="where the temporary trial disk goes (default $TMPDIR or /var/tmp)")
    p.add_argument("--keep-disk", type=Path, metavar="PATH",
                   help="keep the trial disk, as the guest left it, at PATH")
    add_common_options(p)
    return p


@dataclass(frozen=True)
class Request:
    """What was asked for, checked before anything is decompressed."""

    image: Path
    board: str | None
    smoke: bool
    preseed: bytes | None
    armbian_preset: bytes | None
    port: int
    memory: int | None
    timeouts: dict[str, float]
    timeouts_given: frozenset[str]      # the phases --timeout set: those are not scaled
    report: Path
    browser: bool
    workdir: Path | None
    keep_disk: Path | None


def check_request(args: argparse.Namespace) -> Request:
    """What the command line asks for (a usage error when it cannot be), then what this host
    needs to do it: the programs, and QEMU for the board's machine."""
    with checking_usage():
        request = _read_request(args)
    # The decompressor from the table every command reads images by: whatever build-image
    # writes, try-image reads, with no list of its own to fall behind.
    require_programs("debugfs", "dumpe2fs", "sfdisk", "cp",
                     COMPRESSIONS[image_suffix(request.image.name)][0])
    # The board from --board or the manifest build-image wrote beside the image: its machine
    # and QEMU are checked now, before minutes of decompressing.
    board = args.board or _manifest_board(request.image)
    if board:
        with checking_usage():
            found = load_catalog().lookup(board)[0]
        qemu.require_qemu(qemu.machine_for(found, args.memory))
    return request


def _read_request(args: argparse.Namespace) -> Request:
    image = args.image.expanduser().absolute() if isinstance(args.image, Path) else \
        Path(args.image).expanduser().absolute()
    built_image_suffix(image)
    timeouts = dict(TIMEOUTS)
    for item in args.timeout:
        name, _, value = item.partition("=")
        if name not in TIMEOUTS:
            raise BuildError(f"--timeout {item}: no phase {name!r}; phases are "
                             f"{', '.join(TIMEOUTS)}")
        try:
            timeouts[name] = float(value)
        except ValueError:
            raise BuildError(f"--timeout {item}: give seconds, like {name}=600") from None
        if not (math.isfinite(timeouts[name]) and timeouts[name] > 0):
            raise BuildError(f"--timeout {item}: give a number of seconds more than 0")
    if not 0 <= args.port <= 65535:
        raise BuildError(f"--port {args.port}: give a TCP port, 1 to 65535 (0: any free one)")
    preseed = preset = None
    if args.preseed:
        preseed, answers = load_preseed(args.preseed)
        if args.smoke and (answers.login_hash or answers.jupyter_hash):
            raise BuildError(f"--preseed {args.preseed}: --smoke logs in with the passwords, "
                             f"so they must be plain (login_password, jupyter_password), not "
                             f"hashes")
    if args.armbian_preset:
        preset = _load_armbian_preset(args.armbian_preset)
    if args.memory is not None and not 256 <= args.memory <= 16384:
        raise BuildError(f"--memory {args.memory}: give MiB, 256 to 16384")
    if args.keep_disk:
        if args.keep_disk.exists():
            raise BuildError(f"--keep-disk {args.keep_disk}: already exists; give a new path")
        parent = args.keep_disk.absolute().parent
        if not (parent.is_dir() and os.access(parent, os.W_OK)):
            raise BuildError(f"--keep-disk {args.keep_disk}: {parent} is not a writable "
                             f"directory")
    report = args.report.expanduser().absolute()
    if args.smoke:
        _check_writable(report, "--report")
    return Request(image=image, board=args.board, smoke=args.smoke, preseed=preseed,
                   armbian_preset=preset, port=args.port, memory=args.memory,
                   timeouts=timeouts,
                   timeouts_given=frozenset(i.partition("=")[0] for i in args.timeout),
                   report=report,
                   browser=not args.no_browser, workdir=args.workdir,
                   keep_disk=args.keep_disk.absolute() if args.keep_disk else None)


def _load_armbian_preset(path: Path) -> bytes:
    """The presets file, refused when the card would not read all of it."""
    try:
        data = path.expanduser().read_bytes()
    except OSError as exc:
        raise BuildError(f"--armbian-preset {path}: {exc.strerror}: give the path of an "
                         f"existing file") from None
    values, problems = armbian_preset.parse(data.decode("utf-8", errors="replace"))
    if problems or not values:
        raise BuildError(f"--armbian-preset {path}: "
                         f"{problems[0] if problems else 'no PRESET_ line in it'}: fix the "
                         f"file (PRESET_NAME=\"value\" lines)")
    return data


def _check_writable(directory: Path, option: str) -> None:
    """`directory` can be made or written to: found before minutes of decompressing."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BuildError(f"{option} {directory}: {existing} is not a directory; give a "
                         f"directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BuildError(f"{option} {directory}: {existing} is not writable; give a writable "
                         f"directory")


def _manifest_board(image: Path) -> str | None:
    stem = image.name[: -len(image_suffix(image.name))]
    try:
        manifest = json.loads((image.parent / f"{stem}.manifest.json").read_text())
        return str(manifest["board"]["id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _release(fs: Ext4) -> dict[str, str]:
    """/etc/orangepi-jupyter-release: which board and user the image was built for, and
    whether its Jupyter serves HTTPS."""
    data = fs.read("/etc/orangepi-jupyter-release")
    if data is None:
        return {}
    fields = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip('"')
    return fields


@dataclass(frozen=True)
class TrialDisk:
    """The trial disk made from the image, ready to boot, and what was learnt about it."""

    request: Request
    work: Path
    disk: Path
    board: Board
    machine: qemu.Machine
    kernel: qemu.Kernel | None
    user: str
    guest_port: int
    root_partition: int             # the root partition's size in the image, before boot
    tls: bool                       # Jupyter serves HTTPS only (JUPYTER_TLS=yes)
    credentials: Credentials | None  # the passwords the card will take, for --smoke


def _port(value: str) -> int:
    return int(value) if value.isdigit() and 0 < int(value) < 65536 else 8888


def prepare_trial(request: Request, work: Path) -> TrialDisk:
    disk = work / "disk.img"
    qemu.make_trial_disk(request.image, disk)
    qemu.check_room_for_guest(disk)
    table = read_table(disk)
    fs = find_root_fs(disk, table)
    release = _release(fs)
    name = request.board or release.get("BOARD") or _manifest_board(request.image)
    if not name:
        raise BuildError(f"{request.image.name} does not say which board it is for (no "
                         f"/etc/orangepi-jupyter-release): pass --board")
    board, _ = load_catalog().lookup(name)
    if request.board and release.get("BOARD") and release["BOARD"] != board.id:
        log.warn(f"--board {board.id}, but the image was built for {release['BOARD']}")
    machine = qemu.machine_for(board, request.memory)
    qemu.require_qemu(machine)
    kernel = qemu.check_bootable(machine, disk, fs, work)
    size = qemu.grow_to_power_of_two(disk)
    log.info(f"{board.name} ({board.soc}) on QEMU's {machine.name} machine; trial disk "
             f"{log.human_size(size)}")
    user = release.get("JUPYTER_USER", "jupyter")
    placed = trial_settings.place(disk, fs, work, user, request.preseed,
                                  request.armbian_preset, request.smoke)
    for change in [*qemu.prepare_for_emulation(fs, machine, work), *placed.changes]:
        log.info(f"trial disk: {change}")
    return TrialDisk(request=request, work=work, disk=disk, board=board, machine=machine,
                     kernel=kernel, user=user, credentials=placed.credentials,
                     guest_port=_port(release.get("JUPYTER_PORT", "")),
                     root_partition=fs.partition.size,
                     # Images from before HTTPS have no such line: they serve plain HTTP.
                     tls=release.get("JUPYTER_TLS", "no") == "yes")


def run_interactive(trial: TrialDisk) -> int:
    host_port = qemu.free_port(trial.request.port)
    argv = qemu.command(trial.machine, trial.disk, trial.kernel, "mon:stdio", host_port,
                        trial.guest_port)
    scheme = "https" if trial.tls else "http"
    # The browser cannot know the card's own certificate: the console shows what to compare.
    trust = (" The browser warns about the card's own certificate: accept it when its SHA-256 "
             "fingerprint is the one the console shows." if trial.tls else "")
    log.info(f"booting; the serial console is this terminal. When setup is done, Jupyter is "
             f"at {scheme}://127.0.0.1:{host_port}/lab (forwarded to the guest's port "
             f"{trial.guest_port}).{trust} Ctrl-A X quits QEMU; Ctrl-A H lists the other keys.")
    with qemu.running(argv, trial.work / "qemu.log", interactive=True) as proc:
        code = proc.wait()
    if code != 0:
        raise BuildError(f"QEMU stopped with exit status {code}: "
                         f"{qemu.last_error(trial.work)}")
    return 0


def try_image(request: Request) -> int:
    with contextlib.ExitStack() as stack:
        work = qemu.work_directory(request.workdir)
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        trial = prepare_trial(request, work)
        code = run_interactive(trial) if not request.smoke else run_smoke(trial)
        if request.keep_disk:
            keep_disk(trial.disk, request.keep_disk)
        return code


def run_smoke(trial: TrialDisk) -> int:
    """builder.smoke on the trial disk, given what it needs and a report directory of its own."""
    request = trial.request
    report = smoke_report.new_report_directory(request.report, request.image)
    log.info(f"report: {report}")
    return smoke.run(smoke.Trial(
        image=request.image.name, board=trial.board.id, machine=trial.machine, disk=trial.disk,
        kernel=trial.kernel, work=trial.work, user=trial.user, guest_port=trial.guest_port,
        host_port=qemu.free_port(request.port), root_partition=trial.root_partition,
        timeouts=request.timeouts, timeouts_given=request.timeouts_given,
        credentials=trial.credentials, browser=request.browser, report=report, tls=trial.tls))


def keep_disk(disk: Path, target: Path) -> None:
    """Sparse, under a temporary name until complete: an interrupted copy is no disk."""
    partial = target.with_name(f".{target.name}.partial")
    try:
        copy_sparse(disk, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    log.info(f"trial disk kept at {target} (with try-image's changes for emulation: for "
             f"looking into, not for flashing)")


@quiet_on_closed_pipe
def main(argv: Sequence[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    args = parser().parse_args(argv)
    log.setup(quiet=args.quiet, debug=args.debug)
    return run_reporting("try-image", lambda: try_image(check_request(args)), debug=args.debug,
                         after_interrupt="QEMU was stopped and the trial disk removed")


if __name__ == "__main__":
    sys.exit(main())
