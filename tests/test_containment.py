"""The image kept away from the host: its programs run in namespaces of their own, and no
path the builder writes under the image follows the image's links out to the host.

Real builds on loop devices with qemu-user; the images are the Armbian-like test image, once
as it is and once made hostile: its /dev, /tmp, /usr/sbin, /usr/lib, /boot and /etc/fstab
are absolute links to a sentinel tree on the host."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    BUILD_IMAGE,
    ENGINE_ONLY,
    REPO,
    cli_env,
    debugfs,
    leftover_resources,
    make_base_image,
    root_partition,
    run_cli,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

FAST = ENGINE_ONLY
HOSTILE_LINKS = ("dev", "tmp", "usr/sbin", "usr/lib", "boot", "etc/fstab")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(base: Path, tmp_path: Path, *extra: str | os.PathLike[str]
          ) -> subprocess.CompletedProcess[str]:
    return run_cli("--board", "orangepi5", "--base", base, "--cache-dir", tmp_path / "cache",
                   "--output", tmp_path / "out", *FAST, *extra, timeout=900)


def scripts(directory: Path, **texts: str) -> Path:
    directory.mkdir()
    for name, text in texts.items():
        path = directory / name.replace("_", "-")
        path.write_text(text)
        path.chmod(0o755)
    return directory


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A host process no build may touch."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()


def test_scripts_see_only_their_own_processes_and_kill_1_stays_inside(
        debian_rootfs: Path, tmp_path: Path, bystander: subprocess.Popen[bytes]) -> None:
    base = make_base_image(debian_rootfs, tmp_path).path
    host_pidns = os.readlink("/proc/self/ns/pid")
    host_name = Path("/proc/sys/kernel/hostname").read_text().strip()
    custom = scripts(
        tmp_path / "custom",
        **{"10_look.chroot": f"""#!/bin/sh
set -e
echo "pid=$$ root=$(readlink /proc/1/root) procs=$(ls /proc | grep -c '^[0-9]')"
if [ -e /proc/{bystander.pid} ] && grep -q sleep /proc/{bystander.pid}/comm; then
    echo "SEES THE HOST'S PROCESS {bystander.pid}"
fi
echo contained-by-build-image > /proc/sys/kernel/hostname
echo "hostname $(cat /proc/sys/kernel/hostname)"
echo "sysfs $(grep ' /sys sysfs ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1)"
""",
           "20_daemon.chroot": "#!/bin/sh\nsetsid sleep 600 &\necho daemon started\n",
           "30_after.chroot": """#!/bin/sh
n=0; for c in /proc/[0-9]*/comm; do grep -qx sleep "$c" && n=$((n+1)); done
echo "sleeping daemons left: $n"
""",
           # Guarded three times over: without a PID namespace of its own this would end
           # every process of the machine.
           "40_kill_all.chroot": f"""#!/bin/sh
if [ "$(readlink /proc/self/ns/pid)" = "{host_pidns}" ]; then
    echo "REFUSED: this is the host's PID namespace"; exit 3
fi
if [ "$$" != 1 ]; then echo "REFUSED: not the first process of a namespace"; exit 3; fi
if [ "$(ls /proc | grep -c '^[0-9]')" -gt 20 ]; then
    echo "REFUSED: too many processes visible"; exit 3
fi
sleep 600 &
victim=$!
kill -9 -1
sleep 1
kill -0 "$victim" 2>/dev/null && echo "victim alive" || echo "victim gone"
echo "survived kill -1"
"""})
    result = build(base, tmp_path, "--customize", custom)
    assert result.returncode == 0, result.stderr
    out = result.stderr
    assert "[10-look.chroot] pid=1 root=/ procs=" in out
    procs = int(out.split("[10-look.chroot] pid=1 root=/ procs=")[1].split()[0])
    assert procs <= 5, f"a script saw {procs} processes"
    assert "SEES THE HOST" not in out
    assert "[10-look.chroot] hostname contained-by-build-image" in out
    assert Path("/proc/sys/kernel/hostname").read_text().strip() == host_name
    assert "[10-look.chroot] sysfs ro" in out
    assert "[20-daemon.chroot] daemon started" in out
    assert "[30-after.chroot] sleeping daemons left: 0" in out
    assert "REFUSED" not in out
    assert "[40-kill-all.chroot] victim gone" in out
    assert "[40-kill-all.chroot] survived kill -1" in out
    assert bystander.poll() is None, "kill -1 in the image reached a host process"
    assert leftover_resources(tmp_path) == []


def rooted_under(path: Path) -> list[int]:
    """Processes whose root directory is `path` or below it: programs running in an image."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                root = os.readlink(entry / "root")
            except OSError:
                continue
            if root.startswith(str(path) + "/"):
                found.append(int(entry.name))
    return found


def test_a_killed_build_leaves_no_program_of_the_image_running(
        debian_rootfs: Path, tmp_path: Path) -> None:
    """SIGKILL gives the builder no chance to clean up: the program it ran in the image must
    still end at once (unshare dies with it, and takes the PID namespace along)."""
    base = make_base_image(debian_rootfs, tmp_path).path
    custom = scripts(tmp_path / "custom", **{
        "10_slow.chroot": "#!/bin/sh\necho started\nsetsid sleep 600 &\nsleep 600\n"})
    log = tmp_path / "build.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [*BUILD_IMAGE, "--board", "orangepi5", "--base", str(base), "--cache-dir",
             str(tmp_path / "cache"), "--output", str(tmp_path / "out"), *FAST,
             "--customize", str(custom)],
            cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while "[10-slow.chroot] started" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the script did not start in 600 s"
            time.sleep(0.2)
        assert rooted_under(tmp_path), "the script runs in the image"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    try:
        deadline = time.monotonic() + 10
        while rooted_under(tmp_path):
            assert time.monotonic() < deadline, f"still running: {rooted_under(tmp_path)}"
            time.sleep(0.1)
    finally:
        # The mounts and the loop device are the next build's (or --cleanup's) to undo; so
        # are the programs, should they have outlived the builder.
        cleanup = run_cli("--cleanup")
    assert cleanup.returncode == 0, cleanup.stderr
    assert leftover_resources(tmp_path) == []


def snapshot(tree: Path) -> dict[str, str]:
    """Every entry below `tree`, links not followed: what it is and what it holds."""
    found = {}
    for directory, dirs, files in os.walk(tree):
        for name in dirs + files:
            path = Path(directory) / name
            key = str(path.relative_to(tree))
            if path.is_symlink():
                found[key] = "link " + os.readlink(path)
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = "file " + sha256(path)
    return found


@pytest.fixture
def sentinel() -> Iterator[Path]:
    """A tree on the host that the hostile image's links point at. Outside /tmp and /var/tmp
    (the image's own /tmp is one of the links; the build empties the image's /var/tmp)."""
    path = Path(tempfile.mkdtemp(prefix="orangepi-jupyter-sentinel-", dir="/srv"))
    for name in HOSTILE_LINKS:
        target = path / name
        if name == "etc/fstab":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("/dev/host-disk / ext4 defaults 0 1\n")
        else:
            target.mkdir(parents=True, exist_ok=True)
            (target / "host-file").write_text(f"the host's {name}\n")
    yield path
    shutil.rmtree(path)


def hostile_rootfs(rootfs: Path, work: Path, sentinel: Path) -> Path:
    """The test rootfs with each of HOSTILE_LINKS moved to the sentinel's path inside the
    image and replaced by an absolute link to it: inside the image the links work (so the
    build can run), followed from the host they lead to the sentinel."""
    tree = work / "hostile"
    subprocess.run(["cp", "-al", str(rootfs), str(tree)], check=True)
    for name in HOSTILE_LINKS:
        inside = tree / sentinel.relative_to("/") / name
        inside.parent.mkdir(parents=True, exist_ok=True)
        (tree / name).rename(inside)
        (tree / name).symlink_to(sentinel / name)
    return tree


def test_a_hostile_image_gets_nothing_written_outside_it(
        debian_rootfs: Path, tmp_path: Path, sentinel: Path) -> None:
    before = snapshot(sentinel)
    tree = hostile_rootfs(debian_rootfs, tmp_path, sentinel)
    base = make_base_image(tree, tmp_path).path
    shutil.rmtree(tree)
    repo = Path(__file__).resolve().parent.parent
    custom = scripts(tmp_path / "custom", **{
        "10_write.chroot": "#!/bin/sh\nset -e\necho in-image > /boot/from-chroot\n"
                           "echo in-image > /tmp/from-chroot\nls /usr/lib >/dev/null\n"
                           "echo wrote\n",
        # What the documentation tells host scripts to do.
        "20_host.host": "#!/bin/sh\nset -e\n"
                        "echo from-host > \"$(image-path /boot)/from-host\"\n"
                        "echo \"fstab: $(head -c 20 \"$(image-path /etc/fstab)\")\"\n",
    })
    # The appliance's own host script, the one that writes under /usr/lib and
    # /usr/local/sbin.
    shutil.copy2(repo / "customize.d/50-install-firstboot.host", custom)
    overlay = tmp_path / "overlay"
    (overlay / "usr/lib/overlay-test").mkdir(parents=True)
    (overlay / "usr/lib/overlay-test/file").write_text("overlay\n")
    (overlay / "boot").mkdir()
    (overlay / "boot/overlay-file").write_text("overlay\n")
    result = build(base, tmp_path, "--customize", custom, "--overlay", overlay)
    assert snapshot(sentinel) == before, "the build wrote through the image's links"
    assert result.returncode == 0, result.stderr
    assert "[10-write.chroot] wrote" in result.stderr
    assert "[20-host.host] fstab: " in result.stderr
    assert "/dev/host-disk" not in result.stderr
    # The writes went where the image's links lead inside the image.
    image = tmp_path / "image.img"
    subprocess.run(["zstd", "-q", "-d", str(next((tmp_path / "out").glob("*.img.zst"))),
                    "-o", str(image)], check=True)
    part = root_partition(image, 4 << 20)
    inside = "/" + str(sentinel.relative_to("/"))
    for path in ("boot/from-chroot", "boot/overlay-file", "usr/lib/overlay-test/file",
                 "boot/from-host",
                 "usr/lib/orangepi-jupyter/firstboot.pyz"):
        listed = debugfs(part, f"stat {inside}/{path}")
        assert "Type: regular" in listed.stdout, (path, listed.stdout, listed.stderr)
    assert "Type: symlink" in debugfs(part, "stat /usr/local/sbin/jupyter-setup").stdout
    # policy-rc.d and the build's apt settings went into the image's /usr/sbin and left.
    assert "Type: regular" not in debugfs(part, f"stat {inside}/usr/sbin/policy-rc.d").stdout
    assert leftover_resources(tmp_path) == []


def test_image_path_resolves_host_script_paths_inside_the_image(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "srv/real-lib").mkdir(parents=True)
    (root / "usr").mkdir()
    (root / "usr/lib").symlink_to("/srv/real-lib")
    (root / "escape").symlink_to("../../..")
    tool = Path(__file__).resolve().parent.parent / "builder/hostbin/image-path"
    env = {"PATH": os.environ["PATH"], "IMAGE_ROOT": str(root),
           "IMAGE_BUILDER_PYTHON": sys.executable,
           "PYTHONPATH": str(tool.parent.parent.parent)}
    found = subprocess.run([tool, "/usr/lib/x", "escape/etc/passwd"], env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    assert found == [f"{root}/srv/real-lib/x", f"{root}/etc/passwd"]
    bad = subprocess.run([tool], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage: image-path" in bad.stderr
