"""The image engine on real loop devices with a real qemu-user chroot: grow, customize,
overlays, shrink, outputs; and every way a build can fail or be stopped, after which no loop
device, mount or finished-looking file may be left."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    ARMBIAN_CNF_HOOK,
    BUILD_IMAGE,
    ENGINE_ONLY,
    REPO,
    BaseImage,
    cli_env,
    debugfs,
    error_line,
    leftover_resources,
    make_base_image,
    require_nobody_can_run,
    root_partition,
    run_cli,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

FAST = ENGINE_ONLY


@pytest.fixture
def base(debian_rootfs: Path, tmp_path: Path) -> BaseImage:
    return make_base_image(debian_rootfs, tmp_path)


@pytest.fixture
def user_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A customize.d and an overlay of a user's, exercising every kind of file."""
    scripts = tmp_path / "my-customize.d"
    scripts.mkdir()
    chroot = scripts / "50-arch.chroot.sh"
    chroot.write_text("#!/bin/sh\nset -e\nuname -m > /root/arch\n"
                      # A stray daemon that even keeps the script's output pipe open.
                      "setsid sleep 600 &\n"
                      "echo \"board=$IMAGE_BOARD arch=$IMAGE_ARCH release=$IMAGE_RELEASE\"\n"
                      "test -s \"$IMAGE_CONFIG\"\n"
                      "rc=0; /usr/sbin/policy-rc.d || rc=$?; echo rc=$rc\n"
                      "test -f /etc/resolv.conf && test ! -L /etc/resolv.conf\n"
                      "test -z \"${PIP_INDEX_URL:-}\" && echo clean env\n"
                      "cat /etc/apt/apt.conf.d/00build-image-proxy 2>/dev/null || true\n")
    host = scripts / "60-host.host"
    host.write_text("#!/bin/sh\nset -e\ntouch \"$IMAGE_ROOT/etc/host-was-here\"\n")
    (scripts / "70-skipped.chroot.disabled").write_text("#!/bin/sh\nexit 1\n")
    for script in scripts.iterdir():
        script.chmod(0o755)
    overlay = tmp_path / "my-overlay"
    (overlay / "etc/jupyter").mkdir(parents=True)
    secret = overlay / "etc/jupyter/private.conf"
    secret.write_text("mode 0640\n")
    secret.chmod(0o640)
    (overlay / "etc/jupyter/link").symlink_to("private.conf")
    setuid = overlay / "etc/jupyter/helper"
    setuid.write_text("#!/bin/sh\n")
    setuid.chmod(0o4755)
    # Debian's /var/run is a link to /run: an overlay file there belongs in the image's /run.
    (overlay / "var/run").mkdir(parents=True)
    (overlay / "var/run/overlay-test").write_text("image, not host\n")
    (overlay / "etc/jupyter/port.txt.j2").write_text(
        "{{ board.id }} listens on {{ config.jupyter.port }}\n")
    return scripts, overlay


def build(base: BaseImage, tmp_path: Path, *extra: str | os.PathLike[str],
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("--board", "orangepi5", "--base", base.path, "--cache-dir",
                   tmp_path / "cache", "--output", tmp_path / "out", *FAST, *extra, env=env,
                   timeout=600)


@pytest.fixture
def checked(tmp_path: Path) -> Iterator[None]:
    yield
    assert leftover_resources(tmp_path) == []


def outputs(tmp_path: Path) -> dict[str, Path]:
    out = tmp_path / "out"
    return {p.name.split(".", 1)[1]: p for p in out.iterdir()} if out.exists() else {}


def raw_image(path: Path, target: Path) -> Path:
    subprocess.run(["zstd", "-q", "-d", str(path), "-o", str(target)], check=True)
    return target


def read_from(part: Path, *paths: str) -> dict[str, str]:
    """Files of the image's root filesystem, read with debugfs (no mount needed)."""
    return {path: debugfs(part, f"cat {path}").stdout for path in paths}


def test_build_on_an_armbian_like_image(base: BaseImage, tmp_path: Path,
                                        user_dirs: tuple[Path, Path], checked: None) -> None:
    scripts, overlay = user_dirs
    result = build(base, tmp_path, "--customize", scripts, "--overlay", overlay,
                   "--apt-proxy", "http://127.0.0.1:3142",
                   env=cli_env(PIP_INDEX_URL="http://host-only.invalid/simple"))
    assert result.returncode == 0, result.stderr
    assert "[50-arch.chroot.sh] board=orangepi5 arch=arm64 release=trixie" in result.stderr
    assert "[50-arch.chroot.sh] clean env" in result.stderr
    assert '[50-arch.chroot.sh] Acquire::http::Proxy "http://127.0.0.1:3142";' in result.stderr
    assert "[50-arch.chroot.sh] rc=101" in result.stderr
    assert "70-skipped" not in result.stderr
    # The stray daemon went with its script's PID namespace, before the session's own check
    # for processes left running could find it.
    assert "left running in" not in result.stderr
    assert not Path("/run/overlay-test").exists()

    files = outputs(tmp_path)
    assert set(files) == {"img.zst", "img.zst.sha256", "img.bmap", "manifest.json",
                          "sbom.cdx.json", "build.log"}
    stem = files["img.zst"].name.removesuffix(".img.zst")
    assert stem.startswith("orangepi-jupyter-orangepi5-trixie-")
    assert result.stdout.split() == sorted(result.stdout.split(), key=lambda p: (
        p.endswith(".sha256"), p.endswith(".img.zst"))) and len(result.stdout.split()) == 6
    subprocess.run(["sha256sum", "-c", files["img.zst.sha256"].name], cwd=tmp_path / "out",
                   check=True, capture_output=True)
    manifest = json.loads(files["manifest.json"].read_text())
    names = {p["name"] for p in manifest["packages"]}
    assert {"dpkg", "apt", "libc6"} <= names
    assert manifest["board"]["id"] == "orangepi5" and manifest["config"]["jupyter"]["port"]
    # The lowered check is said, and recorded.
    assert "warning: base.verify is none" in result.stderr
    assert manifest["base"]["verified"] == {
        "level": "none", "source": str(base.path), "sha256": None,
        "sha256_from": "not computed", "sha256_url": None, "signer": None,
        "signer_name": None, "signature_url": None, "from_cache": False}
    # The dry run's plan is the whole truth: every step that ran, in order (the manifest is
    # written before the last two), and the scripts with the overlays among them.
    plan = build(base, tmp_path / "plan", "--customize", scripts, "--overlay", overlay,
                 "--dry-run").stdout
    planned = re.findall(r"^ +\d+\. (\S+)", plan, re.M)
    assert list(manifest["steps"]) == planned[:-2]
    assert planned[-2:] == ["write-manifest", "publish-outputs"]
    listed = re.search(r"customize-image.*\n((?: {9}\S+\n)+)", plan)
    assert listed and listed.group(1).split() == ["overlays/", "50-arch.chroot.sh",
                                                  "60-host.host"]
    assert "[50-arch.chroot.sh] rc=101" in files["build.log"].read_text()

    raw = raw_image(files["img.zst"], tmp_path / "result.img")
    # The bootloader area was never written.
    with open(raw, "rb") as f:
        f.seek(base.first_partition - len(base.gap))
        assert f.read(len(base.gap)) == base.gap
    # Grown for the build, then shrunk to its contents plus image.free_space (256 MiB).
    log = files["build.log"].read_text()
    assert "grew the root filesystem by 512 MiB" in log and "shrank the image to" in log
    part = root_partition(raw, base.first_partition)
    assert subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True).returncode == 0
    header = subprocess.run(["dumpe2fs", "-h", str(part)], capture_output=True,
                            text=True).stdout
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    free = int(fields["Free blocks"]) * int(fields["Block size"])
    assert 128 << 20 < free < 512 << 20, free
    seen = read_from(part, "/root/arch", "/etc/jupyter/port.txt", "/etc/host-was-here",
                     "/etc/orangepi-jupyter-release", "/etc/machine-id",
                     "/etc/apt/apt.conf.d/00build-image-proxy")
    assert seen["/etc/apt/apt.conf.d/00build-image-proxy"] == ""   # gone again
    assert seen["/root/arch"] == "aarch64\n"
    assert seen["/etc/jupyter/port.txt"] == "orangepi5 listens on 8888\n"
    assert seen["/etc/orangepi-jupyter-release"] == "", "customize.builtin=false: none of ours"
    assert seen["/etc/machine-id"] == ""
    assert "image, not host" in read_from(part, "/run/overlay-test")["/run/overlay-test"]
    ssh = debugfs(part, "ls /etc/ssh").stdout
    assert "ssh_host_ed25519_key" not in ssh, "host keys every card would share"
    helper = debugfs(part, "stat /etc/jupyter/helper").stdout
    assert "Mode:  04755" in helper
    link = debugfs(part, "stat /etc/jupyter/link").stdout
    assert "Type: symlink" in link and 'Fast link dest: "private.conf"' in link
    stat = debugfs(part, "stat /etc/jupyter/private.conf").stdout
    assert "Mode:  0640" in stat and "User:     0" in stat
    link = debugfs(part, "stat /etc/resolv.conf").stdout
    assert "Type: symlink" in link and "stub-resolv.conf" in link
    policy = debugfs(part, "stat /usr/sbin/policy-rc.d")
    assert "File not found" in policy.stderr
    assert not (tmp_path / "cache" / "work").exists() or \
        not list((tmp_path / "cache" / "work").iterdir())


def auxv_hwcap(root: Path, cpu: str | None) -> str:
    """AT_HWCAP (the CPU features) a grandchild process in `root` sees under `cpu`."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **({"QEMU_CPU": cpu} if cpu else {})}
    return subprocess.run(["chroot", str(root), "/bin/sh", "-c", HWCAP], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()


HWCAP = "sh -c 'od -An -t u8 -w16 /proc/self/auxv' | awk '$1 == 16 { print $2 }'"
# Looks at emulation and apt from inside the image: the CPU model a grandchild runs as, apt's
# update hooks and man-db's switch; then runs apt-get update and a real dpkg install.
EMULATION_PROBE = f"""#!/bin/sh
set -e
echo "cpu=${{QEMU_CPU:-none}} hwcap=$({HWCAP})"
echo "open files $(ulimit -n)"
echo "update hooks: $(apt-config dump | grep -c 'Post-Invoke-Success:: ' || true)"
test -e /var/lib/man-db/auto-update && echo "man-db auto-update on" || echo "man-db off"
mkdir -p /tmp/lists/partial /tmp/sources /tmp/repo /tmp/pkg/DEBIAN /tmp/pkg/usr/share/man/man1
: > /tmp/repo/Packages
echo 'deb [trusted=yes] file:/tmp/repo ./' > /tmp/sources/probe.list
apt-get -q update -o Acquire::Languages=none -o Dir::Etc::SourceList=/dev/null \
    -o Dir::Etc::SourceParts=/tmp/sources -o Dir::State::Lists=/tmp/lists
printf 'Package: probe\nVersion: 1\nArchitecture: all\nMaintainer: t <t@example.org>\n\
Description: probe\n' > /tmp/pkg/DEBIAN/control
echo '.TH PROBE 1' | gzip -n > /tmp/pkg/usr/share/man/man1/probe.1.gz
dpkg-deb -b /tmp/pkg /tmp/probe.deb >/dev/null
dpkg -i /tmp/probe.deb >/dev/null
"""


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "settings-off"])
def test_emulation_and_apt_hooks(base: BaseImage, debian_rootfs: Path, tmp_path: Path,
                                 checked: None, fast: bool) -> None:
    """Every program in the image, grandchildren included, runs as the fast CPU model and
    no host script sees it; apt's update hooks and man-db's auto-update are set aside for
    the build, man-db's index is rebuilt once, and the image keeps every setting as it was.
    With emulation.cpu=qemu and emulation.quick_apt=false none of that happens."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "10-fake-mandb.chroot").write_text(
        "#!/bin/sh\nprintf '#!/bin/sh\\necho \"$*\" >> /var/lib/mandb-ran\\n' > /usr/bin/mandb\n"
        "chmod 755 /usr/bin/mandb\n")
    (scripts / "20-probe.chroot").write_text(EMULATION_PROBE)
    (scripts / "25-env.host").write_text("#!/bin/sh\necho \"host sees ${QEMU_CPU:-none}\"\n")
    for script in scripts.iterdir():
        script.chmod(0o755)
    settings = () if fast else ("--set", "emulation.cpu=qemu", "--set",
                                "emulation.quick_apt=false")
    result = build(base, tmp_path, "--customize", scripts, *settings)
    assert result.returncode == 0, result.stderr
    a53, default = auxv_hwcap(debian_rootfs, "cortex-a53"), auxv_hwcap(debian_rootfs, None)
    assert a53 != default
    log = result.stderr
    assert "[25-env.host] host sees none" in log
    # apt's loop over every possible descriptor stays short whatever the host's limit.
    assert "[20-probe.chroot] open files 1024" in log
    if fast:
        assert "arm64 programs run as cortex-a53 (QEMU_CPU) on qemu-aarch64" in log
        assert f"[20-probe.chroot] cpu=cortex-a53 hwcap={a53}" in log
        assert "[20-probe.chroot] update hooks: 0" in log
        assert "[20-probe.chroot] man-db off" in log
    else:
        assert "arm64 programs run on qemu's default CPU (emulation.cpu=qemu)" in log
        assert f"[20-probe.chroot] cpu=none hwcap={default}" in log
        assert "[20-probe.chroot] update hooks: 1" in log
        assert "[20-probe.chroot] man-db auto-update on" in log

    part = root_partition(raw_image(outputs(tmp_path)["img.zst"], tmp_path / "result.img"),
                          base.first_partition)
    seen = read_from(part, "/etc/apt/apt.conf.d/50command-not-found",
                     "/var/lib/command-not-found/hook-ran", "/var/lib/mandb-ran",
                     "/var/lib/man-db/auto-update", "/var/lib/dpkg/status")
    assert seen["/etc/apt/apt.conf.d/50command-not-found"] == ARMBIAN_CNF_HOOK
    assert "Package: probe\n" in seen["/var/lib/dpkg/status"]
    listing = debugfs(part, "ls -l /var/lib/man-db").stdout
    assert "auto-update" in listing and "aside" not in listing
    assert "99zz-build-image" not in debugfs(part, "ls /etc/apt/apt.conf.d").stdout
    if fast:
        assert seen["/var/lib/command-not-found/hook-ran"] == ""
        assert seen["/var/lib/mandb-ran"] == "--quiet\n", "once, at the session's end"
    else:
        assert seen["/var/lib/command-not-found/hook-ran"].count("\n") == 1
        assert seen["/var/lib/mandb-ran"] == ""


def test_unknown_cpu_model(base: BaseImage, tmp_path: Path, checked: None) -> None:
    result = build(base, tmp_path, "--set", "emulation.cpu=cortex-z99")
    assert result.returncode != 0
    line = error_line(result)
    assert line.startswith("build-image: error: emulation.cpu=cortex-z99: qemu-aarch64")
    assert line.endswith("has no such CPU model; choose one of "
                         "`/usr/bin/qemu-aarch64-static -cpu help`, or auto")
    assert outputs(tmp_path) == {}


def test_cache_path_with_a_space(base: BaseImage, tmp_path: Path, checked: None) -> None:
    result = run_cli("--board", "orangepi5", "--base", base.path, "--cache-dir",
                     tmp_path / "my builds", "--output", tmp_path / "out", *FAST, timeout=600)
    assert result.returncode == 0, result.stderr
    assert len(outputs(tmp_path)) == 6     # image, .sha256, .bmap, manifest, SBOM, log


def test_keep_workspace(base: BaseImage, tmp_path: Path, checked: None) -> None:
    result = build(base, tmp_path, "--keep-workspace")
    assert result.returncode == 0, result.stderr
    (kept,) = (tmp_path / "cache" / "work").glob("kept-*")
    assert (kept / "image.img").stat().st_size > 0   # the working copy, for a look inside
    assert leftover_resources(kept) == []             # but nothing is mounted any more


def test_bmap_copy_onto_a_card(base: BaseImage, tmp_path: Path, checked: None) -> None:
    assert build(base, tmp_path).returncode == 0
    files = outputs(tmp_path)
    raw = raw_image(files["img.zst"], tmp_path / "result.img")
    card = tmp_path / "card.img"
    with open(card, "wb") as f:
        f.write(os.urandom(1 << 20))   # a used card: old data the copy must overwrite
        f.truncate(raw.stat().st_size + (64 << 20))
    device = subprocess.run(["losetup", "--find", "--show", str(card)], check=True,
                            capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["bmaptool", "copy", str(files["img.zst"]), device], check=True,
                       capture_output=True)
        with open(device, "rb") as dev, open(raw, "rb") as img:
            while chunk := img.read(1 << 20):
                assert dev.read(len(chunk)) == chunk
    finally:
        subprocess.run(["losetup", "--detach", device], check=True)


def test_gpt_image(debian_rootfs: Path, tmp_path: Path, checked: None) -> None:
    base = make_base_image(debian_rootfs, tmp_path, table="gpt")
    result = build(base, tmp_path)
    assert result.returncode == 0, result.stderr
    raw = raw_image(outputs(tmp_path)["img.zst"], tmp_path / "result.img")
    verify = subprocess.run(["sfdisk", "--verify", str(raw)], capture_output=True, text=True)
    assert verify.returncode == 0 and "problems" not in verify.stdout.lower(), verify.stdout
    dump = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True,
                                     check=True).stdout)["partitiontable"]
    assert dump["label"] == "gpt" and dump["partitions"][0]["start"] == 32768
    with open(raw, "rb") as f:
        f.seek(34 * 512)
        assert f.read(len(base.gap)) == base.gap


def test_failing_script_stops_the_build(base: BaseImage, tmp_path: Path, checked: None) -> None:
    scripts = tmp_path / "fail.d"
    scripts.mkdir()
    bad = scripts / "20-fail.chroot"
    bad.write_text("#!/bin/sh\necho about to fail\nexit 3\n")
    bad.chmod(0o755)
    result = build(base, tmp_path, "--customize", scripts)
    line = error_line(result)
    assert line == "build-image: error: customize.d/20-fail.chroot failed with exit code 3"
    assert "  | about to fail" in result.stderr
    assert outputs(tmp_path) == {} or not any(
        not p.name.startswith(".") for p in (tmp_path / "out").iterdir())
    assert not any((tmp_path / "out").glob(".*")), "no temporary output left"


@pytest.mark.parametrize("problem", ["not executable", "no kind", "no shebang",
                                     "unknown setting", "unknown directive"])
def test_bad_script_is_found_before_anything_runs(base: BaseImage, tmp_path: Path,
                                                  problem: str, checked: None) -> None:
    scripts = tmp_path / "bad.d"
    scripts.mkdir()
    name = "30-x.sh" if problem == "no kind" else "30-x.chroot"
    script = scripts / name
    header = {"unknown setting": "# build-image: settings jupyter.prot\n",
              "unknown directive": "# build-image: depends jupyter.port\n"}.get(problem, "")
    script.write_text("echo hi\n" if problem == "no shebang" else
                      f"#!/bin/sh\n{header}echo hi\n")
    script.chmod(0o644 if problem == "not executable" else 0o755)
    line = error_line(build(base, tmp_path, "--customize", scripts), code=2)   # the user's
    expected = {"not executable": "is not executable: chmod +x",
                "no kind": "name must be NN-name.chroot (runs in the image)",
                "no shebang": "has no #! line",
                "unknown setting": "30-x.chroot: `build-image: settings` names jupyter.prot, "
                                   "which is not a setting",
                "unknown directive": "30-x.chroot:2: unknown `build-image: depends`; known: "
                                     "settings, reads, code, keep"}[problem]
    assert expected in line
    assert not (tmp_path / "cache" / "work").exists()


def test_template_with_an_unknown_variable(base: BaseImage, tmp_path: Path) -> None:
    overlay = tmp_path / "ov"
    (overlay / "etc").mkdir(parents=True)
    (overlay / "etc/x.conf.j2").write_text("line one\n{{ config.jupyter.nope }}\n")
    line = error_line(build(base, tmp_path, "--overlay", overlay, "--dry-run"), code=2)
    assert f"overlay template {overlay}/etc/x.conf.j2:2:" in line and "nope" in line


def test_image_without_an_ext4_root(tmp_path: Path, checked: None) -> None:
    path = tmp_path / "fat.img"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(path)], input=b"label: dos\nstart=8192, type=c\n",
                   check=True)
    line = error_line(run_cli("--board", "orangepipc", "--base", path, "--cache-dir",
                              tmp_path / "cache", "--output", tmp_path / "out", *FAST))
    assert "has no ext4 partition with an operating system in it" in line


def test_not_root(base: BaseImage, tmp_path: Path) -> None:
    require_nobody_can_run()
    tmp_path.chmod(0o755)
    base.path.chmod(0o644)
    result = run_cli("--board", "orangepi5", "--base", base.path, "--cache-dir",
                     "/tmp/nobody-cache", "--output", "/tmp/nobody-out", user=65534)
    assert "building an image needs root" in error_line(result)


BINFMT = Path("/proc/sys/fs/binfmt_misc")


def binfmt_registration(name: str) -> str:
    """The registration string of a binfmt_misc entry as it is now, to put it back exactly
    (these tests change an entry of the whole machine for a few seconds)."""
    fields = dict(line.split(" ", 1) for line in
                  (BINFMT / name).read_text().splitlines()[1:] if " " in line)
    def hexed(text: str) -> str:
        return "".join(f"\\x{text[i:i + 2]}" for i in range(0, len(text), 2))
    return (f":{name}:M:{fields['offset'].strip()}:{hexed(fields['magic'].strip())}:"
            f"{hexed(fields.get('mask', '').strip())}:{fields['interpreter'].strip()}:"
            f"{fields.get('flags:', fields.get('flags', '')).strip()}")


@pytest.fixture
def binfmt_restored() -> Iterator[str]:
    original = binfmt_registration("qemu-aarch64")
    try:
        yield original
    finally:
        if (BINFMT / "qemu-aarch64").exists():
            (BINFMT / "qemu-aarch64").write_text("-1")
        (BINFMT / "register").write_text(original)


def test_binfmt_without_f_flag(base: BaseImage, tmp_path: Path, user_dirs: tuple[Path, Path],
                               checked: None, binfmt_restored: str) -> None:
    """Without the F flag the kernel looks for qemu inside the chroot: the static qemu goes
    into the image for the build, and must be gone from the result."""
    (BINFMT / "qemu-aarch64").write_text("-1")
    (BINFMT / "register").write_text(binfmt_restored.rsplit(":", 1)[0] + ":OP")
    assert "F" not in (BINFMT / "qemu-aarch64").read_text().split("flags:")[1].split()[0]
    result = build(base, tmp_path, "--customize", user_dirs[0])
    assert result.returncode == 0, result.stderr
    assert "lacks the F flag" in result.stderr and "copying qemu into the image" in result.stderr
    assert "[50-arch.chroot.sh] board=orangepi5" in result.stderr
    raw = raw_image(outputs(tmp_path)["img.zst"], tmp_path / "result.img")
    part = root_partition(raw, base.first_partition)
    listing = debugfs(part, "ls -l /usr/libexec").stdout
    assert "qemu-binfmt" not in listing


def test_binfmt_disabled(base: BaseImage, tmp_path: Path, checked: None,
                        binfmt_restored: str) -> None:
    entry = BINFMT / "qemu-aarch64"
    entry.write_text("0")
    result = build(base, tmp_path)
    line = error_line(result)
    assert "cannot run arm64 programs on this host" in line
    assert f"is disabled: echo 1 > {entry}" in line
    assert not (tmp_path / "cache" / "work").exists()


def test_too_little_space_for_the_build(base: BaseImage, tmp_path: Path, checked: None) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(cache)], check=True)
    try:
        line = error_line(build(base, tmp_path))
    finally:
        subprocess.run(["umount", str(cache)], check=True)
    assert "not enough space for the build" in line and "--cache-dir" in line


def wait_for(predicate, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def slow_script(tmp_path: Path) -> tuple[Path, Path]:
    scripts = tmp_path / "slow.d"
    scripts.mkdir()
    marker = tmp_path / "started"
    script = scripts / "40-slow.host"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nsleep 60\n")
    script.chmod(0o755)
    return scripts, marker


def test_sigint_during_a_script(base: BaseImage, tmp_path: Path, checked: None) -> None:
    scripts, marker = slow_script(tmp_path)
    proc = subprocess.Popen([*BUILD_IMAGE, "--board", "orangepi5", "--base", str(base.path),
                             "--cache-dir", str(tmp_path / "cache"), "--output",
                             str(tmp_path / "out"), "--customize", str(scripts), *FAST],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(marker.exists)
    assert leftover_resources(tmp_path), "the build holds a loop device and mounts by now"
    os.killpg(proc.pid, signal.SIGINT)   # Ctrl-C reaches the whole foreground group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT" in err and "Traceback" not in err
    assert not any((tmp_path / "out").glob("*")), "nothing that looks finished"


def test_sigterm_to_the_builder_only(base: BaseImage, tmp_path: Path, checked: None) -> None:
    """A CI runner cancelling the job signals the builder's pid, not its children: the
    builder must stop the script running in the image itself."""
    scripts = tmp_path / "slow.d"
    scripts.mkdir()
    script = scripts / "40-slow.chroot"
    script.write_text("#!/bin/sh\ntouch /tmp/started\nsleep 600\n")
    script.chmod(0o755)
    proc = subprocess.Popen([*BUILD_IMAGE, "--board", "orangepi5", "--base", str(base.path),
                             "--cache-dir", str(tmp_path / "cache"), "--output",
                             str(tmp_path / "out"), "--customize", str(scripts), *FAST],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def started() -> bool:
        return any(Path(tmp_path / "cache" / "work").glob("build-*/root/tmp/started"))

    wait_for(started)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    assert not any((tmp_path / "out").glob("*"))


@pytest.mark.parametrize("next_step", ["cleanup", "build"])
def test_sigkill_then_cleanup(base: BaseImage, tmp_path: Path, checked: None,
                              next_step: str) -> None:
    scripts, marker = slow_script(tmp_path)
    proc = subprocess.Popen([*BUILD_IMAGE, "--board", "orangepi5", "--base", str(base.path),
                             "--cache-dir", str(tmp_path / "cache"), "--output",
                             str(tmp_path / "out"), "--customize", str(scripts), *FAST],
                            cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(marker.exists)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    left = leftover_resources(tmp_path)
    assert left, "SIGKILL runs no cleanup: the loop device and mounts are still there"
    if next_step == "build":
        # The next build finds the record of the killed one and undoes it first.
        result = build(base, tmp_path)
        assert result.returncode == 0, result.stderr
        assert "cleaning up after build" in result.stderr
        assert leftover_resources(tmp_path) == []
        return
    result = run_cli("--cleanup")
    assert result.returncode == 0, result.stderr
    assert "cleaned up after 1 killed build" in result.stdout
    assert leftover_resources(tmp_path) == []
    assert not any((tmp_path / "out").glob("*"))
    assert not list((tmp_path / "cache" / "work").iterdir())
    assert run_cli("--cleanup").stdout.strip() == "nothing to clean up"
