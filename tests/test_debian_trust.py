"""--base debian fetches Debian over plain http and trusts the mirror only as far as Debian's
archive key vouches for it: debootstrap must check the Release file's signature, and a
Release file the key did not sign (altered, signed by another key, unsigned) stops the build
at once, with one line that says so, and leaves nothing behind.

The mirrors here serve on 127.0.0.1 only the release's InRelease / Release / Release.gpg,
made from Debian's real InRelease (fetched once, about 150 KB): debootstrap fetches them
first, so a refusal comes within seconds."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DEBIAN_MIRROR,
    Gpg,
    engine_capable,
    error_line,
    leftover_resources,
    leftovers,
    run_cli,
)
from mirror import Mirror

from builder import debian
from builder.boards import Board, load_catalog
from builder.cache import Cache
from builder.chroot import Emulation
from builder.errors import BuildError
from builder.ledger import Ledger

RELEASE = "trixie"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
REFUSED = f"build-image: error: the Release file of {RELEASE} on "
NOT_DEBIANS = "is not signed by Debian's archive key"


def board(board_id: str) -> Board:
    return load_catalog().lookup(board_id)[0]


# -- the command line, and the checks before it ----------------------------------------------

def test_debootstrap_must_check_the_release_signature(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def recorded(argv: Sequence[str], **_: Any) -> None:
        calls.append(list(argv))

    monkeypatch.setattr(debian, "stream", recorded)
    rootfs, mirror = tmp_path / "rootfs", "http://deb.debian.org/debian"
    debian._bootstrap(board("orangepipcplus"), RELEASE, mirror, rootfs,
                      Emulation(None, "qemu's default CPU"))
    (argv,) = calls
    assert argv[0] == "debootstrap"
    # The keys named, not left to debootstrap's script for the release; and checking them a
    # must, not a warning ("Cannot check Release signature") when the keyring is missing.
    assert f"--keyring={KEYRING}" in argv and "--force-check-gpg" in argv
    assert "--no-check-gpg" not in argv
    assert argv[-3:] == [RELEASE, str(rootfs), mirror]


def test_without_the_keyring_nothing_starts(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    def never(*_: Any, **__: Any) -> None:
        raise AssertionError("debootstrap ran without Debian's keyring")

    monkeypatch.setattr(debian, "KEYRING", tmp_path / "debian-archive-keyring.gpg")
    monkeypatch.setattr(debian, "stream", never)
    with pytest.raises(BuildError) as raised:
        debian.build_base(board("orangepipcplus"), RELEASE, "http://deb.debian.org/debian",
                          Cache(tmp_path / "cache"), Ledger(tmp_path / "state"))
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'debian-archive-keyring.gpg'} not found")
    assert "apt-get install debian-archive-keyring" in message and "ci/setup-host" in message
    assert not (tmp_path / "cache").exists(), "refused before the cache was touched"


def test_the_images_apt_checks_debians_key() -> None:
    sources = debian.sources("http://deb.debian.org/debian", RELEASE)
    fields = dict(line.split(": ", 1) for line in sources.splitlines())
    assert fields["Signed-By"] == KEYRING
    assert "Trusted" not in fields and "trusted=" not in sources.lower()


def test_setup_host_installs_the_keyring_for_everyone() -> None:
    listed = subprocess.run(["bash", "ci/setup-host", "--list"], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).parent.parent).stdout
    assert {"debian-archive-keyring", "gpgv"} <= set(listed.split())


# -- mirrors that serve a Release file Debian's key did not sign ------------------------------

@pytest.fixture(scope="module")
def genuine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian's InRelease for RELEASE, as deb.debian.org (or $DEBIAN_MIRROR) serves it."""
    path = tmp_path_factory.mktemp("debian") / "InRelease"
    url = f"{DEBIAN_MIRROR.rstrip('/')}/dists/{RELEASE}/InRelease"
    with urllib.request.urlopen(url, timeout=60) as response:
        path.write_bytes(response.read())
    # The control: what the tests alter checks out against the host's keyring as it is.
    subprocess.run(["gpgv", "--keyring", KEYRING, str(path)], check=True, capture_output=True)
    return path


def release_text(genuine: Path, into: Path) -> Path:
    """The signed content of the InRelease, as a plain Release file."""
    subprocess.run(["gpgv", "--keyring", KEYRING, "--output", str(into), str(genuine)],
                   check=True, capture_output=True)
    return into


def altered(genuine: Path, dists: Path, gpg: Gpg) -> str:
    """One hex digit of one index's hash changed, Debian's signature kept."""
    text = genuine.read_text()
    line = re.search(r"^ ([0-9a-f]{64}) +\d+ main/binary-armhf/Packages\.xz$", text,
                     re.MULTILINE)
    assert line, "no SHA256 line for main/binary-armhf/Packages.xz"
    digit = line.start(1)
    flipped = "1" if text[digit] == "0" else "0"
    (dists / "InRelease").write_text(text[:digit] + flipped + text[digit + 1:])
    return "its signature does not match it"


def foreign_inline(genuine: Path, dists: Path, gpg: Gpg) -> str:
    """Debian's content, clear-signed by a key of our own."""
    release = release_text(genuine, dists.parent / "Release.plain")
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--clearsign", "--output",
                    str(dists / "InRelease"), str(release)], env=gpg.env, check=True,
                   capture_output=True)
    return f"it is signed by key {key_id(gpg)}, which {KEYRING} does not hold"


def foreign_detached(genuine: Path, dists: Path, gpg: Gpg) -> str:
    """No InRelease: Release and a Release.gpg made with a key of our own (debootstrap's
    other way to the same file)."""
    release = release_text(genuine, dists / "Release")
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--detach-sign", "--output",
                    str(dists / "Release.gpg"), str(release)], env=gpg.env, check=True,
                   capture_output=True)
    return f"it is signed by key {key_id(gpg)}, which {KEYRING} does not hold"


def unsigned(genuine: Path, dists: Path, gpg: Gpg) -> str:
    release_text(genuine, dists / "Release")
    return "the mirror serves it without a signature"


def key_id(gpg: Gpg) -> str:
    listing = subprocess.run(["gpg", "--batch", "--with-colons", "--list-keys"], env=gpg.env,
                             check=True, capture_output=True, text=True).stdout
    fingerprint = next(line.split(":")[9] for line in listing.splitlines()
                       if line.startswith("fpr:"))
    return fingerprint[-16:]


def build_from(mirror: Mirror, board_id: str, tmp_path: Path
               ) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = run_cli("--board", board_id, "--base", "debian", "--set",
                     f"base.debian_mirror={mirror.url}/debian", "--cache-dir",
                     tmp_path / "cache", "--output", tmp_path / "out")
    return result, time.monotonic() - started


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize(("make", "board_id"), [
    (altered, "orangepipcplus"),
    (foreign_inline, "orangepipcplus"),
    (foreign_detached, "orangepioneplus"),
    (unsigned, "orangepipcplus"),
], ids=["altered", "foreign-key-inline", "foreign-key-detached", "unsigned"])
def test_a_release_debian_did_not_sign_is_refused(
        make: Callable[[Path, Path, Gpg], str], board_id: str, genuine: Path, gpg: Gpg,
        mirror: Mirror, tmp_path: Path) -> None:
    reason = engine_capable()
    if reason:
        pytest.skip(reason)
    dists = mirror.root / "debian/dists" / RELEASE
    dists.mkdir(parents=True)
    expected = make(genuine, dists, gpg)
    result, took = build_from(mirror, board_id, tmp_path)
    line = error_line(result)
    assert line.startswith(f"{REFUSED}{mirror.url}/debian {NOT_DEBIANS} ({expected}"), line
    assert "(base.debian_mirror)" in line
    # At the first thing debootstrap fetches: nothing past the Release file was asked for.
    fetched = {served.path for served in mirror.requests}
    assert fetched <= {f"/debian/dists/{RELEASE}/{name}"
                       for name in ("InRelease", "Release", "Release.gpg")}, fetched
    assert took < 60, f"refused only after {took:.0f} s"
    assert_nothing_left(tmp_path)


@pytest.mark.root
@pytest.mark.slow
def test_debians_own_release_is_not_mistaken_for_a_foreign_one(
        genuine: Path, mirror: Mirror, tmp_path: Path) -> None:
    """The control: the same mirror serving Debian's InRelease untouched gets past the
    signature (debootstrap asks for the package lists next, which this one lacks), and the
    error is not the signature's."""
    reason = engine_capable()
    if reason:
        pytest.skip(reason)
    dists = mirror.root / "debian/dists" / RELEASE
    dists.mkdir(parents=True)
    shutil.copy(genuine, dists / "InRelease")
    result, _ = build_from(mirror, "orangepipcplus", tmp_path)
    line = error_line(result)
    assert NOT_DEBIANS not in line and "check the mirror" in line, line
    assert any("/binary-armhf/" in served.path for served in mirror.requests), \
        [served.path for served in mirror.requests]
    assert_nothing_left(tmp_path)


def assert_nothing_left(tmp_path: Path) -> None:
    assert leftover_resources(tmp_path) == [], "a loop device or mount is left"
    cache = tmp_path / "cache"
    assert leftovers(cache) == [], "a Debian base reached the cache"
    assert not list((cache / "work").glob("build-*")), "the workspace is left"
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir()), "an image was written"
