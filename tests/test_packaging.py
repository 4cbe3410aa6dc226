"""The project as a user installs it: a wheel built from the source, installed with Debian's
own Python and pip into a fresh venv outside the checkout, builds an image and plans the
appliance, with the scripts and overlays the wheel carries."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import (
    BUILD_CACHE,
    REPO,
    debugfs,
    engine_capable,
    error_line,
    leftover_resources,
    root_partition,
)

pytestmark = pytest.mark.slow

BOARD = "orangepipcplus"    # its Debian base is cached by test_debian.py and the appliance's
# What a checkout has and a source tree handed to the build does not need.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "build", "dist",
                                    "*.egg-info", ".mypy_cache", ".ruff_cache", ".pytest_cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built the way `pip install .` builds one (isolated, from a copy of the tree,
    so nothing is written into the checkout)."""
    where = tmp_path_factory.mktemp("wheel")
    source = where / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "--wheel-dir", str(where / "dist"),
                    str(source)], check=True, capture_output=True, timeout=600)
    (built,) = (where / "dist").glob("orangepi_jupyter-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian's python3 -m venv (which brings Debian 12's pip 23.0), then the wheel."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([venv / "bin/pip", "install", "--quiet", "--disable-pip-version-check",
                    str(wheel)], check=True, capture_output=True, timeout=900)
    return venv


def files_under(top: Path) -> dict[str, int]:
    return {str(path.relative_to(top)): stat.S_IMODE(path.stat().st_mode) & 0o111
            for path in top.rglob("*") if path.is_file()}


def test_the_wheel_carries_every_script_and_overlay_with_its_mode(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        carried = {info.filename: (info.external_attr >> 16) & 0o111
                   for info in archive.infolist()}
    for top in ("customize.d", "overlays"):
        expected = files_under(REPO / top)
        assert expected, top
        found = {name.removeprefix(f"builder/{top}/"): mode for name, mode in carried.items()
                 if name.startswith(f"builder/{top}/")}
        assert found == expected, top
    assert "builder/boards.yaml" in carried and "builder/defaults.yaml" in carried
    assert "builder/keys/armbian-2025.asc" in carried, "Armbian's key, trusted by default"
    # Host scripts reach image paths through it: it must stay executable.
    assert carried.get("builder/hostbin/image-path") == 0o111
    # What the setup partition holds, rendered at every build.
    assert {"builder/setup-partition/jupyter-firstboot.conf.j2",
            "builder/setup-partition/README.txt.j2"} <= set(carried)


def test_the_installed_tools_come_from_the_venv(venv: Path, tmp_path: Path) -> None:
    found = subprocess.run(
        [venv / "bin/python", "-c",
         "import builder, pip; print(builder.__file__, pip.__version__)"],
        capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split()
    assert Path(found[0]).is_relative_to(venv), "the checkout's builder was imported"
    assert tuple(int(n) for n in found[1].split(".")[:2]) >= (23, 3), \
        "the wheel's dependency on pip 23.3 upgraded Debian 12's pip"
    for tool in ("build-image", "try-image", "flash-image"):
        assert subprocess.run([venv / "bin" / tool, "--help"], capture_output=True,
                              cwd=tmp_path).returncode == 0, tool


def test_the_installed_tool_plans_the_appliance(venv: Path, tmp_path: Path) -> None:
    plan = subprocess.run([venv / "bin/build-image", "--board", BOARD, "--base", "debian",
                           "--dry-run", "--cache-dir", tmp_path / "cache"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert "customize-image" in plan.stdout
    # The plan's check found the scripts and rendered every template from the install.
    assert "does not exist" not in plan.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.img"))


@pytest.mark.root
def test_the_installed_tool_builds_an_image(venv: Path, tmp_path: Path) -> None:
    """A real build from the install, outside the checkout: --base debian, a script of the
    user's and an overlay, the wheel's own first-boot code not needed."""
    reason = engine_capable()
    if reason:
        pytest.skip(reason)
    scripts, overlay = tmp_path / "mine.d", tmp_path / "overlay"
    scripts.mkdir()
    script = scripts / "50-mark.chroot"
    script.write_text("#!/bin/sh\nset -e\necho \"built for $IMAGE_BOARD\" > /etc/mark\n")
    script.chmod(0o755)
    # image-path from the wheel: the path of a file in the image, found by a host script.
    host = scripts / "60-host.host"
    host.write_text("#!/bin/sh\nset -e\necho from-host > \"$(image-path /etc/host-mark)\"\n")
    host.chmod(0o755)
    (overlay / "etc").mkdir(parents=True)
    (overlay / "etc/from-overlay").write_text("laid in\n")
    result = subprocess.run(
        [venv / "bin/build-image", "--board", BOARD, "--base", "debian", "--cache-dir",
         BUILD_CACHE, "--output", tmp_path / "out", "--compress", "none", "--customize",
         scripts, "--overlay", overlay, "--set", "customize.builtin=false", "--set",
         "image.headroom=256MiB", "--set", "cache.stages_size=0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=3000)
    assert result.returncode == 0, error_line(result) + result.stderr[-3000:]
    (image,) = (tmp_path / "out").glob("*.img")
    root = root_partition(image, 4 << 20)
    assert debugfs(root, "cat /etc/mark").stdout == f"built for {BOARD}\n"
    assert debugfs(root, "cat /etc/from-overlay").stdout == "laid in\n"
    assert debugfs(root, "cat /etc/host-mark").stdout == "from-host\n"
    assert leftover_resources(tmp_path) == []
