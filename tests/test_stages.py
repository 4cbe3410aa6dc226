"""The step cache on real builds: a rebuild starts from the newest kept stage whose key
matches and runs only what follows; changing any input of a stage (a setting it reads, a
script's content, a file it reads from the work directory, an overlay laid in before it, the
base image) misses; a damaged, half-written or unwritable entry is never used; --no-cache,
the size limit and --cache-prune. The keys themselves are checked without a build."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    BUILD_IMAGE,
    ENGINE_ONLY,
    REPO,
    BaseImage,
    cli_env,
    debugfs,
    leftover_resources,
    make_base_image,
    root_partition,
    run_cli,
)

from builder import stages

FAST = ENGINE_ONLY

# Four scripts around the overlays: 10 keeps a stage and reads jupyter.port; 20 (host) hands
# a file over in the work directory; 30 reads it and jupyter.user, and keeps a stage; 60, after
# the overlays, copies an overlay file and keeps a stage. Each says when it runs.
SCRIPTS = {
    "10-first.chroot": """#!/bin/sh
# build-image: settings jupyter.port
# build-image: reads
# build-image: keep
set -e
echo "first ran with port $IMAGE_CONFIG_JUPYTER_PORT"
test -z "${IMAGE_CONFIG_JUPYTER_USER:-}"      # given only what it declared
echo "$IMAGE_CONFIG_JUPYTER_PORT" > /etc/first
""",
    "20-hand.host": """#!/bin/sh
# build-image: settings
# build-image: reads
# build-image: code errors.py
set -e
echo "hand ran"
echo "handed over" > "$IMAGE_OUTPUT/../handoff.txt"
""",
    "30-second.chroot": """#!/bin/sh
# build-image: settings jupyter.user
# build-image: reads handoff.txt
# build-image: keep
set -e
echo "second ran"
cat /tmp/build-image/handoff.txt > /etc/second
echo "$IMAGE_CONFIG_JUPYTER_USER" >> /etc/second
echo "second" > "$IMAGE_OUTPUT/second.txt"
""",
    "60-late.chroot": """#!/bin/sh
# build-image: settings
# build-image: reads
# build-image: keep
set -e
echo "late ran"
cp /etc/overlay-file /etc/late
""",
}
NAMES = tuple(SCRIPTS)


class Builds:
    """Builds sharing one cache, each with its own output directory."""

    def __init__(self, tmp: Path, base: BaseImage) -> None:
        self.tmp, self.base, self.count = tmp, base, 0
        self.cache = tmp / "cache"
        self.scripts = tmp / "scripts"
        self.overlay = tmp / "overlay"
        self.scripts.mkdir()
        for name, text in SCRIPTS.items():
            self.write_script(name, text)
        (self.overlay / "etc").mkdir(parents=True)
        (self.overlay / "etc/overlay-file").write_text("overlay 1\n")

    def write_script(self, name: str, text: str) -> None:
        path = self.scripts / name
        path.write_text(text)
        path.chmod(0o755)

    def argv(self, *extra: str | os.PathLike[str], base: Path | None = None) -> list[str]:
        self.count += 1
        self.out = self.tmp / f"out{self.count}"
        return ["--board", "orangepi5", "--base", str(base or self.base.path), "--cache-dir",
                str(self.cache), "--output", str(self.out), *FAST, "--customize",
                str(self.scripts), "--overlay", str(self.overlay), *map(str, extra)]

    def build(self, *extra: str | os.PathLike[str],
              base: Path | None = None) -> subprocess.CompletedProcess[str]:
        result = run_cli(*self.argv(*extra, base=base), timeout=900)
        assert result.returncode == 0, result.stderr
        return result

    def manifest(self) -> dict:   # type: ignore[type-arg]
        return json.loads(next(self.out.glob("*.manifest.json")).read_text())

    def files(self) -> dict[str, str]:
        raw = self.tmp / f"result{self.count}.img"
        image = next(self.out.glob("*.img.zst"))
        subprocess.run(["zstd", "-q", "-d", str(image), "-o", str(raw)], check=True)
        part = root_partition(raw, self.base.first_partition)
        found = {path: debugfs(part, f"cat {path}").stdout
                 for path in ("/etc/first", "/etc/second", "/etc/late")}
        found["second.txt"] = next(self.out.glob("*.second.txt")).read_text()
        raw.unlink()
        part.unlink()
        return found


def ran(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [name for name in NAMES if f"running customize.d/{name} " in result.stderr]


@pytest.fixture
def builds(debian_rootfs: Path, tmp_path: Path) -> Iterator[Builds]:
    yield Builds(tmp_path, make_base_image(debian_rootfs, tmp_path))
    assert leftover_resources(tmp_path) == []


EXPECTED = {"/etc/first": "8888\n", "/etc/second": "handed over\njupyter\n",
            "/etc/late": "overlay 1\n", "second.txt": "second\n"}


@pytest.mark.root
@pytest.mark.slow
def test_rebuilds_run_only_what_changed(builds: Builds) -> None:
    first = builds.build()
    assert ran(first) == list(NAMES)
    # The dry run foresees where the next build starts: the lookup a build makes before its
    # first script (30 reads what 20 hands over, so the look ahead stops before it).
    built = builds.out
    plan = run_cli(*builds.argv("--dry-run"))
    assert plan.returncode == 0, plan.stderr
    assert "10-first.chroot  (from the step cache; kept in the step cache)" in plan.stdout
    assert "step cache: the build starts after 10-first.chroot" in plan.stdout
    assert "60-late.chroot  (kept in the step cache)" in plan.stdout
    assert not builds.out.exists()          # a dry run writes nothing
    builds.out = built                      # the first build's outputs, read below
    kept = [stage for stage in builds.manifest()["stages"] if not stage["from_cache"]]
    assert [stage["after"] for stage in kept] == ["10-first.chroot", "30-second.chroot",
                                                  "60-late.chroot"]
    assert builds.files() == EXPECTED
    entries = sorted(p.name for p in (builds.cache / "stages").iterdir())
    assert entries == sorted(stage["key"] for stage in kept)

    # Nothing changed: the host script runs (30's key needs what it hands over), the rest
    # comes from the cache, and the image is the same.
    again = builds.build()
    assert ran(again) == ["20-hand.host"]
    assert "step cache: the image after 60-late.chroot" in again.stderr
    assert [s["from_cache"] for s in builds.manifest()["stages"]] == [True, True]
    assert builds.manifest()["stages"][-1]["key"] == kept[-1]["key"]
    assert builds.files() == EXPECTED

    # A setting no script declares: still every stage from the cache.
    assert ran(builds.build("--set", "jupyter.base_url=/lab/")) == ["20-hand.host"]
    # A setting 30 reads: 10 from the cache, 30 and what follows again.
    assert ran(builds.build("--set", "jupyter.user=scientist")) == list(NAMES[1:])
    assert builds.files()["/etc/second"] == "handed over\nscientist\n"
    # A setting 10 reads: everything again.
    assert ran(builds.build("--set", "jupyter.port=9999")) == list(NAMES)
    # The overlay laid in before 60: only 60 again.
    (builds.overlay / "etc/overlay-file").write_text("overlay 2\n")
    assert ran(builds.build()) == ["20-hand.host", "60-late.chroot"]
    assert builds.files()["/etc/late"] == "overlay 2\n"
    # A file the host script hands to 30 through the work directory.
    builds.write_script("20-hand.host", SCRIPTS["20-hand.host"].replace(
        "handed over", "handed over anew"))
    assert ran(builds.build()) == list(NAMES[1:])
    assert builds.files()["/etc/second"] == "handed over anew\njupyter\n"
    # A script's content, even a comment: it and everything after it.
    builds.write_script("10-first.chroot", SCRIPTS["10-first.chroot"] + "# changed\n")
    assert ran(builds.build()) == list(NAMES)
    # --no-cache runs everything and keeps fresh entries.
    result = builds.build("--no-cache")
    assert ran(result) == list(NAMES)
    assert [s["from_cache"] for s in builds.manifest()["stages"]] == [False] * 3
    assert ran(builds.build()) == ["20-hand.host"]


@pytest.mark.root
@pytest.mark.slow
def test_another_base_image_misses(builds: Builds, debian_rootfs: Path) -> None:
    assert ran(builds.build()) == list(NAMES)
    other = builds.tmp / "other"
    other.mkdir()
    base = make_base_image(debian_rootfs, other, size_mib=640)
    assert ran(builds.build(base=base.path)) == list(NAMES)
    assert ran(builds.build()) == ["20-hand.host"]


def entry_of(builds: Builds, script: str) -> Path:
    stage = next(s for s in builds.manifest()["stages"] if s["after"] == script)
    return builds.cache / "stages" / stage["key"]


@pytest.mark.root
@pytest.mark.slow
def test_damaged_entry_is_dropped_and_redone(builds: Builds) -> None:
    builds.build()
    entry = entry_of(builds, "60-late.chroot")      # the one a rebuild restores
    image = entry / "image.img"
    # One byte of the root filesystem's data, where the image holds something.
    with open(image, "r+b") as f:
        offset = os.lseek(f.fileno(), builds.base.first_partition + (64 << 20), os.SEEK_DATA)
        old = os.pread(f.fileno(), 1, offset)
        os.pwrite(f.fileno(), bytes([old[0] ^ 0xFF]), offset)
    result = builds.build()
    assert result.stderr.count("is damaged") == 1
    # The stage before it is restored instead, and 60 runs again.
    assert "the image after 30-second.chroot" in result.stderr
    assert ran(result) == ["20-hand.host", "60-late.chroot"]
    assert builds.files() == EXPECTED
    # Redone and kept again: the next build takes it.
    assert ran(builds.build()) == ["20-hand.host"]


@pytest.mark.root
@pytest.mark.slow
def test_killed_while_keeping_a_stage(builds: Builds) -> None:
    """SIGKILL while an entry is being written: no half entry is ever used, and the next
    build removes what is left."""
    argv = [*BUILD_IMAGE, *builds.argv()]
    proc = subprocess.Popen(argv, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    stages_dir = builds.cache / "stages"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if stages_dir.exists() and any(p.name.endswith(".tmp") for p in stages_dir.iterdir()):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the build ended before an entry was written"
    assert any(p.name.endswith(".tmp") for p in stages_dir.iterdir())
    subprocess.run([*BUILD_IMAGE, "--cleanup"], cwd=REPO, env=cli_env(), check=True,
                   capture_output=True)
    result = builds.build()
    assert "a step-cache entry left by a killed build" in result.stderr
    assert ran(result) == list(NAMES)
    assert not [p for p in stages_dir.iterdir() if p.name.startswith(".")]
    assert builds.files() == EXPECTED


@pytest.mark.root
@pytest.mark.slow
def test_full_disk_while_keeping_a_stage(builds: Builds) -> None:
    stages_dir = builds.cache / "stages"
    stages_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(stages_dir)],
                   check=True)
    try:
        result = builds.build()
        assert result.stderr.count("could not keep the stage after") == 3
        assert "goes on without it" in result.stderr
        assert os.listdir(stages_dir) == []
        assert builds.files() == EXPECTED
    finally:
        subprocess.run(["umount", str(stages_dir)], check=True)


@pytest.mark.root
@pytest.mark.slow
def test_size_limit_and_prune(builds: Builds) -> None:
    builds.build()
    sizes = [size for _, size, _ in stages.StageCache(
        builds.cache / "stages", builds.cache / "locks", 1 << 40, 7).entries()]
    assert len(sizes) == 3
    # Room for one entry: the older ones go as each new one is kept.
    limit = max(sizes) + (1 << 20)
    result = builds.build("--no-cache", "--set", f"cache.stages_size={limit}")
    assert "removing the least recently used entry" in result.stderr
    remaining = list((builds.cache / "stages").iterdir())
    assert len(remaining) == 1
    assert remaining[0].name == builds.manifest()["stages"][-1]["key"]
    pruned = run_cli("--cache-dir", builds.cache, "--cache-prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "freed" in pruned.stdout
    assert list((builds.cache / "stages").iterdir()) == []


def test_keys_follow_every_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = {"cpu": "auto", "quick_apt": True}
    args = ("a" * 64, {"id": "orangepi5"}, "trixie", 1 << 30, fast)
    base = stages.key_of_base(*args)
    for position, other in ((0, "b" * 64), (1, {"id": "orangepi5b"}), (2, "noble"),
                            (3, 2 << 30), (4, {"cpu": "qemu", "quick_apt": True}),
                            (4, {"cpu": "auto", "quick_apt": False})):
        changed = list(args)
        changed[position] = other
        assert stages.key_of_base(*changed) != base, position
    args = (base, "20-x.chroot", b"#!/bin/sh\n", {"packages": {"apt": ["a"]}}, "in", None)
    key = stages.key_of_script(*args)
    for position, other in ((0, "c" * 64), (1, "21-x.chroot"), (2, b"#!/bin/sh\n#\n"),
                            (3, {"packages": {"apt": ["a", "b"]}}), (4, "in2"), (5, "code")):
        changed = list(args)
        changed[position] = other
        assert stages.key_of_script(*changed) != key, position
    # The builder's own code a host script runs.
    code = tmp_path / "builder"
    code.mkdir()
    (code / "wheels.py").write_text("x = 1\n")
    monkeypatch.setattr(stages, "BUILDER_DIR", code)
    before = stages.code_digest(["wheels.py"])
    (code / "wheels.py").write_text("x = 2\n")
    assert stages.code_digest(["wheels.py"]) != before
    # Work files: content, mode, a new file among the declared names, a link's target.
    work = tmp_path / "work"
    work.mkdir()
    (work / "lock.txt").write_text("a==1\n")
    digests = {stages.tree_digest(work, ["lock.txt", "wheels"])}
    (work / "lock.txt").write_text("a==2\n")
    digests.add(stages.tree_digest(work, ["lock.txt", "wheels"]))
    (work / "lock.txt").chmod(0o600)
    digests.add(stages.tree_digest(work, ["lock.txt", "wheels"]))
    (work / "wheels").mkdir()
    (work / "wheels/a.whl").symlink_to("/cache/a-1.whl")
    digests.add(stages.tree_digest(work, ["lock.txt", "wheels"]))
    (work / "wheels/a.whl").unlink()
    (work / "wheels/a.whl").symlink_to("/cache/a-2.whl")
    digests.add(stages.tree_digest(work, ["lock.txt", "wheels"]))
    assert len(digests) == 5
    # Undeclared files of the work directory do not count.
    (work / "other.txt").write_text("x")
    assert stages.tree_digest(work, ["lock.txt", "wheels"]) in digests


def test_a_code_directory_stands_for_every_module_in_it(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`code firstboot/`: a host script that runs a subpackage depends on all of it."""
    code = tmp_path / "builder"
    (code / "firstboot").mkdir(parents=True)
    (code / "files.py").write_text("x = 1\n")
    (code / "firstboot/__init__.py").write_text('"""The map."""\n')
    (code / "firstboot/wizard.py").write_text("x = 1\n")
    monkeypatch.setattr(stages, "BUILDER_DIR", code)
    names = ["files.py", "firstboot/"]
    digests = [stages.code_digest(names)]
    (code / "firstboot/wizard.py").write_text("x = 2\n")
    digests.append(stages.code_digest(names))
    (code / "firstboot/session.py").write_text("")
    digests.append(stages.code_digest(names))
    (code / "firstboot/wizard.py").rename(code / "firstboot/console.py")
    digests.append(stages.code_digest(names))
    assert len(set(digests)) == 4, "a changed, a new and a renamed module each change the key"
    (code / "firstboot/__pycache__").mkdir()
    (code / "firstboot/__pycache__/console.cpython-311.pyc").write_bytes(b"\0")
    (code / "firstboot/notes.txt").write_text("not a source")
    assert stages.code_digest(names) == digests[-1], "only the Python sources count"
    # A module named alone keeps the key it had before directories could be named: the
    # stages kept by earlier builds stay usable.
    assert stages.code_digest(["files.py"]) == stages.digest_of(
        {"files.py": hashlib.sha256(b"x = 1\n").hexdigest()})


def test_code_lines_name_the_builders_files(tmp_path: Path) -> None:
    """Checked when the scripts are found, before anything runs: a name that is not one of
    the builder's files (or, ending in /, its directories) would fail only at the key."""
    from builder.customize import find_scripts
    from builder.errors import BuildError
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    script = scripts / "50-run.host"
    for names, problem in (("firstboot/ files.py", None), ("firstbot/", "not a directory"),
                           ("firstboot", "not a file"), ("../pyproject.toml", "not a file"),
                           ("/etc/passwd", "not a file"), ("files.py/", "not a directory")):
        script.write_text(f"#!/bin/sh\n# build-image: code {names}\n")
        script.chmod(0o755)
        if problem is None:
            assert find_scripts([scripts])[0].code == tuple(names.split())
            continue
        with pytest.raises(BuildError, match=f"code` names {names.split()[0]}, which is "
                                             f"{problem} of the builder"):
            find_scripts([scripts])


def test_copy_keeps_holes_and_the_digest(tmp_path: Path) -> None:
    source = tmp_path / "a.img"
    with open(source, "wb") as f:
        f.truncate(64 << 20)
        f.seek(3 << 20)
        f.write(b"x" * 5000)
        f.seek(40 << 20)
        f.write(bytes(2 << 20))          # written zeros: the copy may keep a hole there
        f.write(b"end")
    copy = tmp_path / "b.img"
    digest = stages.copy_image(source, copy)
    assert copy.read_bytes() == source.read_bytes()
    assert copy.stat().st_blocks * 512 <= 3 << 20
    assert stages.copy_image(copy, tmp_path / "c.img") == digest
    with open(copy, "r+b") as f:
        f.seek(40 << 20)
        f.write(b"y")
    assert stages.copy_image(copy, tmp_path / "d.img") != digest
