"""The browser check against a real JupyterLab server on loopback, with Debian's Chromium; over
HTTPS too, trusting only the pinned certificate (a server with another is refused)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest
from conftest import local_jupyter
from test_jupyter_client import TlsServer, other_pin, tls_jupyter

from builder.browser import BrowserError, check_jupyterlab, find_chromium
from builder.pinning import Pin

pytestmark = pytest.mark.slow

needs_chromium = pytest.mark.skipif(
    find_chromium() is None, reason="chromium is not installed (ci/setup-host --dev installs it)")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SERVER_START = 120.0


@dataclass
class Server:
    url: str
    token: str
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    token = secrets.token_hex(24)
    with local_jupyter(tmp_path_factory.mktemp("jupyter"), "lab", token) as (url, log):
        yield Server(url=url, token=token, log=log)


@dataclass
class Isolated:
    tmp: Path
    marker: str


def chromium_processes(isolated: Isolated) -> list[str]:
    """Processes that inherited this test's marker or name its temporary dir: Chromium and
    every helper it forked, whatever their command line says."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if isolated.marker.encode() in environ or str(isolated.tmp).encode() in cmdline:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{proc.name}: {command}")
    return found


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Isolated]:
    """Chromium's user-data-dir goes to a dir of this test's, and its processes carry a marker
    in their environment; afterwards both must be gone."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    marker = f"TEST_BROWSER_MARKER={secrets.token_hex(8)}"
    name, value = marker.split("=")
    monkeypatch.setenv(name, value)
    # Chromium's singleton socket goes to $TMPDIR itself (a path inside tmp_path would be too
    # long for a socket): a short one of this test's own, as other Chromiums (try-image's, in
    # the appliance's smokes) may come and go in the system's meanwhile.
    short = Path(tempfile.mkdtemp(prefix="tb-", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(short))
    result = Isolated(tmp=tmp, marker=marker)
    try:
        yield result
        assert list(tmp.iterdir()) == [], "Chromium's user-data-dir was left behind"
        assert chromium_processes(result) == []
        assert list(short.iterdir()) == [], "Chromium's singleton socket was left behind"
    finally:
        shutil.rmtree(short, ignore_errors=True)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@needs_chromium
def test_jupyterlab_loads_and_is_photographed(jupyter: Server, isolated: Isolated,
                                              tmp_path: Path) -> None:
    shot = tmp_path / "out" / "lab.png"
    result = check_jupyterlab(jupyter.url, jupyter.token, shot, timeout=180)
    assert "JupyterLab" in result.title
    assert result.screenshot == shot
    assert 0 < result.seconds < 180
    assert png_size(shot) == (1280, 800)
    assert shot.stat().st_size > 10_000        # a page with content, not a blank frame
    assert (tmp_path / "out" / "lab.chromium.log").exists()


@needs_chromium
def test_wrong_token_ends_on_the_login_page(jupyter: Server, isolated: Isolated,
                                           tmp_path: Path) -> None:
    shot = tmp_path / "bad.png"
    wrong = secrets.token_hex(24)
    started = time.monotonic()
    with pytest.raises(BrowserError) as caught:
        check_jupyterlab(jupyter.url, wrong, shot, timeout=60)
    message = str(caught.value)
    assert "login" in message
    assert "wrong token?" in message
    assert "\n" not in message
    assert wrong not in message
    assert time.monotonic() - started < 60     # a login page is final: no need to wait it out
    png_size(shot)                              # what the browser showed, for the user


@needs_chromium
def test_a_server_that_never_answers_times_out(isolated: Isolated, tmp_path: Path) -> None:
    with socket.socket() as silent:
        # Listening but never accepting: the connection opens and no answer ever comes.
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(BrowserError) as caught:
            check_jupyterlab(url, "t0ken", tmp_path / "never.png", timeout=10)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert message.startswith("JupyterLab did not load in 10 s:"), message
    assert url in message
    assert "t0ken" not in message
    assert elapsed < 10 + 5


@needs_chromium
def test_a_refused_connection_is_named(isolated: Isolated, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    # The deadline covers Chromium's own start, which on a busy machine (the appliance's
    # builds beside it) took more than 5 s; a refused connection is named at once anyway.
    with pytest.raises(BrowserError) as caught:
        check_jupyterlab(url, "t0ken", tmp_path / "refused.png", timeout=60)
    assert "ERR_CONNECTION_REFUSED" in str(caught.value)


@needs_chromium
def test_ctrl_c_still_stops_chromium(isolated: Isolated, tmp_path: Path) -> None:
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        # Interrupt once Chromium runs: its processes then exist and must be cleaned up.
        ready = threading.Event()

        def watch() -> None:
            end = time.monotonic() + 60
            while time.monotonic() < end and not chromium_processes(isolated):
                time.sleep(0.1)
            time.sleep(1)
            ready.set()
            os.kill(os.getpid(), signal.SIGALRM)

        previous = signal.signal(signal.SIGALRM, interrupt)
        watcher = threading.Thread(target=watch, daemon=True)
        try:
            watcher.start()
            with pytest.raises(KeyboardInterrupt):
                check_jupyterlab(url, "t0ken", tmp_path / "ctrl-c.png", timeout=120)
        finally:
            watcher.join()
            signal.signal(signal.SIGALRM, previous)
    assert ready.is_set()


def test_missing_chromium_path_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(BrowserError) as caught:
        check_jupyterlab("http://127.0.0.1:9", "t", tmp_path / "x.png",
                         chromium="/nonexistent/chromium")
    assert "apt-get install chromium" in str(caught.value)
    assert not (tmp_path / "x.png").exists()


def test_no_chromium_on_path_names_the_package(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert find_chromium() is None
    with pytest.raises(BrowserError) as caught:
        check_jupyterlab("http://127.0.0.1:9", "t", tmp_path / "x.png")
    assert str(caught.value) == "chromium not found: install it with: apt-get install chromium"


# Over HTTPS, as on a card with JUPYTER_TLS=yes: Chromium trusts the pinned certificate alone.


@pytest.fixture(scope="module")
def https_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    with tls_jupyter(tmp_path_factory.mktemp("https-lab"), "lab",
                     secrets.token_hex(24)) as server:
        yield server


@needs_chromium
def test_jupyterlab_loads_over_https_trusting_only_the_pin(https_lab: TlsServer,
                                                          isolated: Isolated,
                                                          tmp_path: Path) -> None:
    """At the card's .local name, mapped to the forwarded port's address, with the pinned
    certificate's key as the only one whose errors are forgiven; and, for a card that printed
    no .local name, at the address itself."""
    shot = tmp_path / "lab.png"
    result = check_jupyterlab(https_lab.url, https_lab.token, shot, timeout=180,
                              pin=https_lab.pin)
    assert "JupyterLab" in result.title
    assert result.url == f"https://smoke-pc.local:{https_lab.port}/lab?token=<token>"
    assert png_size(shot) == (1280, 800)
    bare = Pin(https_lab.pin.certificate, None)
    result = check_jupyterlab(https_lab.url, https_lab.token, tmp_path / "bare.png",
                              timeout=180, pin=bare)
    assert "JupyterLab" in result.title
    assert result.url.startswith(f"https://127.0.0.1:{https_lab.port}/lab?")


@needs_chromium
def test_a_different_certificate_is_refused_by_chromium(https_lab: TlsServer,
                                                        isolated: Isolated,
                                                        tmp_path: Path) -> None:
    """Not --ignore-certificate-errors: pinned to another certificate (made for the same
    name), Chromium refuses the server's at once, and says so in one line."""
    started = time.monotonic()
    with pytest.raises(BrowserError) as caught:
        check_jupyterlab(https_lab.url, https_lab.token, tmp_path / "other.png", timeout=120,
                         pin=other_pin())
    message = str(caught.value)
    assert "Chromium refused the server's certificate at https://smoke-pc.local:" in message
    assert "net::ERR_CERT_" in message and "\n" not in message
    assert https_lab.token not in message
    assert time.monotonic() - started < 60
    png_size(tmp_path / "other.png")
