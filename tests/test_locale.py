"""Host programs speak C to the builder whatever the caller's locale: the builder reads their
output ("No such device" from losetup), which a host set to German translates. Run here in
a real German locale (compiled with localedef; the translations come from util-linux-locales
and e2fsprogs-l10n, which ci/setup-host --dev installs)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from conftest import leftover_resources, make_base_image

from builder import image, mount
from builder.errors import BuildError
from builder.ledger import Ledger
from builder.run import run

GERMAN = "de_DE.UTF-8"


@pytest.fixture(scope="module")
def locales(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("locales")
    subprocess.run(["localedef", "-i", "de_DE", "-f", "UTF-8", str(where / GERMAN)],
                   check=True, capture_output=True)
    return where


@pytest.fixture
def german(locales: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The builder's own environment set to German, as a user's shell would have it."""
    env = {"LOCPATH": str(locales), "LANG": GERMAN, "LC_ALL": GERMAN, "LANGUAGE": "de"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def absent_loop_device() -> str:
    """A loop device name with no device behind it."""
    taken = {p.name for p in Path("/dev").glob("loop*")}
    return next(f"/dev/loop{n}" for n in range(200, 1000) if f"loop{n}" not in taken)


def test_the_host_speaks_german_to_a_program_started_plainly(german: dict[str, str]) -> None:
    """The control: without the builder's environment, losetup answers in German here."""
    proc = subprocess.run(["losetup", "--detach", absent_loop_device()], capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert "Gerät" in proc.stderr and "No such device" not in proc.stderr, proc.stderr


def test_a_program_the_builder_runs_answers_in_english(german: dict[str, str]) -> None:
    device = absent_loop_device()
    with pytest.raises(BuildError) as caught:
        run(["losetup", "--detach", device], capture=True, what=f"detach {device}")
    assert str(caught.value).endswith(f"losetup: {device}: failed to use device: "
                                      f"No such device")


@pytest.mark.root
def test_a_loop_device_already_gone_counts_as_detached(german: dict[str, str]) -> None:
    """Read in German, losetup's "No such device" was not recognised: ten retries, then a
    warning that the device is still in use and a ledger entry left behind."""
    started = time.monotonic()
    assert mount.detach_loop(absent_loop_device()) is True
    assert time.monotonic() - started < 2


@pytest.mark.root
@pytest.mark.slow
def test_growing_and_shrinking_an_image_in_a_german_session(
        german: dict[str, str], debian_rootfs: Path, tmp_path: Path) -> None:
    """The image steps that read e2fsprogs' and util-linux's output, on a real base image."""
    base = make_base_image(debian_rootfs, tmp_path)
    ledger = Ledger(tmp_path / "state")
    table = image.read_table(base.path)
    root = image.find_root(ledger, base.path, table)
    grown = image.grow(ledger, base.path, table, root, 64 << 20)
    assert grown.size == root.partition.size + (64 << 20)
    size = image.shrink(ledger, base.path, grown, 16 << 20)
    assert size == base.path.stat().st_size < grown.start + grown.size
    assert leftover_resources(tmp_path) == []
