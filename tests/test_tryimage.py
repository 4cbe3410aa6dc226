"""try-image before and around the boot: what it refuses before QEMU starts, a guest that
hangs, Ctrl-C, a taken port, leftovers. Small images made here (no root needed: the root
filesystem is filled from a directory with mkfs.ext4 -d); real QEMU. The boots of real
appliance images are in test_appliance.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TRY_IMAGE, cli_env

from builder import output, qemu
from builder.boards import load_catalog
from builder.ext4 import find_root_fs

pytestmark = pytest.mark.slow
ROOT_OFFSET = 4 << 20


def make_image(path: Path, board: str, files: dict[str, bytes], uboot: bytes | None = None,
               size_mib: int = 24) -> Path:
    """An MBR image with one ext4 root from 4 MiB holding `files`, like build-image's."""
    tree = path.parent / f"{path.name}.tree"
    files = {"etc/os-release": b"ID=debian\n",
             "etc/orangepi-jupyter-release": f"BOARD={board}\nJUPYTER_USER=jupyter\n"
                                             f"JUPYTER_PORT=8888\n".encode(), **files}
    for name, data in files.items():
        target = tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["sfdisk", "--quiet", str(path)], input=b"label: dos\nstart=8192, type=83\n",
                   check=True)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), "-E", f"offset={ROOT_OFFSET}",
                    str(path), f"{(size_mib << 10) - 4096}k"], check=True)
    if uboot is not None:
        with open(path, "r+b") as f:
            f.seek(8 << 10)
            f.write(uboot)
    shutil.rmtree(tree)
    return path


def try_image(*args: str | Path, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRY_IMAGE, *map(str, args)], cwd=REPO, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def error_of(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("try-image: error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


EXTLINUX_ARM64 = (b"label debian\n  kernel /boot/vmlinuz-test\n  initrd /boot/initrd.img-test\n"
                  b"  append root=/dev/vda1 rootwait rw console=ttyS0,115200\n")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def assert_nothing_left(work: Path) -> None:
    assert list(work.iterdir()) == []
    running = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True)
    assert running.stdout == "", running.stdout


def qemu_running(work: Path) -> bool:
    return bool(subprocess.run(["pgrep", "-f", f"qemu-system.*{work}"],
                               capture_output=True).stdout)


def test_not_an_image(tmp_path: Path, work: Path) -> None:
    text = tmp_path / "notes.img"
    text.write_text("not a disk image\n" * 100)
    proc = try_image(text, "--workdir", work)
    assert proc.returncode == 1
    assert "has no partition table" in error_of(proc)
    assert_nothing_left(work)
    missing = try_image(tmp_path / "missing.img.xz")
    assert missing.returncode == 2 and "no such image file" in error_of(missing)   # usage
    gz = tmp_path / "x.img.gz"
    gz.write_bytes(b"\x1f\x8b")
    assert "the file is corrupt or truncated" in error_of(try_image(gz, "--workdir", work))
    assert_nothing_left(work)


def test_bad_options_are_refused_before_anything_is_done(tmp_path: Path, work: Path) -> None:
    image = make_image(tmp_path / "a.img", "orangepizeroplus2-h5", {})
    cases = {
        ("--timeout", "kernal=5"): "no phase 'kernal'",
        ("--timeout", "kernel=soon"): "give seconds",
        ("--timeout", "kernel=0"): "more than 0",
        ("--timeout", "kernel=nan"): "more than 0",
        ("--timeout", "kernel=inf"): "more than 0",
        ("--port", "70000"): "give a TCP port",
        ("--memory", "5"): "give MiB",
        ("--keep-disk", tmp_path / "no/such/dir/disk.img"): "is not a writable directory",
        ("--smoke", "--preseed", tmp_path / "missing.conf"): "No such file",
    }
    hashed = tmp_path / "hashed.conf"
    from jupyter_server.auth import passwd

    from builder.firstboot.answers import hash_login_password
    hashed.write_text(f"login_password_hash = {hash_login_password('abcdefgh1')}\n"
                      f"jupyter_password_hash = {passwd('abcdefgh2')}\n")
    cases[("--smoke", "--preseed", hashed)] = "they must be plain (login_password, " \
                                              "jupyter_password), not hashes"
    broken = tmp_path / "broken.conf"
    broken.write_text("login_password = short\nflavour = vanilla\n")
    cases[("--preseed", broken)] = "--preseed"
    code = tmp_path / "code.txt"
    code.write_text("PRESET_TIMEZONE=UTC\nreboot\n")
    cases[("--armbian-preset", code)] = "line 2: not a NAME=value setting"
    cases[("--armbian-preset", tmp_path / "nothing.txt")] = "No such file"
    for args, message in cases.items():
        proc = try_image(image, "--workdir", work, *args)
        assert proc.returncode == 2, (args, proc.stderr)        # a usage error, as argparse's
        assert message in error_of(proc), (args, proc.stderr)
        assert_nothing_left(work)


def test_unbootable_images_are_refused_before_qemu_starts(tmp_path: Path, work: Path) -> None:
    # An H3 board's image without U-Boot at 8 KiB.
    no_uboot = make_image(tmp_path / "pc.img", "orangepipcplus",
                          {"boot/extlinux/extlinux.conf": b"label x\n  kernel /boot/zImage\n",
                           "boot/zImage": b"\0" * 1024})
    proc = try_image(no_uboot, "--workdir", work)
    assert proc.returncode == 1
    assert "no U-Boot at 8 KiB" in error_of(proc)
    assert_nothing_left(work)
    # U-Boot, but no boot configuration.
    header = b"\0\0\0\0" + qemu.ALLWINNER_MAGIC + b"\0" * 1000
    no_config = make_image(tmp_path / "pc2.img", "orangepipcplus", {}, uboot=header)
    assert "U-Boot would find nothing to boot" in error_of(try_image(no_config, "--workdir", work))
    # An arm64 image whose extlinux.conf names a kernel that is not there.
    no_kernel = make_image(tmp_path / "zero.img", "orangepizeroplus2-h5",
                           {"boot/extlinux/extlinux.conf": EXTLINUX_ARM64})
    message = error_of(try_image(no_kernel, "--workdir", work))
    assert "/boot/vmlinuz-test, which is not in the image" in message
    nothing = make_image(tmp_path / "zero2.img", "orangepizeroplus2-h5", {})
    assert "no kernel in /boot" in error_of(try_image(nothing, "--workdir", work))
    # A board QEMU has no machine for.
    rk = make_image(tmp_path / "rk.img", "orangepi5", {})
    proc = try_image(rk, "--workdir", work, "--board", "orangepirv2")
    assert proc.returncode == 1
    assert "Allwinner H3/H2+ boards" in error_of(proc)
    assert_nothing_left(work)


def test_missing_qemu_names_the_package(tmp_path: Path, work: Path) -> None:
    """Found from the manifest beside the image, before the image is even decompressed."""
    image = make_image(tmp_path / "x-trixie.img", "orangepizeroplus2-h5", {})
    subprocess.run(["zstd", "-q", "--rm", str(image)], check=True)
    (tmp_path / "x-trixie.manifest.json").write_text(
        '{"board": {"id": "orangepizeroplus2-h5"}}')
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("debugfs", "dumpe2fs", "sfdisk", "cp", "zstd"):
        (tools / tool).symlink_to(shutil.which(tool) or tool)
    env = cli_env(PATH=str(tools))
    proc = try_image(tmp_path / "x-trixie.img.zst", "--workdir", work, env=env)
    assert proc.returncode == 1
    assert "qemu-system-aarch64 not found: install it with: apt-get install qemu-system-arm" \
        in error_of(proc)
    assert "decompressing" not in proc.stderr
    assert_nothing_left(work)


def hanging_image(tmp_path: Path, tls: str | None = None) -> Path:
    """An arm64 image whose 'kernel' is zeros: QEMU runs it, and nothing is ever printed.
    `tls`: its release file's JUPYTER_TLS (None: no such line, as before HTTPS)."""
    release = (b"BOARD=orangepizeroplus2-h5\nJUPYTER_USER=jupyter\nJUPYTER_PORT=8888\n"
               + (f"JUPYTER_TLS={tls}\n".encode() if tls else b""))
    return make_image(tmp_path / "hang.img", "orangepizeroplus2-h5", {
        "boot/extlinux/extlinux.conf": EXTLINUX_ARM64, "etc/orangepi-jupyter-release": release,
        "boot/vmlinuz-test": b"\0" * 65536, "boot/initrd.img-test": b"\0" * 4096})


@pytest.mark.parametrize("tls", [None, "yes"], ids=["no-tls-line", "tls"])
def test_a_hanging_guest_fails_at_its_phase_timeout(tmp_path: Path, work: Path,
                                                     tls: str | None) -> None:
    """...and the report says when Jupyter is checked over plain HTTP: an image whose
    release file does not say JUPYTER_TLS=yes."""
    image = hanging_image(tmp_path, tls)
    report = tmp_path / "report"
    started = time.monotonic()
    proc = try_image(image, "--smoke", "--workdir", work, "--report", report,
                     "--timeout", "kernel=8")
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - started < 60
    assert "try-image: kernel failed: no 'systemd' on the serial console in 8 s" in proc.stderr
    assert "last 50 lines of the serial console" in proc.stderr
    assert "FAILED" in proc.stdout
    (run,) = set(report.iterdir()) - {report / "latest"}
    assert run.name.startswith("hang-") and (report / "latest").resolve() == run
    assert proc.stdout.splitlines()[-1] == f"try-image: report in {run}"
    result = (run / "report.json").read_text()
    assert '"failed_phase": "kernel"' in result
    notes = json.loads(result)["notes"]
    plain = [n for n in notes if n.startswith("plain HTTP: ")]
    assert len(plain) == (0 if tls == "yes" else 1), notes
    assert (run / "serial-boot1.log").exists()
    assert_nothing_left(work)
    image_before = image.read_bytes()
    assert image.read_bytes() == image_before


@pytest.mark.root
def test_a_workdir_without_room_for_the_guest_is_refused(tmp_path: Path) -> None:
    """A host disk that fills while the guest boots stalls it silently until a time limit:
    try-image refuses at once when the guest's writes would not fit beside the trial disk."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600m", "tmpfs", str(small)], check=True)
    try:
        proc = try_image(hanging_image(tmp_path), "--smoke", "--workdir", small,
                         "--report", tmp_path / "report")
        assert proc.returncode == 1, proc.stderr
        line = error_of(proc)
        assert re.search(rf"{small}: 5\d\d\.\d MiB free once the trial disk is there, and the "
                         rf"guest writes up to 1\.0 GiB .*pass --workdir DIR", line), line
        assert "QEMU" not in proc.stderr
        assert_nothing_left(small)
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_every_run_keeps_its_own_report(tmp_path: Path, work: Path) -> None:
    """A second run, of the same image (also in the same second) or of another image, leaves
    the first run's report as it was: the evidence of a failure survives the next try."""
    image = hanging_image(tmp_path)
    other = shutil.copy(image, tmp_path / "other.img")
    report = tmp_path / "reports"
    runs = []
    for boot in (image, image, other):
        proc = try_image(boot, "--smoke", "--workdir", work, "--report", report,
                         "--timeout", "kernel=3")
        assert proc.returncode == 3, proc.stderr
        runs.append(Path(proc.stdout.splitlines()[-1].removeprefix("try-image: report in ")))
        assert (report / "latest").resolve() == runs[-1]
    assert len(set(runs)) == 3 and all(r.parent == report for r in runs)
    assert [r.name.split("-")[0] for r in runs] == ["hang", "hang", "other"]
    assert set(report.iterdir()) == {*runs, report / "latest"}
    for run in runs:
        assert '"failed_phase": "kernel"' in (run / "report.json").read_text()
        assert (run / "serial-boot1.log").exists() and (run / "summary.txt").exists()
    # Two runs in the same second: the second directory gets a number, the first is kept.
    from builder import smoke_report
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(smoke_report.time, "strftime", lambda fmt: "20261204-120000")
        first = smoke_report.new_report_directory(report, image)
        second = smoke_report.new_report_directory(report, image)
    assert (first.name, second.name) == ("hang-20261204-120000", "hang-20261204-120000-2")
    assert (report / "latest").resolve() == second and all(r.is_dir() for r in runs)
    # An unwritable --report is refused before anything is decompressed.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = try_image(image, "--smoke", "--workdir", work, "--report", blocker / "reports")
    assert error_of(proc) == (f"try-image: error: --report {blocker}/reports: {blocker} is not "
                              f"a directory; give a directory")
    assert_nothing_left(work)


def test_ctrl_c_stops_qemu_and_removes_the_trial_disk(tmp_path: Path, work: Path) -> None:
    image = hanging_image(tmp_path)
    original = image.read_bytes()
    proc = subprocess.Popen([*TRY_IMAGE, str(image), "--smoke", "--workdir", str(work),
                             "--report", str(tmp_path / "report")], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not qemu_running(work):
            assert time.monotonic() < deadline, "QEMU did not start"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT
    assert "interrupted by SIGINT; QEMU was stopped and the trial disk removed" in stderr
    assert_nothing_left(work)
    assert image.read_bytes() == original


def test_killed_try_image_leaves_no_qemu_and_the_next_run_removes_its_disk(
        tmp_path: Path, work: Path) -> None:
    image = hanging_image(tmp_path)
    proc = subprocess.Popen([*TRY_IMAGE, str(image), "--smoke", "--workdir", str(work),
                             "--report", str(tmp_path / "report")], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not qemu_running(work):
        assert time.monotonic() < deadline, "QEMU did not start"
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while qemu_running(work):
        assert time.monotonic() < deadline, "QEMU outlived try-image"
        time.sleep(0.2)
    assert len(list(work.glob("try-image-*"))) == 1       # SIGKILL: no cleanup ran
    # The next run (here: one refused at once) removes the dead run's trial disk.
    try_image(tmp_path / "hang.img", "--workdir", work, "--timeout", "nope=1")
    qemu.work_directory(work).rmdir()
    assert list(work.iterdir()) == []


def test_a_taken_port_is_replaced_by_a_free_one() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = qemu.free_port(port)
        assert other != port
        with socket.socket() as s:
            s.bind(("127.0.0.1", other))       # really free
    free = qemu.free_port(None)
    assert qemu.free_port(free) == free


def test_machines_for_boards() -> None:
    catalog = load_catalog()
    pc = qemu.machine_for(catalog.lookup("orangepipcplus")[0], None)
    assert (pc.name, pc.qemu, pc.console, pc.memory_mib) == \
        ("orangepi-pc", "qemu-system-arm", "ttyS0", 1024)
    zero = qemu.machine_for(catalog.lookup("orangepizero")[0], None)
    assert zero.name == "orangepi-pc"
    h5 = qemu.machine_for(catalog.lookup("orangepizeroplus2-h5")[0], 2048)
    assert (h5.name, h5.console, h5.memory_mib) == ("virt", "ttyAMA0", 2048)
    assert qemu.kernel_arguments("root=UUID=x rootwait console=ttyS0,115200 quiet", h5) == \
        "root=UUID=x rootwait quiet console=ttyAMA0,115200 " \
        "systemd.default_device_timeout_sec=900"
    # The board's early UART is nothing on virt; an odd quote is passed on, not a traceback.
    assert qemu.kernel_arguments('earlycon=uart,mmio32,0x1c28000 foo="a b', h5).startswith(
        'foo="a b console=ttyAMA0')


def test_the_default_label_of_extlinux_counts(tmp_path: Path) -> None:
    """U-Boot boots the label `default` names, with paths relative to extlinux.conf's
    directory; a kernel reached through a symbolic link (Armbian's /boot/Image) is dumped as
    the kernel, not as the link."""
    conf = (b"# a comment\ndefault new\nlabel old\n  kernel /boot/vmlinuz-old\n"
            b"  append root=/dev/old\nlabel new\n  linux ../Image\n  initrd initrd.img\n"
            b"  append root=/dev/vda1 rw\n")
    disk = make_image(tmp_path / "d.img", "orangepizeroplus2-h5", {
        "boot/extlinux/extlinux.conf": conf, "boot/vmlinuz-real": b"K" * 5000,
        "boot/extlinux/initrd.img": b"I" * 3000})
    subprocess.run(["debugfs", "-w", "-R", "symlink /boot/Image vmlinuz-real",
                    f"{disk}?offset={ROOT_OFFSET}"], check=True, capture_output=True)
    from builder.image import read_table
    fs = find_root_fs(disk, read_table(disk))
    machine = qemu.machine_for(load_catalog().lookup("orangepizeroplus2-h5")[0], None)
    kernel = qemu.check_bootable(machine, disk, fs, tmp_path)
    assert kernel is not None
    assert kernel.kernel.read_bytes() == b"K" * 5000
    assert kernel.initrd is not None and kernel.initrd.read_bytes() == b"I" * 3000
    assert kernel.append == "root=/dev/vda1 rw"


def test_trial_disk_changes(tmp_path: Path) -> None:
    """What emulation gets written into the trial disk, read back with debugfs."""
    disk = make_image(tmp_path / "d.img", "orangepizeroplus2-h5", {
        "boot/jupyter-firstboot.conf": b"jupyter_password_hash = x\n",
        "etc/systemd/system/jupyter-firstboot@.service": b"[Unit]\n"})
    from builder.image import read_table
    fs = find_root_fs(disk, read_table(disk))
    machine = qemu.machine_for(load_catalog().lookup("orangepizeroplus2-h5")[0], None)
    changes = qemu.prepare_for_emulation(fs, machine, tmp_path)
    assert len(changes) == 2, changes
    assert fs.read(qemu.SLOW_MACHINE_PATH) == qemu.SLOW_MACHINE_CONF.encode()
    assert fs.exists("/etc/systemd/system/dev-ttyAMA0.device.wants/"
                     "jupyter-firstboot@ttyAMA0.service")
    size = qemu.grow_to_power_of_two(disk)
    assert size == 32 << 20 and disk.stat().st_size == size


@pytest.mark.parametrize("boot, expected", [
    # A Debian base: every label's append line, as U-Boot reads it (any case, odd spacing).
    ({"boot/extlinux/extlinux.conf": b"default l\nlabel l\n  kernel /boot/z\n"
      b"  APPEND root=UUID=1 rw console=ttyS0,115200  \nlabel old\n\tappend root=/dev/x\r\n"
      b"label bare\n  append\n  fdtoverlays /o.dtbo\n# append root=/dev/comment\n"},
     ("/boot/extlinux/extlinux.conf",
      b"default l\nlabel l\n  kernel /boot/z\n  APPEND root=UUID=1 rw console=ttyS0,115200 "
      b"maxcpus=1\nlabel old\n\tappend root=/dev/x maxcpus=1\r\nlabel bare\n  append "
      b"maxcpus=1\n  fdtoverlays /o.dtbo\n# append root=/dev/comment\n")),
    # Armbian: boot.scr appends armbianEnv.txt's extraargs; the other lines stay as they are.
    # Armbian's console=both ends on tty1, verbosity=1 hides the kernel's and the shutdown's
    # messages: the serial line and the kernel's default level instead, once each.
    ({"boot/boot.scr": b"script", "boot/armbianEnv.txt": b"verbosity=1\r\n  extraargs=quiet\r\n"
      b"console=display\r\nrootdev=UUID=2\r\n  console=both\r\n"},
     ("/boot/armbianEnv.txt",
      b"verbosity=7\r\n  extraargs=quiet maxcpus=1\r\n#console=display\r\nrootdev=UUID=2\r\n"
      b"console=serial\r\n")),
    ({"boot/boot.scr": b"script", "boot/armbianEnv.txt": b"rootdev=UUID=2"},
     ("/boot/armbianEnv.txt",
      b"rootdev=UUID=2\nextraargs=maxcpus=1\nconsole=serial\nverbosity=7\n")),
    # The device tree of the board QEMU emulates (the Orange Pi PC), where the image has it:
    # the PC Plus's enables MMC controllers QEMU lacks, whose probes hang.
    ({"boot/extlinux/extlinux.conf": b"label l\n  append root=UUID=1\n"
      b"  fdt /usr/lib/linux-image-6.12/sun8i-h3-orangepi-pc-plus.dtb\r\n",
      "usr/lib/linux-image-6.12/sun8i-h3-orangepi-pc.dtb": b"pc"},
     ("/boot/extlinux/extlinux.conf",
      b"label l\n  append root=UUID=1 maxcpus=1\n"
      b"  fdt /usr/lib/linux-image-6.12/sun8i-h3-orangepi-pc.dtb\r\n")),
    ({"boot/boot.scr": b"script", "boot/armbianEnv.txt": b"rootdev=UUID=2\n",
      "boot/dtb/sun8i-h3-orangepi-pc.dtb": b"pc"},
     ("/boot/armbianEnv.txt",
      b"rootdev=UUID=2\nextraargs=maxcpus=1\nconsole=serial\nverbosity=7\n"
      b"fdtfile=sun8i-h3-orangepi-pc.dtb\n")),
], ids=["extlinux", "armbianEnv-extraargs", "armbianEnv-none", "extlinux-fdt",
        "armbianEnv-fdtfile"])
def test_orangepi_pc_trial_disk_boots_one_core_on_the_serial_console(
        tmp_path: Path, boot: dict[str, bytes], expected: tuple[str, bytes]) -> None:
    """QEMU's orangepi-pc always has four vCPUs; the trial disk's kernel starts one (a CI run
    with four stalled for minutes on cross-core TLB flushes). virt's kernel arguments are
    try-image's own and are not written into the disk."""
    disk = make_image(tmp_path / "d.img", "orangepipcplus", boot)
    from builder.image import read_table
    fs = find_root_fs(disk, read_table(disk))
    machine = qemu.machine_for(load_catalog().lookup("orangepipcplus")[0], None)
    changes = qemu.prepare_for_emulation(fs, machine, tmp_path)
    path, content = expected
    assert fs.read(path) == content
    assert any(c.startswith(f"{path}: ") and "maxcpus=1" in c for c in changes), changes
    # The report says when the device tree was swapped, and only then.
    assert any(qemu.EMULATED_DTB in c for c in changes) == (b"orangepi-pc.dtb" in content)
    assert "Mode:  0644" in subprocess.run(["debugfs", "-R", f"stat {path}", fs.spec],
                                           capture_output=True, text=True).stdout
    # Every other file of the boot configuration is left as the image has it.
    for name, data in boot.items():
        if f"/{name}" != path:
            assert fs.read(f"/{name}") == data
    virt = make_image(tmp_path / "v.img", "orangepizeroplus2-h5", boot)
    virt_fs = find_root_fs(virt, read_table(virt))
    qemu.prepare_for_emulation(virt_fs, qemu.machine_for(
        load_catalog().lookup("orangepizeroplus2-h5")[0], None), tmp_path)
    assert virt_fs.read(path) == boot[path.lstrip("/")]


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "try-image"
    assert script.exists(), "pip install -e . makes the try-image command"
    assert os.access(script, os.X_OK)


@pytest.mark.parametrize("tls, scheme", [(None, "http"), ("no", "http"), ("yes", "https")])
def test_interactive_mode_gives_the_terminal_the_serial_console(
        tmp_path: Path, work: Path, tls: str | None, scheme: str) -> None:
    """Without --smoke the guest's serial console is the user's terminal, and the URL to
    open is said (https:// for an image whose Jupyter serves HTTPS, with what to compare the
    browser's warning with); Ctrl-A X quits QEMU and try-image cleans up after it."""
    import pexpect
    image = hanging_image(tmp_path, tls)
    child = pexpect.spawn(TRY_IMAGE[0], [*TRY_IMAGE[1:], str(image), "--workdir", str(work),
                                         "--port", "0"],
                          cwd=str(REPO), env=cli_env(), encoding="utf-8", timeout=60)
    try:
        child.expect(r"Jupyter is\s+at (https?)://127\.0\.0\.1:(\d+)/lab")
        assert child.match.group(1) == scheme
        port = int(child.match.group(2))
        assert 0 < port < 65536
        said = child.before + child.after
        child.expect("Ctrl-A X quits QEMU")
        said += child.before
        assert ("fingerprint" in " ".join(said.split())) == (scheme == "https"), said
        deadline = time.monotonic() + 30
        while not qemu_running(work):
            assert time.monotonic() < deadline, "QEMU did not start"
            time.sleep(0.2)
        time.sleep(1)
        child.send("\x01x")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert_nothing_left(work)


# What a machine prepared by ci/setup-host alone has: its packages and what they depend on,
# never what they only recommend (it installs with --no-install-recommends).


def setup_host_closure() -> set[str]:
    """The installed packages ci/setup-host --dev names, with their Depends and Pre-Depends,
    followed through installed packages (an alternative or a virtual package resolves to
    the first installed one that provides it)."""
    wanted = subprocess.run(["bash", str(REPO / "ci/setup-host"), "--list", "--dev"],
                            check=True, capture_output=True, text=True).stdout.split()
    assert "qemu-system-arm" in wanted
    status = subprocess.run(["dpkg-query", "-W", "-f",
                             "${Package}\t${db:Status-Status}\t${Provides}\t${Pre-Depends}, "
                             "${Depends}\n"], check=True, capture_output=True,
                            text=True).stdout
    depends: dict[str, str] = {}
    provided: dict[str, str] = {}
    for line in status.splitlines():
        name, state, provides, needs = line.split("\t")
        if state != "installed":
            continue
        depends[name] = needs
        for virtual in filter(None, (p.split()[0] for p in provides.split(",") if p.strip())):
            provided.setdefault(virtual, name)

    def installed(alternatives: str) -> str | None:
        for alternative in alternatives.split("|"):
            name = alternative.split()[0].split(":")[0]
            if name in depends:
                return name
            if name in provided:
                return provided[name]
        return None

    closure: set[str] = set()
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in closure or name not in depends:
            continue
        closure.add(name)
        for group in depends[name].split(","):
            if group.strip() and (found := installed(group)):
                todo.append(found)
    missing = [p for p in wanted if p not in closure]
    assert not missing, f"run ci/setup-host --dev first: {missing} not installed"
    return closure


def stage_qemu_data_dirs(qemu_binary: str, closure: set[str], stage: Path) -> list[tuple[Path,
                                                                                         Path]]:
    """Copies of QEMU's data directories holding only files of packages in `closure`:
    (copy, directory) pairs to bind over the real ones."""
    listed = subprocess.run([qemu_binary, "-L", "help"], check=True, capture_output=True,
                            text=True).stdout.split()
    dirs = sorted({Path(os.path.normpath(d)) for d in listed if Path(d).is_dir()})
    owned = set(subprocess.run(["dpkg-query", "-L", *sorted(closure)], capture_output=True,
                               text=True).stdout.splitlines())
    pairs = []
    for i, real in enumerate(dirs):
        copy = stage / str(i)
        copy.mkdir(parents=True)
        for path in real.rglob("*"):
            if path.is_dir():
                continue
            if str(path) in owned and os.path.realpath(path) in owned \
                    and Path(os.path.realpath(path)).exists():
                target = copy / path.relative_to(real)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        pairs.append((copy, real))
    return pairs


def qemu_machine_starts(argv: list[str], views: list[tuple[Path, Path]]) -> tuple[bool, str]:
    """QEMU built the whole machine for `argv` (devices, their ROMs, the kernel, the disk)
    with its data directories replaced by `views`, in a mount namespace of its own. Paused
    (-S), so no guest code runs: QMP answering means the machine exists."""
    binds = "; ".join(f"mount --bind {shlex.quote(str(c))} {shlex.quote(str(r))}"
                      for c, r in views)
    qmp = ('{"execute": "qmp_capabilities"}\n{"execute": "query-status"}\n'
           '{"execute": "quit"}\n')
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec",
                           f'{binds}; exec "$@"', "sh", *argv, "-S", "-qmp", "stdio"],
                          input=qmp, capture_output=True, text=True, timeout=120)
    return proc.returncode == 0 and '"prelaunch"' in proc.stdout, proc.stderr.strip()


@pytest.mark.root
@pytest.mark.skipif(shutil.which("dpkg-query") is None or shutil.which("unshare") is None,
                    reason="needs a Debian host (dpkg) and unshare")
@pytest.mark.parametrize("board", ["orangepipcplus", "orangepizeroplus2-h5"])
def test_qemu_needs_nothing_but_what_setup_host_installs(tmp_path: Path, board: str) -> None:
    """try-image's QEMU command line starts on a machine holding only ci/setup-host's
    packages and their dependencies: QEMU's data directories are shown to it with every file
    of another package (a Recommends like ipxe-qemu, installed here or not) taken away."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a mount namespace)")
    machine = qemu.machine_for(load_catalog().lookup(board)[0], None)
    closure = setup_host_closure()
    assert "ipxe-qemu" not in closure, "a Recommends of qemu-system-arm, never installed"
    views = stage_qemu_data_dirs(machine.qemu, closure, tmp_path / "stage")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    kernel = None
    if not machine.boots_uboot:
        (tmp_path / "vmlinuz").write_bytes(bytes(4096))
        (tmp_path / "initrd.img").write_bytes(bytes(4096))
        kernel = qemu.Kernel(tmp_path / "vmlinuz", tmp_path / "initrd.img", "root=/dev/vda1")
    argv = qemu.command(machine, disk, kernel, "null", qemu.free_port(None), 8888)
    started, errors = qemu_machine_starts(argv, views)
    assert started, f"QEMU did not start with only ci/setup-host's packages: {errors}"
    if machine.name == "virt":
        # The view is what it claims: the NIC as QEMU makes it by default wants iPXE's ROM,
        # which the view does not have.
        nic = argv.index("-netdev")
        old = [*argv[:nic], "-nic", "user,model=virtio-net-pci", *argv[nic + 4:]]
        started, errors = qemu_machine_starts(old, views)
        assert not started and 'failed to find romfile "efi-virtio.rom"' in errors, errors


@pytest.mark.parametrize("compression", sorted(output.COMPRESSORS))
def test_every_image_build_image_writes_is_read(tmp_path: Path, work: Path,
                                                compression: str) -> None:
    """Each kind of file build-image writes (output.COMPRESSORS, compressed by its own
    command): try-image takes it and makes a trial disk of exactly the image's bytes, then goes
    on up to the boot (here stopped by an image that does not say its board)."""
    image = make_image(tmp_path / "t.img", "orangepizeroplus2-h5",
                       {"etc/orangepi-jupyter-release": b"JUPYTER_USER=jupyter\n"})
    raw = image.read_bytes()
    suffix, argv = output.COMPRESSORS[compression]
    written = tmp_path / f"written.img{suffix}"
    with open(image, "rb") as src, open(written, "wb") as dst:
        subprocess.run([*argv] if argv else ["cat"], stdin=src, stdout=dst, check=True)
    from builder import tryimage
    request = tryimage.check_request(tryimage.parser().parse_args([str(written)]))
    assert request.image == written
    disk = tmp_path / "disk.img"
    qemu.make_trial_disk(request.image, disk)
    assert disk.read_bytes() == raw
    assert written.stat().st_size > 0 and (suffix == "" or written.read_bytes() != raw)
    proc = try_image(written, "--workdir", work)
    assert proc.returncode == 1
    assert error_of(proc) == ("try-image: error: written.img" + suffix + " does not say which "
                              "board it is for (no /etc/orangepi-jupyter-release): pass --board")
    assert_nothing_left(work)
