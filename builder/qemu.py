"""Booting an image in QEMU: the machine for a board, the trial disk, the QEMU process.

The image a user flashes is never booted itself. try-image boots a trial disk made from it in a
work directory it removes afterwards: the image decompressed (or, for a raw .img, copied
sparsely, sharing blocks where the filesystem can reflink), with the few changes emulation
needs written into it with debugfs, without mounting anything (so try-image needs no root).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder import log
from builder.boards import Board
from builder.compression import decompress_sparse, image_suffix
from builder.errors import BuildError
from builder.ext4 import Ext4
from builder.image import copy_sparse
from builder.run import die_with_parent, host_env

# Where U-Boot's SPL sits on an Allwinner card, and the magic of its boot header.
ALLWINNER_SPL_OFFSET = 8 << 10
ALLWINNER_MAGIC = b"eGON.BT0"
# Written into the trial disk only. Emulated userspace is 5-20 times slower than a board: udev's
# coldplug can take minutes, and systemd gives a device (the serial console the getty and the
# wizard wait for) 90 s by default before failing what needs it.
SLOW_MACHINE_CONF = ("# try-image: emulation is slow; never in an image for a board\n"
                     "[Manager]\nDefaultDeviceTimeoutSec=900s\nDefaultTimeoutStartSec=900s\n")
SLOW_MACHINE_PATH = "/etc/systemd/system.conf.d/90-try-image-slow-machine.conf"
# Written into the trial disk's boot configuration only. QEMU's orangepi-pc always has the H3's
# four cores, each a host thread. On a host with two cores and other work beside it, the guest
# spends its time waiting on descheduled vCPUs: every TLB invalidation a kernel broadcasts to
# all cores is a rendezvous of all four threads, and freeing a module's init memory issues
# thousands of them. Measured in a CI run: RCU stalls and soft lockups from the initrd on,
# userspace 4.5 times slower than on an idle host, the network never up. One core, as virt
# has, is what a small host can emulate well.
ONE_CPU_ARGUMENT = "maxcpus=1"
# The device tree of the board QEMU's orangepi-pc emulates, booted in place of the image's own
# (the Orange Pi PC Plus's, say). QEMU has only the H3's first MMC controller: a tree that
# enables the others (the PC Plus's eMMC and Wi-Fi) leaves kernel workers blocked for good in
# their probes (mmc_rescan, sdio_reset; "blocked for more than 600 seconds" on the console)
# and, in a CI run, a guest whose Jupyter kernel never answered.
EMULATED_DTB = "sun8i-h3-orangepi-pc.dtb"
EXTLINUX_PATH = "/boot/extlinux/extlinux.conf"
ARMBIAN_ENV_PATH = "/boot/armbianEnv.txt"
FIRSTBOOT_UNIT = "/etc/systemd/system/jupyter-firstboot@.service"


@dataclass(frozen=True)
class Machine:
    """How QEMU runs a board."""

    name: str               # "orangepi-pc" or "virt"
    qemu: str               # the QEMU binary
    console: str            # the guest's serial console device
    memory_mib: int

    @property
    def boots_uboot(self) -> bool:
        return self.name == "orangepi-pc"


def machine_for(board: Board, memory_mib: int | None) -> Machine:
    """QEMU emulates the Orange Pi PC (Allwinner H3) itself: H3 and H2+ boards boot their
    own U-Boot there. For arm64 boards QEMU has no Allwinner or Rockchip machine: the generic
    `virt` machine boots the image's kernel and root filesystem."""
    if board.arch == "armhf" and board.soc in ("Allwinner H3", "Allwinner H2+"):
        # The Orange Pi PC has 1 GiB, and QEMU emulates exactly that board.
        return Machine("orangepi-pc", "qemu-system-arm", "ttyS0", 1024)
    if board.arch == "arm64":
        return Machine("virt", "qemu-system-aarch64", "ttyAMA0",
                       memory_mib or max(board.ram_mib, 1024))
    raise BuildError(f"try-image boots Allwinner H3/H2+ boards (on QEMU's orangepi-pc) and arm64 "
                     f"boards (on QEMU's virt machine); {board.id} ({board.soc}, {board.arch}) "
                     f"is neither: test it on the board")


def require_qemu(machine: Machine) -> None:
    if shutil.which(machine.qemu) is None:
        raise BuildError(f"{machine.qemu} not found: install it with: apt-get install "
                         f"qemu-system-arm (it provides qemu-system-arm and qemu-system-aarch64)")


# The root filesystem, read and written without mounting it.


# The trial disk.


@dataclass(frozen=True)
class Kernel:
    """What the virt machine boots directly: files copied out of the image's /boot."""

    kernel: Path
    initrd: Path | None
    append: str


def work_directory(parent: Path | None) -> Path:
    """A directory for the trial disk, removed afterwards; ones left by a try-image that was
    killed (its process is gone) are removed first, so a killed run leaves nothing for long."""
    base = parent or Path(os.environ.get("TMPDIR") or "/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    for stale in base.glob("try-image-*"):
        match = re.match(r"try-image-(\d+)-", stale.name)
        if match and stale.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"try-image-{os.getpid()}-", dir=base))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_trial_disk(image: Path, target: Path) -> None:
    """The image as a raw disk in `target`: decompressed, or a sparse (reflinked) copy."""
    suffix = image_suffix(image.name)
    if suffix == ".img":
        log.info(f"copying {image.name} to a trial disk (the image itself is never booted)")
        copy_sparse(image, target)
        return
    written = decompress_sparse(image, suffix, target, image.name)
    if written == 0:
        raise BuildError(f"{image} decompressed to nothing: it is not a disk image")


# What a guest writes to its trial disk on the smoke's two boots (the grown root's metadata,
# logs, Python's caches, Jupyter's files, swap where the image makes one), with a margin. On a
# host disk that fills up meanwhile, an emulated SD card fails the guest's writes and a virtio
# disk pauses the guest: either way the boot stalls until a time limit, saying nothing.
GUEST_WRITES = 1 << 30


def check_room_for_guest(disk: Path) -> None:
    """Refuse to boot when the filesystem holding the trial disk has not room for what the
    guest will write to it."""
    free = shutil.disk_usage(disk.parent).free
    if free < GUEST_WRITES:
        # Named by where the user can act: the directory that holds try-image's own.
        raise BuildError(f"{disk.parent.parent}: {log.human_size(free)} free once the trial "
                         f"disk is there, and the guest writes up to "
                         f"{log.human_size(GUEST_WRITES)} to it while it boots: free space "
                         f"there, or pass --workdir DIR on a disk with room")


def grow_to_power_of_two(disk: Path) -> int:
    """QEMU's SD card emulation wants a power-of-two size; the margin is also what the image's
    first boot grows its root filesystem into, which try-image checks."""
    size = disk.stat().st_size
    target = 1 << size.bit_length()         # strictly larger, even when size is a power of 2
    os.truncate(disk, target)
    return target


def check_bootable(machine: Machine, disk: Path, fs: Ext4, work: Path) -> Kernel | None:
    """Refuse, before QEMU starts, a disk that cannot boot on `machine`."""
    if machine.boots_uboot:
        with open(disk, "rb") as f:
            f.seek(ALLWINNER_SPL_OFFSET + 4)
            magic = f.read(len(ALLWINNER_MAGIC))
        if magic != ALLWINNER_MAGIC:
            raise BuildError(f"{disk.name}: no U-Boot at 8 KiB (no Allwinner boot header): the "
                             f"image cannot boot an Orange Pi; was it made from a board image?")
        if not (fs.exists("/boot/extlinux/extlinux.conf") or fs.exists("/boot/boot.scr")):
            raise BuildError(f"{disk.name}: no /boot/extlinux/extlinux.conf or /boot/boot.scr: "
                             f"U-Boot would find nothing to boot")
        _boot_files(fs)          # the kernel it names must be there
        return None
    kernel, initrd, append = _boot_files(fs)
    kernel_file = work / "vmlinuz"
    fs.dump(kernel, kernel_file)
    initrd_file = None
    if initrd:
        initrd_file = work / "initrd.img"
        fs.dump(initrd, initrd_file)
        _strip_uboot_header(initrd_file)
    return Kernel(kernel_file, initrd_file, append)


def _boot_files(fs: Ext4) -> tuple[str, str | None, str]:
    """(kernel, initrd, kernel arguments) as the image's boot configuration names them:
    extlinux.conf's default label (Debian bases), else Armbian's /boot/Image and
    armbianEnv.txt."""
    extlinux = fs.read(EXTLINUX_PATH)
    if extlinux:
        fields = _default_label(extlinux.decode(errors="replace"))
        kernel = fields.get("kernel") or fields.get("linux")
        if not kernel:
            raise BuildError("/boot/extlinux/extlinux.conf names no kernel: the image cannot "
                             "boot")
        resolved: list[str | None] = []
        for path in (kernel, fields.get("initrd")):
            if path is None:
                resolved.append(None)
                continue
            # U-Boot reads a relative path from the configuration file's directory.
            candidates = [path] if path.startswith("/") else \
                [f"/boot/extlinux/{path}", f"/boot/{path}"]
            found = next((c for c in candidates if fs.exists(c)), None)
            if found is None:
                raise BuildError(f"extlinux.conf names {path}, which is not in the image: it "
                                 f"cannot boot")
            resolved.append(found)
        return str(resolved[0]), resolved[1], fields.get("append", "")
    for kernel in ("/boot/Image", "/boot/zImage"):
        if fs.exists(kernel):
            env = (fs.read(ARMBIAN_ENV_PATH) or b"").decode(errors="replace")
            root = re.search(r"^rootdev=(\S+)", env, re.M)
            initrd = "/boot/uInitrd" if fs.exists("/boot/uInitrd") else None
            return kernel, initrd, f"root={root.group(1) if root else '/dev/vda1'} rootwait rw"
    fstab = (fs.read("/etc/fstab") or b"").decode(errors="replace")
    if re.search(r"^\s*[^#\s]+\s+/boot\s", fstab, re.M):
        raise BuildError("the image keeps /boot on a partition of its own, which try-image does "
                         "not read: try it on the board")
    raise BuildError("no kernel in /boot (no extlinux.conf, Image or zImage): the image cannot "
                     "boot")


def _default_label(text: str) -> dict[str, str]:
    """The fields of the label `default` names (else the first label)."""
    default = None
    labels: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        key, value = words[0].lower(), (words[1].strip() if len(words) == 2 else "")
        if key == "default":
            default = value
        elif key == "label":
            current = labels.setdefault(value, {})
        elif current is not None and key in ("kernel", "linux", "initrd", "append"):
            current.setdefault(key, value)
    if not labels:
        return {}
    return labels.get(default or "", next(iter(labels.values())))


def _strip_uboot_header(initrd: Path) -> None:
    """Armbian's uInitrd is a U-Boot legacy image: a 64-byte header before the initrd."""
    with open(initrd, "rb") as f:
        head = f.read(4)
    if head == b"\x27\x05\x19\x56":
        data = initrd.read_bytes()[64:]
        initrd.write_bytes(data)


def kernel_arguments(append: str, machine: Machine) -> str:
    """The image's own arguments with the console moved to the virt machine's UART."""
    # Split as the kernel does, on spaces; the board's console and early consoles (UART
    # addresses of the board, nothing on virt) go.
    kept = [a for a in append.split()
            if not a.startswith(("console=", "earlycon", "earlyprintk"))]
    return " ".join([*kept, f"console={machine.console},115200",
                     # Slow emulation; the same as SLOW_MACHINE_CONF, for the initrd as well.
                     "systemd.default_device_timeout_sec=900"])


def prepare_for_emulation(fs: Ext4, machine: Machine, work: Path) -> list[str]:
    """What the trial disk needs that a board does not; returns what was changed, to report."""
    changes = []
    fs.write(SLOW_MACHINE_PATH, SLOW_MACHINE_CONF.encode(), 0o644, work)
    changes.append(f"{SLOW_MACHINE_PATH}: device and start timeouts for a slow machine")
    if machine.console != "ttyS0" and fs.exists(FIRSTBOOT_UNIT):
        # The board's wizard waits on its UART; virt's UART is a PL011, ttyAMA0.
        link = (f"/etc/systemd/system/dev-{machine.console}.device.wants/"
                f"jupyter-firstboot@{machine.console}.service")
        fs.symlink(link, "/etc/systemd/system/jupyter-firstboot@.service")
        changes.append(f"setup wizard also on {machine.console}, virt's serial console")
    if machine.boots_uboot and (change := _boot_for_emulation(fs, work)):
        changes.append(change)
    return changes


# Armbian's boot.scr reads these from armbianEnv.txt. console=both (its default) ends in
# 'console=ttyS0,115200 console=tty1': the last is /dev/console, a screen QEMU does not have, so
# systemd's messages would not reach the serial line. verbosity=1 (its default) is the kernel's
# loglevel: nothing of the kernel's, nor systemd-shutdown's "Powering off", would either.
ARMBIAN_ENV_SETTINGS = {"console": "serial", "verbosity": "7"}


def _set_env(lines: list[str], key: str, value: str) -> None:
    """`key=value` in an armbianEnv.txt's lines: the last definition (which U-Boot's import
    keeps) replaced, keeping its CR, earlier ones commented out; else added."""
    found = [i for i, line in enumerate(lines) if re.match(rf"[ \t]*{key}=", line)]
    for i in found[:-1]:
        lines[i] = "#" + lines[i]
    if found:
        cr = "\r" if lines[found[-1]].endswith("\r") else ""
        lines[found[-1]] = f"{key}={value}{cr}"
    else:
        lines.append(f"{key}={value}")


DTB_WHY = "the board QEMU emulates: controllers it lacks would hang the kernel's probes"


def _emulated_fdt_line(fs: Ext4, text: str) -> tuple[str, str]:
    """extlinux.conf's `fdt DIR/NAME.dtb` lines pointed at EMULATED_DTB in the same directory,
    where the image has it; the text, and what was done for the report ("" if nothing)."""
    changed = False

    def swap(m: re.Match[str]) -> str:
        nonlocal changed
        directory = m.group(2).rsplit("/", 1)[0]
        if m.group(2).endswith("/" + EMULATED_DTB) or not fs.exists(
                f"{directory}/{EMULATED_DTB}"):
            return m.group(0)
        changed = True
        return f"{m.group(1)}{directory}/{EMULATED_DTB}{m.group(3)}"

    text = re.sub(r"^([ \t]*fdt[ \t]+)(\S+?)([ \t]*\r?)$", swap, text, flags=re.M | re.I)
    return text, f", fdt {EMULATED_DTB} ({DTB_WHY})" if changed else ""


def _boot_for_emulation(fs: Ext4, work: Path) -> str | None:
    """`maxcpus=1` added to the kernel arguments the image's own boot configuration gives
    U-Boot: extlinux.conf's append lines (Debian bases), else armbianEnv.txt's extraargs, which
    Armbian's boot.scr appends. On Armbian also ARMBIAN_ENV_SETTINGS: try-image watches the
    serial line."""
    extlinux = fs.read(EXTLINUX_PATH)
    if extlinux is not None:
        # Any case, as U-Boot reads keywords; a bare `append` too; a CRLF line keeps its CR.
        text, count = re.subn(r"^([ \t]*append)(?:[ \t]+([^\r\n]*?))?[ \t]*(\r?)$",
                              lambda m: (f"{m.group(1)} "
                                         f"{' '.join(filter(None, [m.group(2), ONE_CPU_ARGUMENT]))}"
                                         f"{m.group(3)}"),
                              extlinux.decode(errors="surrogateescape"),
                              flags=re.M | re.I)
        if count:
            text, dtb = _emulated_fdt_line(fs, text)
            fs.write(EXTLINUX_PATH, text.encode(errors="surrogateescape"), 0o644, work)
            return f"{EXTLINUX_PATH}: {ONE_CPU_ARGUMENT} (one emulated core of four){dtb}"
    env = fs.read(ARMBIAN_ENV_PATH)
    if env is not None:
        text = env.decode(errors="surrogateescape")
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        # U-Boot's `env import -t` skips leading blanks; the last definition wins.
        extra = [i for i, line in enumerate(lines) if re.match(r"[ \t]*extraargs=", line)]
        if extra:
            line = lines[extra[-1]]
            cr = "\r" if line.endswith("\r") else ""
            lines[extra[-1]] = f"{line.rstrip()} {ONE_CPU_ARGUMENT}{cr}"
        else:
            lines.append(f"extraargs={ONE_CPU_ARGUMENT}")
        for key, value in ARMBIAN_ENV_SETTINGS.items():
            _set_env(lines, key, value)
        # Armbian's boot.scr loads ${prefix}dtb/${fdtfile}, which armbianEnv.txt may set.
        dtb = ""
        if fs.exists(f"/boot/dtb/{EMULATED_DTB}"):
            _set_env(lines, "fdtfile", EMULATED_DTB)
            dtb = f", fdtfile={EMULATED_DTB} ({DTB_WHY})"
        fs.write(ARMBIAN_ENV_PATH, ("\n".join(lines) + "\n").encode(errors="surrogateescape"),
                 0o644, work)
        return (f"{ARMBIAN_ENV_PATH}: extraargs {ONE_CPU_ARGUMENT} (one emulated core of four), "
                f"console=serial and verbosity=7 (the boot's and the shutdown's messages on "
                f"the serial line){dtb}")
    log.warn("neither extlinux.conf with an append line nor armbianEnv.txt: the guest keeps "
             "four emulated cores, which is slow on a host with few cores")
    return None


# The QEMU process.


def free_port(preferred: int | None) -> int:
    """`preferred` when nothing listens on it, else any free port on 127.0.0.1."""
    if preferred:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                log.warn(f"port {preferred} on 127.0.0.1 is in use: using another")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(machine: Machine, disk: Path, kernel: Kernel | None, serial: str,
            host_port: int, guest_port: int) -> list[str]:
    """QEMU's command line. `serial` is a -serial argument (a socket, or mon:stdio)."""
    forward = f"hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}"
    if machine.name == "orangepi-pc":
        return [machine.qemu, "-M", "orangepi-pc", "-m", str(machine.memory_mib),
                "-drive", f"file={disk},if=sd,format=raw",
                "-nic", f"user,model=allwinner-sun8i-emac,{forward}",
                "-serial", serial, "-display", "none", "-monitor", "none"]
    assert kernel is not None
    argv = [machine.qemu, "-M", "virt", "-cpu", "cortex-a53",
            # One vCPU: on a 2-core host a second one only adds contention.
            "-smp", "1", "-m", str(machine.memory_mib),
            "-kernel", str(kernel.kernel),
            "-append", kernel_arguments(kernel.append, machine),
            "-drive", f"file={disk},if=virtio,format=raw",
            # A virtio NIC loads iPXE's option ROM for network boot by default, a file of
            # ipxe-qemu, which is only a Recommends of qemu-system-arm: without it QEMU stops
            # at once ("failed to find romfile"). The kernel is booted directly, so no ROM.
            "-netdev", f"user,id=net0,{forward}",
            "-device", "virtio-net-pci,netdev=net0,romfile=",
            "-serial", serial, "-display", "none", "-monitor", "none"]
    if kernel.initrd:
        argv[argv.index("-append"):argv.index("-append")] = ["-initrd", str(kernel.initrd)]
    return argv


@contextlib.contextmanager
def running(argv: Sequence[str], log_path: Path,
            interactive: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """QEMU, stopped (terminated, then killed) when the block ends, however it ends."""
    log.debug("+ " + shlex.join(argv))
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdin=None if interactive else subprocess.DEVNULL,
                                stdout=None if interactive else out, stderr=out,
                                env=host_env(),
                                preexec_fn=die_with_parent())
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], grace: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def connect_serial(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> socket.socket:
    """QEMU's serial socket, once QEMU has made it (it waits for us before it starts)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BuildError(f"QEMU stopped at once (exit {proc.returncode}): "
                             f"{last_error(path.parent)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise BuildError(f"QEMU made no serial socket in {timeout:.0f} s") from None
            time.sleep(0.1)


def last_error(work: Path) -> str:
    """QEMU's last line of complaint, from its log in the work directory."""
    try:
        lines = (work / "qemu.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"
