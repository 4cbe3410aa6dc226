"""Choosing wheels for the image's Python on the host (builder/wheels.py), with the real pip
against a local wheel directory: Debian's compiled packages are held, the target's tags rule,
a package without a wheel is a one-line error that says what to do."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import error_line, run_cli

from builder import wheels
from builder.errors import BuildError


def make_wheel(directory: Path, name: str, version: str, tag: str = "py3-none-any",
               requires: tuple[str, ...] = ()) -> Path:
    """A real, installable wheel of one module."""
    stem = name.replace("-", "_")
    info = f"{stem}-{version}.dist-info"
    files = {
        f"{stem}.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{info}/WHEEL": f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{p},,\n" for p in [*files, f"{info}/RECORD"])
    path = directory / f"{stem}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


FASTLIB = {"fastlib": wheels.Provided("1.5.0", compiled=True)}
ARMHF = wheels.Target("3.13", "armv7l", (2, 41), FASTLIB)


@pytest.fixture
def index(tmp_path: Path) -> Path:
    """An index of wheels such as PyPI has: an app needing a compiled library that has no
    armv7l wheel (only aarch64), in two versions."""
    index = tmp_path / "index"
    index.mkdir()
    make_wheel(index, "app", "2.0", requires=("fastlib>=1.0", "helper"))
    make_wheel(index, "helper", "0.3")
    for version in ("1.5.0", "2.0.0"):
        make_wheel(index, "fastlib", version, tag="cp313-cp313-manylinux_2_17_aarch64")
    return index


def test_platform_tags_cover_every_older_glibc() -> None:
    tags = wheels.platform_tags("aarch64", (2, 36))
    assert tags[0] == "manylinux_2_36_aarch64" and tags[-2] == "manylinux_2_17_aarch64"
    assert tags[-1] == "manylinux2014_aarch64" and len(tags) == 21


def test_debians_compiled_package_is_held_and_not_downloaded(index: Path,
                                                              tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    locked = wheels.resolve(["app"], ARMHF, index, offline=True, scratch=scratch)
    assert [(item.name, item.version) for item in locked] == [("app", "2.0"), ("helper", "0.3")]
    assert all(item.filename.endswith("py3-none-any.whl") for item in locked)
    # pip chose Debian's version, through the placeholder: a build tag no real wheel has,
    # and the target's most specific tag.
    report = json.loads((scratch / "compiled/report.json").read_text())
    chosen = {item["metadata"]["name"]: item["download_info"]["url"]
              for item in report["install"]}
    assert chosen["fastlib"].endswith(
        "/fastlib-1.5.0-0debian-cp313-cp313-manylinux_2_41_armv7l.whl")
    assert (scratch / "compiled/constraints.txt").read_text() == "fastlib==1.5.0\n"


def test_pure_debian_packages_are_held_unless_something_needs_newer(index: Path,
                                                                    tmp_path: Path) -> None:
    old_helper = {**FASTLIB, "helper": wheels.Provided("0.3", compiled=False)}
    target = wheels.Target("3.13", "armv7l", (2, 41), old_helper)
    locked = wheels.resolve(["app"], target, index, offline=True, scratch=tmp_path / "a")
    assert [item.name for item in locked] == ["app"], "Debian's helper is used"
    make_wheel(index, "app", "3.0", requires=("fastlib>=1.0", "helper>=0.4"))
    make_wheel(index, "helper", "0.4")
    locked = wheels.resolve(["app"], target, index, offline=True, scratch=tmp_path / "b")
    # Holding Debian's helper would have meant app 2.0: the newest app wins, with its own
    # helper in the venv.
    assert [(item.name, item.version) for item in locked] == [("app", "3.0"), ("helper", "0.4")]
    assert (tmp_path / "b/compiled/constraints.txt").read_text() == "fastlib==1.5.0\n"


def test_asking_for_a_package_debian_has_at_its_newest_keeps_holding(index: Path,
                                                                     tmp_path: Path) -> None:
    current = {**FASTLIB, "helper": wheels.Provided("0.3", compiled=False)}
    target = wheels.Target("3.13", "armv7l", (2, 41), current)
    locked = wheels.resolve(["app", "helper"], target, index, offline=True,
                            scratch=tmp_path / "s")
    assert [item.name for item in locked] == ["app"], "Debian's helper 0.3 is the newest"


def test_target_markers_decide_dependencies(index: Path, tmp_path: Path) -> None:
    """A dependency for the board's CPU and Python is chosen, not one for the host's."""
    make_wheel(index, "armonly", "1.0")
    make_wheel(index, "x86only", "1.0")
    make_wheel(index, "tool", "1.0", requires=('armonly; platform_machine == "armv7l"',
                                                'x86only; platform_machine == "x86_64"'))
    markers = {"implementation_name": "cpython", "implementation_version": "3.13.5",
               "os_name": "posix", "platform_machine": "armv7l", "platform_release": "",
               "platform_system": "Linux", "platform_version": "",
               "python_full_version": "3.13.5", "platform_python_implementation": "CPython",
               "python_version": "3.13", "sys_platform": "linux"}
    target = wheels.Target("3.13", "armv7l", (2, 41), {}, markers)
    locked = wheels.resolve(["tool"], target, index, offline=True, scratch=tmp_path / "s")
    assert [item.name for item in locked] == ["armonly", "tool"]


ARMHF_MARKERS = {"implementation_name": "cpython", "os_name": "posix",
                 "platform_machine": "armv7l", "python_version": "3.13",
                 "python_full_version": "3.13.5", "sys_platform": "linux"}


@pytest.fixture(scope="session")
def pips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real pip releases, as wheels run straight from PYTHONPATH: the one Debian 12 ships and
    the oldest that chooses for another platform without --target."""
    where = tmp_path_factory.mktemp("pips")
    for version in ("23.0.1", "23.3.2"):
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--disable-pip-version-check", "--dest", str(where),
                        f"pip=={version}"], check=True, capture_output=True)
    return {path.name.split("-")[1]: path for path in where.glob("pip-*.whl")}


@pytest.mark.slow
def test_a_pip_too_old_to_choose_for_the_board_is_named_with_the_fix(
        index: Path, tmp_path: Path, pips: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(pips["23.0.1"]))
    target = wheels.Target("3.13", "armv7l", (2, 41), {}, ARMHF_MARKERS)
    with pytest.raises(BuildError) as caught:
        wheels.resolve(["helper"], target, index, offline=True, scratch=tmp_path / "s")
    assert str(caught.value) == (
        f"choosing wheels for the board needs pip 23.3 or newer, and {sys.executable} has "
        f"pip 23.0.1: run '{sys.executable} -m pip install --upgrade pip'")


@pytest.mark.slow
def test_the_oldest_pip_allowed_chooses_by_the_boards_markers(
        index: Path, tmp_path: Path, pips: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The minimum is a measured one: pip 23.3 takes the target's options and markers."""
    monkeypatch.setenv("PYTHONPATH", str(pips["23.3.2"]))
    make_wheel(index, "armonly", "1.0")
    make_wheel(index, "x86only", "1.0")
    make_wheel(index, "tool", "1.0", requires=('armonly; platform_machine == "armv7l"',
                                                'x86only; platform_machine == "x86_64"'))
    target = wheels.Target("3.13", "armv7l", (2, 41), {}, ARMHF_MARKERS)
    locked = wheels.resolve(["tool"], target, index, offline=True, scratch=tmp_path / "s")
    assert [item.name for item in locked] == ["armonly", "tool"]


def test_arm64_also_holds_debians_version(index: Path, tmp_path: Path) -> None:
    """Even where a wheel exists, the venv uses Debian's copy of a compiled package: one
    copy, the one Debian's other packages were built against."""
    target = wheels.Target("3.13", "aarch64", (2, 41), FASTLIB)
    locked = wheels.resolve(["app"], target, index, offline=True, scratch=tmp_path / "s")
    assert "fastlib" not in {item.name for item in locked}


def test_a_dependency_without_a_wheel_names_it_and_the_fix(index: Path,
                                                            tmp_path: Path) -> None:
    target = wheels.Target("3.13", "armv7l", (2, 41), {})     # Debian does not provide it
    with pytest.raises(BuildError) as caught:
        wheels.resolve(["app"], target, index, offline=True, scratch=tmp_path / "s")
    assert str(caught.value).startswith("--offline: no wheel of fastlib>=1.0 for Python 3.13 "
                                        "on armv7l (glibc 2.41), needed by app in the cache")
    stderr = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index",
         "--find-links", str(index), *target.pip_options(), "app"],
        capture_output=True, text=True).stderr
    message = wheels.explain_failure(stderr, target, None)
    assert message.startswith("packages.pip: no wheel of fastlib>=1.0 for Python 3.13 on "
                              "armv7l (glibc 2.41), needed by app")
    assert "python3-fastlib" in message and "packages.apt" in message
    assert "\n" not in message


def test_offline_download_needs_the_wheels_in_the_cache(index: Path, tmp_path: Path) -> None:
    locked = wheels.resolve(["app"], ARMHF, index, offline=True, scratch=tmp_path / "s")
    wheels.download(locked, ARMHF, index, offline=True)      # all there: nothing to fetch
    (index / locked[0].filename).unlink()
    with pytest.raises(BuildError, match=r"--offline: wheels not in the cache .*app-2.0"):
        wheels.download(locked, ARMHF, index, offline=True)


def test_a_changed_wheel_in_the_cache_is_refused(index: Path, tmp_path: Path) -> None:
    item = wheels.Locked("app", "2.0", "app-2.0-py3-none-any.whl", "file:///x", "0" * 64)
    with pytest.raises(BuildError, match="does not match the index's sha256: removed it"):
        wheels.download([item], ARMHF, index, offline=True)
    assert not (index / item.filename).exists()


def test_wheelhouse_lock_installs_with_require_hashes(index: Path, tmp_path: Path) -> None:
    """The lock the chroot installs from is one pip accepts in --require-hashes mode."""
    work = tmp_path / "work"
    work.mkdir()
    locked = wheels.resolve(["app"], ARMHF, index, offline=True, scratch=tmp_path / "s")
    wheels.write_wheelhouse(locked, index, work, ARMHF)
    lock = (work / "requirements.txt").read_text()
    assert "fastlib" not in lock
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
                    "--no-deps", "--require-hashes", "--find-links", str(work / "wheels"),
                    "--target", str(target), "-r", str(work / "requirements.txt")],
                   check=True)
    assert (target / "app.py").exists() and (target / "helper.py").exists()
    assert not (target / "fastlib.py").exists()


def test_main_reads_the_image_description(index: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.json").write_text(json.dumps({"config": {
        "packages": {"pip": ["app"]}, "venv": {"system_site_packages": True}}}))
    (work / "python.json").write_text(json.dumps({
        "python": "3.13", "machine": "armv7l", "glibc": "2.41",
        "provided": {"fastlib": {"version": "1.5.0", "compiled": True},
                     "helper": {"version": "0.1+dfsg", "compiled": False}}}))
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    for wheel in index.iterdir():
        (cache / "wheels" / wheel.name).write_bytes(wheel.read_bytes())
    wheels.main({"IMAGE_CONFIG": str(work / "config.json"), "IMAGE_CACHE": str(cache),
                 "IMAGE_OUTPUT": str(work / "output"), "IMAGE_OFFLINE": "1"})
    # Debian's helper 0.1+dfsg is held (a local version): only app comes from the wheels.
    assert sorted(p.name for p in (work / "wheels").iterdir()) == ["app-2.0-py3-none-any.whl"]


@pytest.mark.root
def test_requested_package_without_a_wheel_stops_before_any_download(tmp_path: Path) -> None:
    """Checked at preflight, for the release's Python, with the network's index: numpy has
    no armv7l wheel on PyPI, so an armhf board cannot take it from pip."""
    cache = tmp_path / "cache"
    result = run_cli("--board", "orangepipcplus", "--base", "debian", "--cache-dir", cache,
                     "--set", "packages.pip=[jupyterlab, numpy==2.2.4]", "--output",
                     tmp_path / "out")
    line = error_line(result)
    assert line.startswith("build-image: error: packages.pip: no wheel of numpy==2.2.4 for "
                           "Python 3.13 on armv7l"), line
    assert not (tmp_path / "out").exists() and not list(cache.glob("images/*"))
