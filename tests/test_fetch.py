"""Fetching the base image from a fake Armbian mirror on 127.0.0.1: download, resume, verify,
decompress, cache. Everything runs build-image as a separate process, as users do."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    BUILD_IMAGE,
    REPO,
    FakeArmbian,
    Gpg,
    cli_env,
    error_line,
    leftovers,
    make_raw_image,
    run_cli,
)

pytestmark = pytest.mark.slow


def fetch(armbian: FakeArmbian, cache: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("--board", "orangepi5", "--fetch-only", "--armbian-index", armbian.index_url,
                   "--cache-dir", cache, "--set", "download.retries=2", *extra)


def image_requests(armbian: FakeArmbian, path: str) -> list[str | None]:
    return [r.range for r in armbian.mirror.hits(path) if r.method == "GET"]


def test_fetch_only_downloads_verifies_and_decompresses_sparse(armbian: FakeArmbian,
                                                                cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    result = fetch(armbian, cache_dir)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path == cache_dir / "images" / f"{pub.sha256}.img"
    assert path.read_bytes() == pub.raw
    # The 4 MiB of zeros in the middle were skipped, not written.
    assert path.stat().st_blocks * 512 < len(pub.raw) - (3 << 20)
    assert (cache_dir / "downloads" / pub.sha256 / pub.path.rsplit("/", 1)[1]).read_bytes() \
        == pub.compressed
    assert not list((cache_dir / "partial").iterdir())


def test_cached_entry_is_reused_without_network(armbian: FakeArmbian, cache_dir: Path,
                                                 tmp_path: Path) -> None:
    pub = armbian.publish("orangepi5")
    assert fetch(armbian, cache_dir).returncode == 0
    local_index = tmp_path / "index.json"
    local_index.write_bytes(armbian.index_path.read_bytes())
    before = len(armbian.mirror.requests)
    armbian.mirror.fail(pub.path, 500, times=100)
    armbian.mirror.fail(pub.path + ".sha", 500, times=100)
    result = run_cli("--board", "orangepi5", "--fetch-only", "--armbian-index", local_index,
                     "--cache-dir", cache_dir)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.splitlines()[-1]).read_bytes() == pub.raw
    assert len(armbian.mirror.requests) == before, "a cached entry must not touch the network"


def test_changed_cached_image_is_made_again(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    first = fetch(armbian, cache_dir)
    path = Path(first.stdout.splitlines()[-1])
    with open(path, "r+b") as f:
        f.write(b"tampered")
    second = fetch(armbian, cache_dir)
    assert second.returncode == 0, second.stderr
    assert "changed since it was verified" in second.stderr
    assert path.read_bytes() == pub.raw


def test_offline_uses_cached_index_and_image(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    assert fetch(armbian, cache_dir).returncode == 0
    before = len(armbian.mirror.requests)
    result = fetch(armbian, cache_dir, "--offline")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.splitlines()[-1]).read_bytes() == pub.raw
    assert len(armbian.mirror.requests) == before


def test_dropped_connection_is_resumed_with_range(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    half = len(pub.compressed) // 2
    armbian.mirror.drop_after(pub.path, half)
    result = fetch(armbian, cache_dir)
    assert result.returncode == 0, result.stderr
    first, second = image_requests(armbian, pub.path)
    assert first is None and second is not None
    # Resumed where the dropped connection stopped (less the read it was in), not restarted.
    resumed_at = int(second.removeprefix("bytes=").rstrip("-"))
    assert half - (64 << 10) <= resumed_at <= half
    assert armbian.mirror.bytes_served(pub.path) == len(pub.compressed) + half - resumed_at
    assert Path(result.stdout.splitlines()[-1]).read_bytes() == pub.raw


def test_many_drops_in_one_download(armbian: FakeArmbian, cache_dir: Path) -> None:
    """Only attempts that got nowhere use up retries: a flaky link that keeps making progress
    finishes the download."""
    pub = armbian.publish("orangepi5")
    armbian.mirror.drop_after(pub.path, 400_000, times=4)
    result = fetch(armbian, cache_dir, "--set", "download.retries=1")
    assert result.returncode == 0, result.stderr
    assert len(image_requests(armbian, pub.path)) == 5
    assert Path(result.stdout.splitlines()[-1]).read_bytes() == pub.raw


def test_server_errors_are_retried(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    armbian.mirror.fail(pub.path, 503, times=2)
    result = fetch(armbian, cache_dir)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("HTTP 503") == 2
    assert [r.status for r in armbian.mirror.hits(pub.path)] == [503, 503, 200]


def test_interrupted_download_resumes_on_rerun(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    armbian.mirror.throttle(pub.path, 256 * 1024)
    proc = subprocess.Popen(
        [*BUILD_IMAGE, "--board", "orangepi5", "--fetch-only", "--armbian-index",
         armbian.index_url, "--cache-dir", str(cache_dir)],
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while armbian.mirror.bytes_served(pub.path) < 300_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT" in err
    assert leftovers(cache_dir) == []
    parts = [p for p in (cache_dir / "partial").iterdir() if p.suffix == ".part"]
    assert len(parts) == 1 and parts[0].stat().st_size > 0
    kept = parts[0].stat().st_size

    armbian.mirror.throttle(pub.path, 0)
    result = fetch(armbian, cache_dir)
    assert result.returncode == 0, result.stderr
    assert image_requests(armbian, pub.path)[-1] == f"bytes={kept}-"
    assert f"resuming {pub.path.rsplit('/', 1)[1]}" in result.stderr
    assert Path(result.stdout.splitlines()[-1]).read_bytes() == pub.raw


def test_partial_of_a_changed_file_is_not_spliced(armbian: FakeArmbian, cache_dir: Path) -> None:
    """If-Range: when the file on the server changed since the partial download, the server
    sends it whole and the builder starts over instead of splicing two files."""
    pub = armbian.publish("orangepi5")
    armbian.mirror.drop_after(pub.path, 100_000)
    armbian.mirror.fail(pub.path + ".sha", 404, times=1)
    assert fetch(armbian, cache_dir).returncode != 0  # only the .sha failed: part is kept
    armbian.assets.clear()
    newer = armbian.publish("orangepi5", seed=2)
    assert newer.path == pub.path
    result = fetch(armbian, cache_dir)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.splitlines()[-1]).read_bytes() == newer.raw


def corrupt(armbian: FakeArmbian, pub_path: str) -> bytes:
    """Damage a published .img.xz in the middle and publish a .sha that matches the damage,
    as a broken build would."""
    target = armbian.root / pub_path.lstrip("/")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    digest = hashlib.sha256(bytes(data)).hexdigest()
    target.with_name(target.name + ".sha").write_text(f"{digest} {target.name}\n")
    return bytes(data)


def test_corrupt_remote_xz_is_not_kept(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    damaged = corrupt(armbian, pub.path)
    line = error_line(fetch(armbian, cache_dir))
    assert "corrupt or truncated" in line and "the download was removed" in line
    assert leftovers(cache_dir) == []
    assert not list((cache_dir / "urls").iterdir())
    error_line(fetch(armbian, cache_dir))
    assert armbian.mirror.bytes_served(pub.path) == 2 * len(damaged)  # fetched again


def test_unchecked_url_download_that_fails_is_not_kept(armbian: FakeArmbian,
                                                       cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    corrupt(armbian, pub.path)
    args = ("--board", "orangepi5", "--fetch-only", "--cache-dir", cache_dir,
            "--base", armbian.mirror.url + pub.path + "?mirror=1")
    result = run_cli(*args)
    assert "no checksum for" in result.stderr and "sha256 verified" not in result.stderr
    assert "corrupt or truncated" in error_line(result)
    assert leftovers(cache_dir) == [] and not list((cache_dir / "urls").iterdir())
    (armbian.root / pub.path.lstrip("/")).write_bytes(pub.compressed)  # the server is fixed
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.splitlines()[-1]).read_bytes() == pub.raw


def test_sha_mismatch_removes_the_download(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    sha = armbian.root / (pub.path.lstrip("/") + ".sha")
    sha.write_text("0" * 64 + " */build/output/images/whatever.img.xz\n")
    result = fetch(armbian, cache_dir)
    line = error_line(result)
    assert "sha256 mismatch" in line and "was removed" in line
    assert leftovers(cache_dir) == []
    assert not [p for p in (cache_dir / "partial").iterdir() if p.suffix == ".part"]


def test_image_404_is_one_line(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    (armbian.root / pub.path.lstrip("/")).unlink()
    result = fetch(armbian, cache_dir)
    assert "HTTP 404" in error_line(result)
    assert leftovers(cache_dir) == []


def test_unreachable_index(cache_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli("--board", "orangepi5", "--dry-run", "--armbian-index",
                     f"http://127.0.0.1:{port}/armbian-images.json", "--cache-dir", cache_dir,
                     "--set", "download.retries=1")
    last = error_line(result)
    assert "could not download the Armbian index after 2 attempts (Connection refused)" in last


def test_unknown_host_is_not_retried(cache_dir: Path) -> None:
    # .invalid never resolves (RFC 2606): another attempt would not change that.
    result = run_cli("--board", "orangepi5", "--dry-run", "--cache-dir", cache_dir,
                     "--armbian-index", "http://armbian.invalid/armbian-images.json")
    assert "Name or service not known for armbian.invalid" in error_line(result)
    assert "retrying" not in result.stderr


def test_index_that_is_not_json(armbian: FakeArmbian, cache_dir: Path) -> None:
    armbian.index_path.write_text("<html>Not here</html>")
    result = fetch(armbian, cache_dir)
    assert "is not JSON" in error_line(result)


def test_redirector_is_followed(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    armbian.mirror.redirect("/latest/orangepi5.img.xz", pub.path)
    result = run_cli("--board", "orangepi5", "--fetch-only", "--cache-dir", cache_dir,
                     "--base", f"{armbian.mirror.url}/latest/orangepi5.img.xz",
                     "--base-sha256", pub.sha256)
    assert result.returncode == 0, result.stderr
    assert [r.status for r in armbian.mirror.hits("/latest/orangepi5.img.xz")] == [302]
    assert Path(result.stdout.splitlines()[-1]).read_bytes() == pub.raw


def test_mirror_option_rewrites_dl_armbian_com(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    for asset in armbian.assets:
        for key in ("file_url", "file_url_sha", "file_url_asc"):
            asset[key] = asset[key].replace(armbian.mirror.url, "https://dl.armbian.com")
    armbian.write_index()
    result = fetch(armbian, cache_dir, "--armbian-mirror", armbian.mirror.url)
    assert result.returncode == 0, result.stderr
    assert armbian.mirror.bytes_served(pub.path) == len(pub.compressed)


# Signatures, checked with real gpgv against a key made for the test session.


def test_good_signature_is_recorded(armbian: FakeArmbian, gpg: Gpg, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    result = fetch(armbian, cache_dir, "--gpg-keyring", gpg.armored_keyring)
    assert result.returncode == 0, result.stderr
    assert "signature good" in result.stderr
    meta = json.loads((cache_dir / "images" / f"{pub.sha256}.json").read_text())
    assert meta["signature"] and len(meta["signature"]) == 40


def test_signature_checked_for_an_entry_cached_without_one(armbian: FakeArmbian, gpg: Gpg,
                                                           cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    assert fetch(armbian, cache_dir).returncode == 0
    result = fetch(armbian, cache_dir, "--gpg-keyring", gpg.keyring)
    assert result.returncode == 0, result.stderr
    assert [r.status for r in armbian.mirror.hits(pub.path + ".asc")] == [200]
    assert armbian.mirror.bytes_served(pub.path) == len(pub.compressed)  # not downloaded again
    meta = json.loads((cache_dir / "images" / f"{pub.sha256}.json").read_text())
    assert meta["signature"], "the checked signature is recorded on the entry"


def test_bad_signature_stops_and_leaves_nothing(armbian: FakeArmbian, gpg: Gpg,
                                                cache_dir: Path, tmp_path: Path) -> None:
    pub = armbian.publish("orangepi5")
    other = tmp_path / "other.img.xz"
    other.write_bytes(b"something else")
    asc = gpg.sign(other)
    (armbian.root / (pub.path.lstrip("/") + ".asc")).write_bytes(asc.read_bytes())
    result = fetch(armbian, cache_dir, "--gpg-keyring", gpg.keyring)
    assert "BAD signature" in error_line(result)
    assert leftovers(cache_dir) == []


def test_missing_signature_stops(armbian: FakeArmbian, gpg: Gpg, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5", sign=False)
    line = error_line(fetch(armbian, cache_dir, "--gpg-keyring", gpg.keyring))
    assert "the signature of" in line and "HTTP 404" in line
    assert leftovers(cache_dir) == []
    assert not (cache_dir / "images" / f"{pub.sha256}.img").exists()


@pytest.fixture
def stranger(tmp_path: Path) -> Iterator[Gpg]:
    """A second key, not the one that signs the images."""
    key = Gpg(tmp_path / "stranger")
    yield key
    key.close()


def test_signature_by_an_unknown_key(armbian: FakeArmbian, gpg: Gpg, stranger: Gpg,
                                     cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    line = error_line(fetch(armbian, cache_dir, "--gpg-keyring", stranger.keyring))
    assert "which is not in" in line and str(stranger.keyring) in line
    # Nothing unchecked under a final name, but the download itself (its sha256 matched) is
    # kept: with the right keyring the rerun finds it complete (HTTP 416) and checks it again.
    assert leftovers(cache_dir) == []
    result = fetch(armbian, cache_dir, "--gpg-keyring", gpg.keyring)
    assert result.returncode == 0, result.stderr
    assert [r.status for r in armbian.mirror.hits(pub.path)] == [200, 416]
    assert armbian.mirror.bytes_served(pub.path) == len(pub.compressed)


def test_keyring_without_the_signer_rejects_a_cached_image(armbian: FakeArmbian, gpg: Gpg,
                                                           stranger: Gpg,
                                                           cache_dir: Path) -> None:
    armbian.publish("orangepi5")
    assert fetch(armbian, cache_dir, "--gpg-keyring", gpg.keyring).returncode == 0
    before = len(armbian.mirror.requests)
    line = error_line(fetch(armbian, cache_dir, "--gpg-keyring", stranger.keyring, "--offline"))
    assert "which is not in" in line
    assert len(armbian.mirror.requests) == before


def test_offline_with_a_keyring(armbian: FakeArmbian, gpg: Gpg, cache_dir: Path,
                                tmp_path: Path) -> None:
    pub = armbian.publish("orangepi5")
    assert fetch(armbian, cache_dir, "--gpg-keyring", gpg.keyring).returncode == 0
    before = len(armbian.mirror.requests)
    result = fetch(armbian, cache_dir, "--gpg-keyring", gpg.armored_keyring, "--offline")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.splitlines()[-1]).read_bytes() == pub.raw
    assert len(armbian.mirror.requests) == before
    # An entry made without a keyring cannot be vouched for offline.
    other = tmp_path / "other-cache"
    assert fetch(armbian, other).returncode == 0
    line = error_line(fetch(armbian, other, "--gpg-keyring", gpg.keyring, "--offline"))
    assert "was never checked against a keyring" in line


def test_a_file_that_is_not_a_keyring(armbian: FakeArmbian, cache_dir: Path,
                                      tmp_path: Path) -> None:
    armbian.publish("orangepi5")
    bogus = tmp_path / "armbian.gpg"
    bogus.write_text("not a key\n")
    line = error_line(fetch(armbian, cache_dir, "--gpg-keyring", bogus))
    assert "holds no OpenPGP public key" in line
    assert armbian.mirror.requests == [], "the keyring is checked before any download"


def test_keyring_without_gpg_installed_fails_before_download(armbian: FakeArmbian, gpg: Gpg,
                                                             cache_dir: Path,
                                                             tmp_path: Path) -> None:
    armbian.publish("orangepi5")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("xz",):  # everything the fetch needs except gpg and gpgv
        (bin_dir / tool).symlink_to(f"/usr/bin/{tool}")
    env = cli_env(PATH=str(bin_dir))
    result = run_cli("--board", "orangepi5", "--fetch-only", "--armbian-index",
                     armbian.index_url, "--cache-dir", cache_dir,
                     "--gpg-keyring", gpg.keyring, env=env)
    assert result.returncode == 1
    assert "gpg, gpgv not found" in result.stderr and "apt-get install gpg gpgv" in result.stderr
    assert armbian.mirror.requests == [], "nothing may be downloaded before the host is checked"


def test_missing_keyring_file(armbian: FakeArmbian, cache_dir: Path, tmp_path: Path) -> None:
    armbian.publish("orangepi5")
    result = fetch(armbian, cache_dir, "--gpg-keyring", tmp_path / "nope.gpg")
    assert result.returncode == 1 and "not found" in result.stderr
    assert armbian.mirror.requests == []


# Local files and other formats.


def test_local_xz_gz_zst_and_raw(tmp_path: Path, cache_dir: Path) -> None:
    raw = make_raw_image(7)
    xz = tmp_path / "base.img.xz"
    xz.write_bytes(lzma.compress(raw, format=lzma.FORMAT_XZ, preset=0))
    gz = tmp_path / "base.img.gz"
    gz.write_bytes(gzip.compress(raw, compresslevel=1))
    plain = tmp_path / "base.img"
    plain.write_bytes(raw)
    zst = tmp_path / "base.img.zst"
    subprocess.run(["zstd", "-q", "-1", str(plain), "-o", str(zst)], check=True)
    for path in (xz, gz, zst):
        result = run_cli("--board", "orangepipc", "--fetch-only", "--base", path,
                         "--cache-dir", cache_dir)
        assert result.returncode == 0, result.stderr
        out = Path(result.stdout.splitlines()[-1])
        assert out.parent == cache_dir / "images" and out.read_bytes() == raw
    result = run_cli("--board", "orangepipc", "--fetch-only", "--base", plain,
                     "--base-sha256", hashlib.sha256(raw).hexdigest(), "--cache-dir", cache_dir)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.splitlines()[-1]) == plain  # used in place, not copied


def test_local_file_with_wrong_sha256(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "base.img.xz"
    path.write_bytes(lzma.compress(make_raw_image(3), preset=0))
    result = run_cli("--board", "orangepipc", "--fetch-only", "--base", path,
                     "--base-sha256", "a" * 64, "--cache-dir", cache_dir)
    assert result.returncode == 1 and "sha256 mismatch" in result.stderr
    assert path.exists(), "the user's own file is never removed"
    assert leftovers(cache_dir) == []


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_broken_xz_leaves_no_image(tmp_path: Path, cache_dir: Path, damage: str) -> None:
    data = bytearray(lzma.compress(make_raw_image(4), preset=0))
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path = tmp_path / "base.img.xz"
    path.write_bytes(bytes(data))
    result = run_cli("--board", "orangepipc", "--fetch-only", "--base", path,
                     "--cache-dir", cache_dir)
    assert "corrupt or truncated" in error_line(result)
    assert leftovers(cache_dir) == []


def test_two_builds_share_one_download(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    armbian.mirror.throttle(pub.path, 2 << 20)
    argv = [*BUILD_IMAGE, "--board", "orangepi5", "--fetch-only", "--armbian-index",
            armbian.index_url, "--cache-dir", str(cache_dir)]
    procs = [subprocess.Popen(argv, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[0][0].splitlines()[-1] == outputs[1][0].splitlines()[-1]
    assert armbian.mirror.bytes_served(pub.path) == len(pub.compressed)


def test_image_left_by_a_killed_build_is_swept(armbian: FakeArmbian, cache_dir: Path) -> None:
    armbian.publish("orangepi5")
    stale = cache_dir / "images" / f".{'e' * 64}.img.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half an image")
    result = fetch(armbian, cache_dir)
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert "left by a build that was killed" in result.stderr


@pytest.fixture
def tiny_cache(tmp_path: Path) -> Iterator[Path]:
    """A real, nearly full filesystem: a 1 MiB tmpfs."""
    cache = tmp_path / "tiny"
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(cache)], check=True)
    try:
        yield cache
    finally:
        subprocess.run(["umount", str(cache)], check=True)


@pytest.mark.root
def test_disk_full_while_downloading(armbian: FakeArmbian, tiny_cache: Path) -> None:
    # A plain URL: the size is not known beforehand, so the disk fills up mid-download.
    pub = armbian.publish("orangepi5")
    result = run_cli("--board", "orangepi5", "--fetch-only", "--cache-dir", tiny_cache,
                     "--base", armbian.mirror.url + pub.path, "--base-sha256", pub.sha256)
    line = error_line(result)
    assert "no space left on device" in line and "--cache-dir" in line
    assert leftovers(tiny_cache) == []
    assert not list((tiny_cache / "partial").iterdir())
    assert armbian.mirror.bytes_served(pub.path) > 0


@pytest.mark.root
def test_too_little_space_is_found_before_downloading(armbian: FakeArmbian,
                                                      tiny_cache: Path) -> None:
    # From the index the size is known: no byte of the image is fetched.
    pub = armbian.publish("orangepi5")
    line = error_line(fetch(armbian, tiny_cache))
    assert "not enough space in" in line and "--cache-dir" in line
    assert armbian.mirror.hits(pub.path) == []
    assert leftovers(tiny_cache) == []
