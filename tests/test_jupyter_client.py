"""try-image's Jupyter client against a real Jupyter server on the host: the stranger check,
the token, the login form with a password hashed the way the first-boot wizard hashes it, a
kernel started over REST and a cell run over its websocket; and all of it over HTTPS trusting
only the pinned certificate (builder.pinning), which a server with another certificate fails,
with the checks the smoke makes of the card's HTTPS port: the certificate against the console's
fingerprint, plain HTTP getting no login page."""

from __future__ import annotations

import contextlib
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from conftest import local_jupyter

from builder import jupyter_client as jupyter
from builder import pinning
from builder.firstboot import tls
from builder.firstboot.answers import hash_jupyter_password
from builder.pinning import Pin

pytestmark = pytest.mark.slow
PASSWORD = "jupyter pässword \"$(true)\""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    token = secrets.token_hex(24)
    hashed = hash_jupyter_password(PASSWORD, sys.executable)
    with local_jupyter(tmp_path_factory.mktemp("server"), "server", token,
                       f"--PasswordIdentityProvider.hashed_password={hashed}") as (url, _):
        yield url, token


def test_strangers_are_refused_even_after_the_token_was_used(server: tuple[str, str]) -> None:
    url, token = server
    assert jupyter.wait_until_up(url, 30) < 30
    jupyter.refuses_strangers(url)
    jupyter.token_works(url, token)
    # Jupyter answers a token with a login cookie: the next "stranger" must not carry it.
    jupyter.refuses_strangers(url)
    with pytest.raises(jupyter.JupyterError, match="token was refused"):
        jupyter.token_works(url, "wrong")


def test_an_open_server_is_reported(tmp_path: Path) -> None:
    with local_jupyter(tmp_path, "server", "",
                       "--IdentityProvider.token=", "--ServerApp.password=",
                       "--ServerApp.disable_check_xsrf=True") as (url, _), \
            pytest.raises(jupyter.JupyterError, match="open to anyone"):
        jupyter.refuses_strangers(url)


def test_the_wizards_password_hash_logs_in_and_a_cell_runs(server: tuple[str, str]) -> None:
    url, _ = server
    session = jupyter.Session(url)
    try:
        with pytest.raises(jupyter.JupyterError, match="password failed"):
            jupyter.Session(url).login("not the password")
        session.login(PASSWORD)
        kernel = session.start_kernel()
        result = session.execute(kernel, "import os\nprint(6 * 7, os.getpid() > 0)", 120)
        assert result.stdout == "42 True\n"
        with pytest.raises(jupyter.JupyterError, match="ZeroDivisionError"):
            session.execute(kernel, "1 / 0", 120)
        session.stop_kernel(kernel)
    finally:
        session.close()


def test_stack_answers_are_checked() -> None:
    good = ('TRY-IMAGE {"det": 5.0, "quad": 9.000000000000002, "area": 7.0, "sympy": "9", '
            '"pandas": 10, "png": "89504e47", "user": "jupyter"}\n')
    assert jupyter.check_stack_output("noise\n" + good)["user"] == "jupyter"
    with pytest.raises(jupyter.JupyterError, match=r"area = 6\.0"):
        jupyter.check_stack_output(good.replace('"area": 7.0', '"area": 6.0'))
    with pytest.raises(jupyter.JupyterError, match="printed no result"):
        jupyter.check_stack_output("Traceback ...")


def test_a_silent_kernel_meets_the_cells_limit_while_jupyter_pings(tmp_path: Path) -> None:
    """Jupyter pings its websockets (every 30 s by default, every 0.3 s here) and the client
    library answers pings inside its own receive loop: a kernel that says nothing must still
    end at the cell's limit, not when it finally speaks."""
    config = tmp_path / "pings.py"
    config.write_text("c.ServerApp.tornado_settings = {'ws_ping_interval': 300}\n")
    (tmp_path / "server").mkdir()
    with local_jupyter(tmp_path / "server", "server", "pinged",
                       f"--config={config}") as (url, _):
        session = jupyter.Session(url)
        try:
            session.http.headers["Authorization"] = "token pinged"
            kernel = session.start_kernel()
            assert session.execute(kernel, "print('up')", 120).stdout == "up\n"
            started = time.monotonic()
            with pytest.raises(jupyter.JupyterError, match="did not finish in 3 s"):
                session.execute(kernel, "import time\ntime.sleep(30)", 3)
            assert time.monotonic() - started < 10
            session.stop_kernel(kernel)
        finally:
            session.close()


# Over HTTPS, as on a card with JUPYTER_TLS=yes: a real Jupyter server with a certificate made
# the way the card makes its own, and the client trusting that certificate alone.


@dataclass
class TlsServer:
    url: str                # https://127.0.0.1:PORT
    port: int
    token: str
    certificate: bytes      # PEM, as on the card
    pin: Pin                # pinned as try-image pins it: the card's name, its certificate
    log: Path


def make_certificate(hostname: str = "smoke-pc") -> bytes:
    """A certificate (PEM) made as the card makes its own: for <hostname>.local, <hostname>
    and the guest's address in QEMU, not for 127.0.0.1."""
    return tls.make(hostname, ["10.0.2.15"], datetime.now(UTC))[0]


@contextlib.contextmanager
def tls_jupyter(base: Path, app: str, token: str, *args: str,
                hostname: str = "smoke-pc") -> Iterator[TlsServer]:
    """A real Jupyter server (`jupyter lab` or `jupyter server`) on 127.0.0.1 serving HTTPS
    only, with a certificate and key from builder.firstboot.tls.make; every config, data and
    runtime dir under `base`. Ready once the token gets in through the pinned client."""
    cert, key = tls.make(hostname, ["10.0.2.15"], datetime.now(UTC))
    (base / "tls").mkdir(parents=True)
    (base / "tls/jupyter.crt").write_bytes(cert)
    (base / "tls/jupyter.key").write_bytes(key)
    pin = Pin(ssl.PEM_cert_to_DER_cert(cert.decode()), f"{hostname}.local")

    def ready(url: str) -> bool:
        with contextlib.suppress(jupyter.JupyterError):
            jupyter.token_works(url, token, pin)
            return True
        return False

    with local_jupyter(base, app, token,
                       f"--ServerApp.certfile={base / 'tls/jupyter.crt'}",
                       f"--ServerApp.keyfile={base / 'tls/jupyter.key'}",
                       # As on the card, which listens on every address and is opened by
                       # its .local name (Jupyter refuses such a Host when it listens on
                       # loopback only), and marks its cookies for HTTPS only.
                       "--ServerApp.allow_remote_access=True",
                       "--IdentityProvider.secure_cookie=True", *args,
                       scheme="https", ready=ready) as (url, log):
        yield TlsServer(url, int(url.rsplit(":", 1)[1]), token, cert, pin, log)


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    hashed = hash_jupyter_password(PASSWORD, sys.executable)
    with tls_jupyter(tmp_path_factory.mktemp("https"), "server", secrets.token_hex(24),
                     f"--PasswordIdentityProvider.hashed_password={hashed}") as server:
        yield server


def other_pin(hostname: str | None = "smoke-pc.local") -> Pin:
    """Another card's certificate, for the same name: what a client must refuse."""
    return Pin(ssl.PEM_cert_to_DER_cert(make_certificate().decode()), hostname)


def test_the_served_certificate_is_pinned_to_the_consoles_fingerprint(https: TlsServer) -> None:
    """The certificate read through the port is pinned only when its fingerprint is exactly
    the one the card printed; another fingerprint is named in one line beside the served one."""
    shown = tls.pem_fingerprint(https.certificate)
    served = pinning.wait_for_certificate("127.0.0.1", https.port, 30, "smoke-pc.local")
    pinned = pinning.pin(served, shown, "smoke-pc.local")
    assert pinned.fingerprint == shown and pinned.hostname == "smoke-pc.local"
    other = tls.pem_fingerprint(make_certificate())
    with pytest.raises(pinning.PinError) as caught:
        pinning.pin(served, other, "smoke-pc.local")
    assert str(caught.value).startswith(f"the server's certificate is {shown} but the card's "
                                        f"console shows {other}")
    assert "\n" not in str(caught.value)


def test_every_check_runs_over_https_trusting_only_the_pin(https: TlsServer) -> None:
    """Strangers get 403, the token and the password get in and a cell runs over the kernel's
    websocket (wss), all through clients whose only trust anchor is the card's certificate;
    the .local name is checked against it, or nothing when the card printed none."""
    pin = https.pin
    assert jupyter.wait_until_up(https.url, 30, pin=pin) < 30
    jupyter.refuses_strangers(https.url, pin)
    jupyter.token_works(https.url, https.token, pin)
    with pytest.raises(jupyter.JupyterError, match="token was refused"):
        jupyter.token_works(https.url, "wrong", pin)
    session = jupyter.Session(https.url, pin)
    try:
        session.login(PASSWORD)
        kernel = session.start_kernel()
        assert session.execute(kernel, "print(6 * 7)", 120).stdout == "42\n"
        session.stop_kernel(kernel)
    finally:
        session.close()
    nameless = Pin(pin.certificate, None)
    jupyter.token_works(https.url, https.token, nameless)
    session = jupyter.Session(https.url, nameless)
    try:
        session.login(PASSWORD)
        kernel = session.start_kernel()
        assert session.execute(kernel, "print(7 * 6)", 120).stdout == "42\n"
        session.stop_kernel(kernel)
    finally:
        session.close()


def test_a_different_certificate_is_refused_by_every_client(https: TlsServer) -> None:
    """Not a blanket ignore: a pin of another certificate (made for the same name) fails the
    HTTP client, the login and the kernel's websocket; so does the right certificate under
    another name, and the system's trust store, which knows no card."""
    wrong = other_pin()
    started = time.monotonic()
    with pytest.raises(jupyter.JupyterError, match="a certificate other than the pinned one"):
        jupyter.wait_until_up(https.url, 60, pin=wrong)
    assert time.monotonic() - started < 20      # refused at once, not retried until the limit
    for pin in (wrong, Pin(https.pin.certificate, "another-card.local"), None):
        with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
            jupyter.refuses_strangers(https.url, pin)
        with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
            jupyter.token_works(https.url, https.token, pin)
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        jupyter.Session(https.url, wrong).login(PASSWORD)
    # The websocket on its own: logged in with the right pin, the cell's connection with
    # another must not be made.
    session = jupyter.Session(https.url, https.pin)
    try:
        session.login(PASSWORD)
        kernel = session.start_kernel()
        session.pin = wrong
        with pytest.raises(ssl.SSLCertVerificationError):
            session.execute(kernel, "print(1)", 60)
        session.pin = https.pin
        assert session.execute(kernel, "print(2)", 60).stdout == "2\n"
        session.stop_kernel(kernel)
    finally:
        session.close()


def test_plain_http_to_the_https_port_gets_no_login_page(https: TlsServer,
                                                          tmp_path: Path) -> None:
    """Jupyter serving HTTPS drops a plain-HTTP request; one serving plain HTTP answers it
    with the login page, which the check names."""
    outcome = pinning.no_login_page_over_http("127.0.0.1", https.port, timeout=30)
    assert outcome in ("the connection was closed", "the connection was reset",
                       "a TLS alert", "an answer that is not HTTP"), outcome
    with local_jupyter(tmp_path, "server", "plain") as (url, _), \
            pytest.raises(pinning.PinError) as caught:
        pinning.no_login_page_over_http("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
    assert "got Jupyter's login page (HTTP/1.1 200 OK)" in str(caught.value)


def test_waiting_for_the_certificate_ends_with_the_reason(tmp_path: Path) -> None:
    """A port where nothing does TLS: the wait ends at its limit, saying what it last saw,
    or at once when the guest has stopped."""
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen(8)
        port = plain.getsockname()[1]

        def answer_in_clear() -> None:
            # What a plain-HTTP server says to a TLS ClientHello.
            for _ in range(4):
                try:
                    conn, _ = plain.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        threading.Thread(target=answer_in_clear, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(pinning.PinError) as caught:
            pinning.wait_for_certificate("127.0.0.1", port, 5)
        assert time.monotonic() - started < 15
    message = str(caught.value)
    assert message.startswith(f"Jupyter did not answer over HTTPS at 127.0.0.1:{port} in 5 s")
    assert "SSL" in message, message
    with pytest.raises(pinning.PinError, match="the guest stopped"):
        pinning.wait_for_certificate("127.0.0.1", port, 60, alive=lambda: False)


def test_the_spki_hash_is_the_certificates_public_key(tmp_path: Path) -> None:
    """What Chromium is given, computed as OpenSSL's tools compute it (the recipe Chromium's
    documentation gives for --ignore-certificate-errors-spki-list)."""
    cert = make_certificate()
    (tmp_path / "c.pem").write_bytes(cert)
    key = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "c.pem"), "-noout",
                          "-pubkey"], check=True, capture_output=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=key,
                         check=True, capture_output=True).stdout
    digest = subprocess.run(["openssl", "dgst", "-sha256", "-binary"], input=der, check=True,
                            capture_output=True).stdout
    import base64
    pin = Pin(ssl.PEM_cert_to_DER_cert(cert.decode()), None)
    assert pin.spki_sha256() == base64.b64encode(digest).decode()
    assert pin.spki_sha256() != other_pin().spki_sha256()
