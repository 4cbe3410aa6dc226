"""The fake Armbian mirror must itself be trustworthy before downloader tests lean on it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from mirror import Mirror

IMAGE = "/dl/orangepi5/archive/Armbian_24.5.1_Orangepi5_bookworm_current_6.1.43.img.xz"
PAYLOAD = bytes(range(256)) * 400  # 102400 bytes, every offset distinguishable mod 256


@pytest.fixture
def root(tmp_path: Path) -> Path:
    image = tmp_path / IMAGE.lstrip("/")
    image.parent.mkdir(parents=True)
    image.write_bytes(PAYLOAD)
    (tmp_path / "all-images.json").write_text('{"assets": []}')
    return tmp_path


@pytest.fixture
def mirror(root: Path) -> Iterator[Mirror]:
    with Mirror(root) as m:
        yield m


@pytest.fixture
def http() -> Iterator[requests.Session]:
    """A session that ignores proxy settings from the environment: loopback only."""
    with requests.Session() as session:
        session.trust_env = False
        yield session


def test_get_serves_file_with_validators(mirror: Mirror, http: requests.Session) -> None:
    r = http.get(mirror.url + IMAGE, timeout=5)

    assert r.status_code == 200
    assert r.content == PAYLOAD
    assert r.headers["Content-Length"] == str(len(PAYLOAD))
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert r.headers["ETag"].startswith('"')
    assert "Last-Modified" in r.headers
    assert [(s.method, s.status, s.body_bytes) for s in mirror.hits(IMAGE)] == [
        ("GET", 200, len(PAYLOAD))
    ]


def test_json_content_type_head_and_404(mirror: Mirror, http: requests.Session) -> None:
    assert http.get(mirror.url + "/all-images.json", timeout=5).headers["Content-Type"] == (
        "application/json"
    )
    head = http.head(mirror.url + IMAGE, timeout=5)
    assert head.status_code == 200
    assert head.headers["Content-Length"] == str(len(PAYLOAD))
    assert head.content == b""
    assert mirror.bytes_served(IMAGE) == 0  # HEAD sends no body and is not a GET
    assert http.get(mirror.url + "/dl/missing.img.xz", timeout=5).status_code == 404
    assert http.get(mirror.url + "/dl/orangepi5", timeout=5).status_code == 404  # a directory


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=1000-1999", 1000, 2000), ("bytes=100000-", 100000, len(PAYLOAD))],
)
def test_range_returns_206_slice(
    mirror: Mirror, http: requests.Session, header: str, start: int, end: int
) -> None:
    r = http.get(mirror.url + IMAGE, headers={"Range": header}, timeout=5)

    assert r.status_code == 206
    assert r.content == PAYLOAD[start:end]
    assert r.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(PAYLOAD)}"
    assert r.headers["Content-Length"] == str(end - start)
    assert mirror.bytes_served(IMAGE) == end - start


def test_range_past_end_is_416(mirror: Mirror, http: requests.Session) -> None:
    r = http.get(mirror.url + IMAGE, headers={"Range": f"bytes={len(PAYLOAD)}-"}, timeout=5)

    assert r.status_code == 416
    assert r.headers["Content-Range"] == f"bytes */{len(PAYLOAD)}"


def test_if_range_honoured_only_for_current_version(
    root: Path, mirror: Mirror, http: requests.Session
) -> None:
    etag = http.head(mirror.url + IMAGE, timeout=5).headers["ETag"]
    ranged = {"Range": "bytes=500-", "If-Range": etag}
    assert http.get(mirror.url + IMAGE, headers=ranged, timeout=5).status_code == 206

    # The image is republished: the client's partial copy is stale, so it gets it all.
    image = root / IMAGE.lstrip("/")
    image.write_bytes(PAYLOAD[::-1])
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    r = http.get(mirror.url + IMAGE, headers=ranged, timeout=5)

    assert r.status_code == 200
    assert r.content == PAYLOAD[::-1]
    assert r.headers["ETag"] != etag


def test_redirect_is_followed(mirror: Mirror, http: requests.Session) -> None:
    mirror.redirect("/dl/orangepi5/archive/latest", IMAGE)
    mirror.redirect("/elsewhere", mirror.url + IMAGE, status=301)

    r = http.get(mirror.url + "/dl/orangepi5/archive/latest", timeout=5)
    assert [h.status_code for h in r.history] == [302]
    assert r.history[0].headers["Location"] == IMAGE
    assert r.url == mirror.url + IMAGE
    assert r.content == PAYLOAD
    assert http.get(mirror.url + "/elsewhere", timeout=5).history[0].status_code == 301


def test_drop_after_truncates_and_counts_only_sent_bytes(
    mirror: Mirror, http: requests.Session
) -> None:
    mirror.drop_after(IMAGE, 3000)

    started = time.monotonic()
    with pytest.raises(requests.exceptions.RequestException) as caught:
        http.get(mirror.url + IMAGE, timeout=5)
    assert isinstance(
        caught.value, requests.exceptions.ChunkedEncodingError | requests.ConnectionError
    )
    assert time.monotonic() - started < 2  # the socket was closed, not left to time out
    assert mirror.bytes_served(IMAGE) == 3000

    # Only once: the resume gets exactly the rest, and nothing is sent twice.
    r = http.get(mirror.url + IMAGE, headers={"Range": "bytes=3000-"}, timeout=5)
    assert r.status_code == 206
    assert r.content == PAYLOAD[3000:]
    assert mirror.bytes_served(IMAGE) == len(PAYLOAD)


def test_fail_then_success(mirror: Mirror, http: requests.Session) -> None:
    mirror.fail(IMAGE, 503, times=2)

    statuses = [http.get(mirror.url + IMAGE, timeout=5).status_code for _ in range(3)]

    assert statuses == [503, 503, 200]
    assert [s.status for s in mirror.hits(IMAGE)] == statuses


def test_throttle_lets_a_test_interrupt_mid_download(root: Path, http: requests.Session) -> None:
    with Mirror(root) as mirror:
        mirror.throttle(IMAGE, 20_000)  # ~5 s for the whole image
        with http.get(mirror.url + IMAGE, stream=True, timeout=5) as r:
            first = next(r.iter_content(1024))
        assert first == PAYLOAD[:1024]
        assert 0 < mirror.bytes_served(IMAGE) < len(PAYLOAD) // 2
        started = time.monotonic()
    assert time.monotonic() - started < 2  # leaving the block ends the slow send promptly
