"""Fetching the base image from a fake Armbian mirror on 127.0.0.1: download, resume, verify,
decompress, cache. Everything runs build-image as a separate process, as users do.

The mirror signs its images with a key made for the test session: a build trusts it only when
given it with --gpg-keyring (FakeArmbian.args does), besides Armbian's own shipped key."""

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
    UNSIGNED_BASE,
    FakeArmbian,
    Gpg,
    cli_env,
    error_line,
    leftover_resources,
    leftovers,
    make_raw_image,
    run_cli,
)

from builder import fetch as fetch_module
from builder.cache import Cache
from builder.download import Http
from builder.verify import SHIPPED_KEYRING, Keys

pytestmark = pytest.mark.slow


def fetch(armbian: FakeArmbian, cache: Path, *extra: str | Path,
          key: bool = True) -> subprocess.CompletedProcess[str]:
    """--fetch-only from the mirror; with `key`, the test's key is trusted (else only
    Armbian's shipped key and what `extra` adds)."""
    trust = armbian.args if key else ["--armbian-index", armbian.index_url]
    return run_cli("--board", "orangepi5", "--fetch-only", *trust, "--cache-dir", cache,
                   "--set", "download.retries=2", *extra)


def plan(armbian: FakeArmbian, cache: Path, *extra: str | Path,
         key: bool = True) -> subprocess.CompletedProcess[str]:
    """--dry-run against the mirror, as fetch() does --fetch-only."""
    trust = armbian.args if key else ["--armbian-index", armbian.index_url]
    return run_cli("--board", "orangepi5", "--dry-run", *trust, "--cache-dir", cache, *extra)


def refused(result: subprocess.CompletedProcess[str], cache: Path, code: int = 1) -> str:
    """A build the verification stopped: one line, exit status 1 (2 when what the command line
    asks for cannot be), nothing in the cache that looks finished or half-made, no loop device
    or mount left behind."""
    line = error_line(result, code)
    assert leftovers(cache) == []
    assert not list((cache / "partial").glob("*.part")) if (cache / "partial").exists() else True
    assert leftover_resources(cache.parent) == []
    return line


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
                     *armbian.gpg.args, "--cache-dir", cache_dir)
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
        [*BUILD_IMAGE, "--board", "orangepi5", "--fetch-only", *armbian.args,
         "--cache-dir", str(cache_dir)],
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
    """Damage a published .img.xz in the middle and publish a .sha and a signature that match
    the damage, as a broken build would."""
    target = armbian.root / pub_path.lstrip("/")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    digest = hashlib.sha256(bytes(data)).hexdigest()
    target.with_name(target.name + ".sha").write_text(f"{digest} {target.name}\n")
    assert armbian.gpg is not None
    armbian.gpg.sign(target)
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
            "--base", armbian.mirror.url + pub.path + "?mirror=1", "--base-verify", "none")
    result = run_cli(*args)
    assert "warning: base.verify is none: the base image need carry neither" in result.stderr
    assert "no checksum for" in result.stderr and "sha256 verified" not in result.stderr
    assert armbian.mirror.hits(pub.path + ".asc") == [], "no signature is asked for"
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
                     "--armbian-index", "https://armbian.invalid/armbian-images.json")
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
                     "--base-sha256", pub.sha256, "--base-verify", "sha256")
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


# Signatures, checked with real gpgv. The default (no --base-verify) is `signature`: against
# Armbian's key shipped with the builder, and the keys added with --gpg-keyring.


def primary_fingerprints(keyring: Path) -> list[str]:
    listed = subprocess.run(["gpg", "--homedir", str(keyring.parent / ".gpg-home"), "--batch",
                             "--with-colons", "--show-keys", str(keyring)],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    # Each key's `pub` line is followed by its own `fpr` line.
    return [listed[i + 1].split(":")[9] for i, line in enumerate(listed)
            if line.startswith("pub:")]


def test_the_shipped_key_is_armbians_2025_key(tmp_path: Path) -> None:
    assert SHIPPED_KEYRING == REPO / "builder" / "keys" / "armbian-2025.asc"
    copy = tmp_path / "armbian-2025.asc"
    copy.write_bytes(SHIPPED_KEYRING.read_bytes())
    (tmp_path / ".gpg-home").mkdir(mode=0o700)
    assert primary_fingerprints(copy) == ["8CFA83D13EB2181EEF5843E41EB30FAF236099FE"]
    assert SHIPPED_KEYRING.read_bytes() == \
        (REPO.parent / "shared" / "data" / "armbian-signing-key-2025.asc").read_bytes()
    assert "8CFA83D13EB2181EEF5843E41EB30FAF236099FE" in Keys.load().fingerprints


def test_good_signature_is_recorded(armbian: FakeArmbian, gpg: Gpg, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    result = fetch(armbian, cache_dir)
    assert result.returncode == 0, result.stderr
    assert f"signature good: {pub.path.rsplit('/', 1)[1]} signed by {gpg.fingerprint}" in \
        result.stderr
    assert "warning" not in result.stderr
    meta = json.loads((cache_dir / "images" / f"{pub.sha256}.json").read_text())
    assert meta["signature"] == gpg.fingerprint
    # The signature is fetched, and its signer known, before the image is downloaded.
    paths = [r.path for r in armbian.mirror.requests]
    assert paths.index(pub.path + ".asc") < paths.index(pub.path)


def test_default_refuses_an_unsigned_image_before_downloading(armbian: FakeArmbian,
                                                              cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5", sign=False)
    line = refused(fetch(armbian, cache_dir), cache_dir)
    name = pub.path.rsplit("/", 1)[1]
    assert line == (f"build-image: error: {name} is not signed: {armbian.mirror.url}{pub.path}"
                    f".asc answered HTTP 404, and an unsigned image is refused: publish its "
                    f"detached signature there (by Armbian's key or one added with "
                    f"--gpg-keyring FILE), or lower the check with --base-verify sha256")
    assert armbian.mirror.hits(pub.path) == []
    assert not (cache_dir / "images" / f"{pub.sha256}.img").exists()


def test_default_refuses_a_key_it_was_not_given(armbian: FakeArmbian, gpg: Gpg,
                                               cache_dir: Path) -> None:
    """Signed by the test's key, which is not Armbian's: refused, before the download, with
    the key named; given the key with --gpg-keyring (added to Armbian's), taken."""
    pub = armbian.publish("orangepi5")
    line = refused(fetch(armbian, cache_dir, key=False), cache_dir)
    assert line == (f"build-image: error: {pub.path.rsplit('/', 1)[1]} is signed by key "
                    f"{gpg.fingerprint}, which is not a trusted key (trusted: Armbian's key "
                    f"8CFA83D13EB2181EEF5843E41EB30FAF236099FE): add the key with --gpg-keyring "
                    f"FILE, or lower the check with --base-verify sha256")
    assert armbian.mirror.hits(pub.path) == []
    result = fetch(armbian, cache_dir, "--gpg-keyring", gpg.keyring, key=False)
    assert result.returncode == 0, result.stderr
    assert [r.status for r in armbian.mirror.hits(pub.path)] == [200]


def test_bad_signature_stops_and_leaves_nothing(armbian: FakeArmbian, gpg: Gpg,
                                                cache_dir: Path, tmp_path: Path) -> None:
    pub = armbian.publish("orangepi5")
    other = tmp_path / "other.img.xz"
    other.write_bytes(b"something else")
    asc = gpg.sign(other)
    (armbian.root / (pub.path.lstrip("/") + ".asc")).write_bytes(asc.read_bytes())
    line = refused(fetch(armbian, cache_dir), cache_dir)
    assert f"BAD signature on {pub.path.rsplit('/', 1)[1]} (key {gpg.fingerprint})" in line
    assert "it was removed from the cache" in line and "--base-verify sha256" in line
    assert armbian.mirror.bytes_served(pub.path) == len(pub.compressed)  # it was downloaded
    assert not (cache_dir / "urls").exists() or not list((cache_dir / "urls").iterdir())


def test_signature_checked_for_an_entry_cached_without_one(armbian: FakeArmbian, gpg: Gpg,
                                                           cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    lowered = fetch(armbian, cache_dir, "--base-verify", "sha256", key=False)
    assert lowered.returncode == 0, lowered.stderr
    assert armbian.mirror.hits(pub.path + ".asc") == []
    result = fetch(armbian, cache_dir)
    assert result.returncode == 0, result.stderr
    assert [r.status for r in armbian.mirror.hits(pub.path + ".asc")] == [200]
    assert armbian.mirror.bytes_served(pub.path) == len(pub.compressed)  # not downloaded again
    meta = json.loads((cache_dir / "images" / f"{pub.sha256}.json").read_text())
    assert meta["signature"] == gpg.fingerprint, "the checked signature is recorded"


def test_an_entry_cached_unsigned_is_not_taken_for_a_signed_one(armbian: FakeArmbian,
                                                                cache_dir: Path) -> None:
    """Cached at a lower level, the image is unsigned at the publisher: the default refuses
    it, online, and offline with one line."""
    pub = armbian.publish("orangepi5", sign=False)
    assert fetch(armbian, cache_dir, "--base-verify", "sha256").returncode == 0
    offline = error_line(fetch(armbian, cache_dir, "--offline"))
    assert offline == (f"build-image: error: --offline: {pub.path.rsplit('/', 1)[1]} was cached "
                       f"by a build that did not check its signature ({cache_dir}): run once "
                       f"with network access to check it, or lower the check with "
                       f"--base-verify sha256")
    assert "is not signed" in error_line(fetch(armbian, cache_dir))
    assert armbian.mirror.bytes_served(pub.path) == len(pub.compressed)


def test_lowered_levels_are_warned_about_on_every_build(armbian: FakeArmbian,
                                                        cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5", sign=False)
    warning = ("warning: base.verify is sha256: the base image's OpenPGP signature is not "
               "checked, only its sha256; nothing proves who made the image")
    for _ in range(2):       # downloaded, then from the cache
        result = fetch(armbian, cache_dir, "--base-verify", "sha256", key=False)
        assert result.returncode == 0, result.stderr
        assert result.stderr.count(warning) == 1
    planned = plan(armbian, cache_dir, "--base-verify", "none", key=False)
    assert planned.returncode == 0, planned.stderr
    assert "warning: base.verify is none" in planned.stderr
    assert "verify      none (lowered): nothing is required" in planned.stdout
    assert "signature   not checked (base.verify is none)" in planned.stdout
    assert f"sha256      {pub.sha256} (as verified before, from the cache)" in planned.stdout


def test_sha256_level_needs_the_published_checksum(armbian: FakeArmbian,
                                                   cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5", sign=False)
    (armbian.root / (pub.path.lstrip("/") + ".sha")).unlink()
    line = refused(fetch(armbian, cache_dir, "--base-verify", "sha256", key=False), cache_dir)
    assert "the checksum of" in line and "HTTP 404" in line
    assert armbian.mirror.hits(pub.path) == []
    # `none` takes what there is: the image, checked against nothing.
    result = fetch(armbian, cache_dir, "--base-verify", "none", key=False)
    assert result.returncode == 0, result.stderr
    assert "no checksum published for" in result.stderr
    # Nothing vouched for that download: a later build does not find it by its URL.
    assert not list((cache_dir / "urls").iterdir())


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, int]]:
    """A port on every interface that records whether anything connected to it."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        sock.setblocking(False)
        yield sock, sock.getsockname()[1]


def connected(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
        return True
    except BlockingIOError:
        return False


def test_plain_http_base_url_is_refused_before_any_request(
        listener: tuple[socket.socket, int], cache_dir: Path) -> None:
    # 0.0.0.0 reaches this machine on Linux, but is no loopback address: plain http to it
    # could as well go anywhere.
    sock, port = listener
    url = f"http://0.0.0.0:{port}/base.img.xz"
    line = refused(run_cli("--board", "orangepi5", "--fetch-only", "--cache-dir", cache_dir,
                           "--base", url), cache_dir, code=2)
    assert line == (f"build-image: error: the base image at {url} is plain http, which anyone "
                    f"on the way can change: use https (or a server on this machine), or give "
                    f"the image's digest with --base-sha256 HEX and --base-verify sha256, or "
                    f"lower the check with --base-verify none")
    assert not connected(sock)
    # sha256 without a digest of the user's: a .sha from the same server proves nothing.
    assert "needs the digest" in error_line(run_cli(
        "--board", "orangepi5", "--dry-run", "--base", url, "--base-verify", "sha256"),
        code=2)
    assert not connected(sock)
    # Lowered far enough, the build goes there (and finds nothing that speaks HTTP).
    lowered = run_cli("--board", "orangepi5", "--fetch-only", "--cache-dir", cache_dir,
                      "--base", url, "--base-sha256", "a" * 64, "--base-verify", "sha256",
                      "--set", "download.timeout=1", "--set", "download.retries=0")
    assert lowered.returncode == 1 and "plain http" not in lowered.stderr
    assert "warning: base.verify is sha256" in lowered.stderr
    assert connected(sock)


def test_plain_http_index_and_mirror_are_refused(armbian: FakeArmbian,
                                                 listener: tuple[socket.socket, int],
                                                 cache_dir: Path) -> None:
    sock, port = listener
    index = f"http://0.0.0.0:{port}/armbian-images.json"
    line = refused(run_cli("--board", "orangepi5", "--dry-run", "--armbian-index", index,
                           "--cache-dir", cache_dir), cache_dir, code=2)
    assert line.startswith(f"build-image: error: the Armbian index (--armbian-index) {index} "
                           f"is plain http")
    line = error_line(fetch(armbian, cache_dir, "--armbian-mirror", "http://10.0.0.5/armbian"),
                      code=2)
    assert "the Armbian mirror (--armbian-mirror) http://10.0.0.5/armbian is plain http" in line
    assert armbian.mirror.requests == [] and not connected(sock)
    # An index on loopback that points elsewhere over plain http: refused once read, before
    # any file it names is asked for.
    pub = armbian.publish("orangepi5")
    for asset in armbian.assets:
        for key in ("file_url", "file_url_sha", "file_url_asc"):
            asset[key] = asset[key].replace(armbian.mirror.url, f"http://0.0.0.0:{port}")
    armbian.write_index()
    line = refused(fetch(armbian, cache_dir), cache_dir)
    assert f"the base image at http://0.0.0.0:{port}{pub.path} is plain http" in line
    assert [r.path for r in armbian.mirror.requests] == ["/armbian-images.json"]
    assert not connected(sock)


def test_a_redirect_to_plain_http_is_refused(armbian: FakeArmbian,
                                            listener: tuple[socket.socket, int],
                                            cache_dir: Path) -> None:
    sock, port = listener
    pub = armbian.publish("orangepi5")
    armbian.assets[0]["file_url"] = f"{armbian.mirror.url}/latest/orangepi5.img.xz"
    armbian.write_index()
    target = f"http://0.0.0.0:{port}{pub.path}"
    armbian.mirror.redirect("/latest/orangepi5.img.xz", target)
    line = refused(fetch(armbian, cache_dir), cache_dir)
    assert (f"the redirect from {armbian.mirror.url}/latest/orangepi5.img.xz to {target} is "
            f"plain http") in line
    assert not connected(sock)


def test_keyring_without_the_signer_rejects_a_cached_image(armbian: FakeArmbian, gpg: Gpg,
                                                           stranger: Gpg,
                                                           cache_dir: Path) -> None:
    armbian.publish("orangepi5")
    assert fetch(armbian, cache_dir).returncode == 0
    before = len(armbian.mirror.requests)
    line = error_line(fetch(armbian, cache_dir, "--gpg-keyring", stranger.keyring, "--offline",
                            key=False))
    assert f"(cached) is signed by key {gpg.fingerprint}, which is not a trusted key" in line
    assert str(stranger.keyring) in line and "--base-verify sha256" in line
    assert len(armbian.mirror.requests) == before


@pytest.fixture
def stranger(tmp_path: Path) -> Iterator[Gpg]:
    """A second key, not the one that signs the images."""
    key = Gpg(tmp_path / "stranger")
    yield key
    key.close()


def test_offline_with_a_keyring(armbian: FakeArmbian, gpg: Gpg, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    assert fetch(armbian, cache_dir, "--gpg-keyring", gpg.keyring, key=False).returncode == 0
    before = len(armbian.mirror.requests)
    result = fetch(armbian, cache_dir, "--offline")      # the armored export this time
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.splitlines()[-1]).read_bytes() == pub.raw
    assert len(armbian.mirror.requests) == before


def test_keyrings_add_up(armbian: FakeArmbian, gpg: Gpg, stranger: Gpg,
                         cache_dir: Path, tmp_path: Path) -> None:
    """--gpg-keyring is repeatable, and base.gpg_keyring in a settings file may still be a
    single path."""
    armbian.publish("orangepi5")
    result = fetch(armbian, cache_dir, "--gpg-keyring", stranger.keyring, "--gpg-keyring",
                   gpg.keyring, key=False)
    assert result.returncode == 0, result.stderr
    site = tmp_path / "site.yaml"
    site.write_text(f"base:\n  gpg_keyring: {gpg.armored_keyring}\n")
    planned = plan(armbian, tmp_path / "other", "--config", site, key=False)
    assert planned.returncode == 0, planned.stderr
    assert f"and {gpg.armored_keyring}" in planned.stdout


def test_a_file_that_is_not_a_keyring(armbian: FakeArmbian, cache_dir: Path,
                                      tmp_path: Path) -> None:
    armbian.publish("orangepi5")
    bogus = tmp_path / "armbian.gpg"
    bogus.write_text("not a key\n")
    line = error_line(fetch(armbian, cache_dir, "--gpg-keyring", bogus), code=2)
    assert "holds no OpenPGP public key" in line
    assert armbian.mirror.requests == [], "the keyring is checked before any download"


def test_default_without_gpg_installed_fails_before_download(armbian: FakeArmbian,
                                                             cache_dir: Path,
                                                             tmp_path: Path) -> None:
    armbian.publish("orangepi5")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("xz",):  # everything the fetch needs except gpg and gpgv
        (bin_dir / tool).symlink_to(f"/usr/bin/{tool}")
    env = cli_env(PATH=str(bin_dir))
    result = run_cli("--board", "orangepi5", "--fetch-only", "--armbian-index",
                     armbian.index_url, "--cache-dir", cache_dir, env=env)
    assert result.returncode == 1
    assert "gpg, gpgv not found" in result.stderr and "apt-get install gpg gpgv" in result.stderr
    assert armbian.mirror.requests == [], "nothing may be downloaded before the host is checked"
    lowered = run_cli("--board", "orangepi5", "--fetch-only", "--armbian-index",
                      armbian.index_url, "--cache-dir", cache_dir, "--base-verify", "sha256",
                      env=env)
    assert lowered.returncode == 0, lowered.stderr


def test_missing_keyring_file(armbian: FakeArmbian, cache_dir: Path, tmp_path: Path) -> None:
    armbian.publish("orangepi5")
    result = fetch(armbian, cache_dir, "--gpg-keyring", tmp_path / "nope.gpg")
    assert f"GPG keyring {tmp_path / 'nope.gpg'} not found" in error_line(result, code=2)
    assert armbian.mirror.requests == []


def test_how_the_base_was_verified_goes_into_the_manifest(armbian: FakeArmbian, gpg: Gpg,
                                                          tmp_path: Path) -> None:
    """The manifest's base record, from what fetching returned: the level, the signer, the
    sha256 and where it came from."""
    pub = armbian.publish("orangepi5")
    source = fetch_module.BaseSource(
        location=armbian.mirror.url + pub.path, filename=pub.path.rsplit("/", 1)[1],
        suffix=".img.xz", sha256=None, sha256_url=armbian.mirror.url + pub.path + ".sha",
        signature_url=armbian.mirror.url + pub.path + ".asc", size=None, label="test")
    cache = Cache(tmp_path / "cache")
    http = Http(timeout=10, retries=0)
    trust = fetch_module.Trust("signature", Keys.load([gpg.keyring]))
    base = fetch_module.fetch_base_image(source, cache=cache, http=http, trust=trust)
    record = fetch_module.manifest_record(source, base)
    assert record["verified"] == {
        "level": "signature", "source": source.location, "sha256": pub.sha256,
        "sha256_from": "publisher", "sha256_url": source.sha256_url,
        "signer": gpg.fingerprint, "signer_name": None, "signature_url": source.signature_url,
        "from_cache": False}
    again = fetch_module.fetch_base_image(source, cache=cache, http=http,
                                          trust=fetch_module.Trust("none"))
    assert fetch_module.manifest_record(source, again)["verified"] | {"source": ""} == {
        "level": "none", "source": "", "sha256": pub.sha256, "sha256_from": "cache",
        "sha256_url": None, "signer": gpg.fingerprint, "signer_name": None,
        "signature_url": source.signature_url, "from_cache": True}
    http.close()


# Local files and other formats.


def disk_image(seed: int) -> bytes:
    """make_raw_image with an MBR's boot signature: a local raw .img must show a partition
    table to be taken (test_a_local_base_that_is_no_image_is_refused)."""
    data = bytearray(make_raw_image(seed))
    data[510:512] = b"\x55\xaa"
    return bytes(data)


def test_local_xz_gz_zst_and_raw(tmp_path: Path, cache_dir: Path, gpg: Gpg) -> None:
    """Local files, each with its signature beside it (PATH.asc), checked by default."""
    raw = disk_image(7)
    xz = tmp_path / "base.img.xz"
    xz.write_bytes(lzma.compress(raw, format=lzma.FORMAT_XZ, preset=0))
    gz = tmp_path / "base.img.gz"
    gz.write_bytes(gzip.compress(raw, compresslevel=1))
    plain = tmp_path / "base.img"
    plain.write_bytes(raw)
    zst = tmp_path / "base.img.zst"
    subprocess.run(["zstd", "-q", "-1", str(plain), "-o", str(zst)], check=True)
    for path in (xz, gz, zst, plain):
        gpg.sign(path)
    for path in (xz, gz, zst):
        result = run_cli("--board", "orangepipc", "--fetch-only", "--base", path,
                         "--cache-dir", cache_dir, *gpg.args)
        assert result.returncode == 0, result.stderr
        assert f"signature good: {path.name} signed by {gpg.fingerprint}" in result.stderr
        out = Path(result.stdout.splitlines()[-1])
        assert out.parent == cache_dir / "images" and out.read_bytes() == raw
    result = run_cli("--board", "orangepipc", "--fetch-only", "--base", plain,
                     "--base-sha256", hashlib.sha256(raw).hexdigest(), "--cache-dir", cache_dir,
                     *gpg.args)
    assert result.returncode == 0, result.stderr
    assert f"signature good: base.img signed by {gpg.fingerprint}" in result.stderr
    assert Path(result.stdout.splitlines()[-1]) == plain  # used in place, not copied


def test_local_file_without_signature_or_digest(tmp_path: Path, cache_dir: Path,
                                                gpg: Gpg) -> None:
    """Refused by default, before anything is read into the cache; taken with
    --base-verify none, and warned about."""
    raw = disk_image(8)
    for path in (tmp_path / "base.img.xz", tmp_path / "base.img"):
        path.write_bytes(lzma.compress(raw, preset=0) if path.suffix == ".xz" else raw)
        cache = cache_dir / path.name
        args = ("--board", "orangepipc", "--fetch-only", "--base", path, "--cache-dir", cache)
        line = refused(run_cli(*args, *gpg.args), cache)
        assert line == (f"build-image: error: {path} is not signed: there is no {path}.asc, and "
                        f"an unsigned image is refused: put its detached signature there (by "
                        f"Armbian's key or one added with --gpg-keyring FILE), or lower the "
                        f"check with --base-verify sha256 (and --base-sha256 HEX)")
        result = run_cli(*args, "--base-verify", "none")
        assert result.returncode == 0, result.stderr
        assert "warning: base.verify is none" in result.stderr
        assert Path(result.stdout.splitlines()[-1]).read_bytes() == raw


def test_local_file_with_a_bad_signature(tmp_path: Path, cache_dir: Path, gpg: Gpg) -> None:
    path = tmp_path / "base.img.xz"
    path.write_bytes(lzma.compress(make_raw_image(9), preset=0))
    gpg.sign(path)
    path.write_bytes(lzma.compress(make_raw_image(10), preset=0))
    line = refused(run_cli("--board", "orangepipc", "--fetch-only", "--base", path,
                           "--cache-dir", cache_dir, *gpg.args), cache_dir)
    assert f"BAD signature on base.img.xz (key {gpg.fingerprint})" in line
    assert path.exists(), "the user's own file is never removed"


def test_local_file_with_wrong_sha256(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "base.img.xz"
    path.write_bytes(lzma.compress(make_raw_image(3), preset=0))
    result = run_cli("--board", "orangepipc", "--fetch-only", "--base", path,
                     "--base-sha256", "a" * 64, "--base-verify", "sha256", "--cache-dir",
                     cache_dir)
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
                     "--cache-dir", cache_dir, *UNSIGNED_BASE)
    assert "corrupt or truncated" in error_line(result)
    assert leftovers(cache_dir) == []


def test_two_builds_share_one_download(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    armbian.mirror.throttle(pub.path, 2 << 20)
    argv = [*BUILD_IMAGE, "--board", "orangepi5", "--fetch-only", *armbian.args,
            "--cache-dir", str(cache_dir)]
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
                     "--base", armbian.mirror.url + pub.path, "--base-sha256", pub.sha256,
                     *armbian.gpg.args)
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


def gpt_image(path: Path) -> Path:
    """A real GPT disk made by sfdisk (protective MBR, header at 512, one partition)."""
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    subprocess.run(["sfdisk", "--quiet", str(path)], input=b"label: gpt\nstart=2048\n",
                   check=True)
    return path


def test_a_local_base_that_is_no_image_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    """Before anything is verified, decompressed or cached: one line naming the file and what
    to give instead; the user's file stays as it was."""
    raw = disk_image(11)
    (tmp_path / "x.img").mkdir()
    cases: dict[str, tuple[bytes, str]] = {
        "notes.img": (b"hello\n", "is not a disk image: 6 bytes cannot hold a system: give the "
                                  ".img of a whole disk (such as Armbian's)"),
        "noise.img": (make_raw_image(12), "is not a disk image: it has no partition table (no "
                                          "MBR signature at byte 510, no GPT header at 512): "
                                          "give the .img of a whole disk (such as Armbian's), "
                                          "not of a partition"),
        "gz.img.xz": (gzip.compress(raw, compresslevel=1), "holds gzip data, not xz: rename it "
                                                           "to gz.img.gz"),
        "xz.img.zst": (lzma.compress(raw, preset=0), "holds xz data, not zstd: rename it to "
                                                     "xz.img.xz"),
        "raw.img.gz": (raw, "is an uncompressed disk image named .img.gz: rename it to raw.img"),
        "text.img.xz": (b"hello\n" * 100, "is not xz-compressed (its first bytes are not xz's): "
                                          "give the image file itself, or download it again"),
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    cases["x.img"] = (b"", "is a directory: give the image file itself (an .img, .img.xz, "
                           ".img.gz or .img.zst file)")
    for name, (data, message) in cases.items():
        path = tmp_path / name
        for mode in ("--fetch-only", "--dry-run"):
            # What --base names is part of the command line: a usage error.
            line = error_line(run_cli("--board", "orangepipc", mode, "--base", path,
                                      "--cache-dir", cache_dir, *UNSIGNED_BASE), code=2)
            assert line == f"build-image: error: base image {path} {message}", (mode, line)
        assert path.is_dir() or path.read_bytes() == data
        assert not cache_dir.exists() or leftovers(cache_dir) == []


def test_a_gpt_disk_and_a_skippable_zstd_frame_are_taken(tmp_path: Path,
                                                         cache_dir: Path) -> None:
    """The checks above refuse only what cannot be an image: a GPT disk (no MBR signature
    needed beyond its protective one) and zstd data behind a skippable frame pass."""
    disk = gpt_image(tmp_path / "gpt.img")
    data = bytearray(disk.read_bytes())
    data[510:512] = b"\0\0"      # only the GPT header says what it is
    disk.write_bytes(data)
    result = run_cli("--board", "orangepipc", "--fetch-only", "--base", disk,
                     "--cache-dir", cache_dir, *UNSIGNED_BASE)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.splitlines()[-1]) == disk
    zst = tmp_path / "skip.img.zst"
    frame = subprocess.run(["zstd", "-q", "-1", "-c", str(disk)], capture_output=True,
                           check=True).stdout
    zst.write_bytes(bytes([0x50, 0x2A, 0x4D, 0x18]) + (4).to_bytes(4, "little") + b"skip" +
                    frame)
    result = run_cli("--board", "orangepipc", "--fetch-only", "--base", zst,
                     "--cache-dir", cache_dir, *UNSIGNED_BASE)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.splitlines()[-1]).read_bytes() == bytes(data)


def test_every_compressed_format_is_known_by_its_first_bytes(tmp_path: Path) -> None:
    """Each compressed suffix of the table, compressed by its own program, is recognised as
    itself and as nothing else."""
    from builder.compression import COMPRESSIONS, MAGIC, format_of
    plain = tmp_path / "data"
    plain.write_bytes(disk_image(13))
    assert set(MAGIC) == set(COMPRESSIONS) - {".img"}
    for suffix, argv in COMPRESSIONS.items():
        if suffix == ".img":
            assert format_of(plain.read_bytes()[:8192]) is None
            continue
        data = subprocess.run([argv[0], "-1", "-c", str(plain)], capture_output=True,
                              check=True).stdout
        assert format_of(data[:8192]) == suffix
