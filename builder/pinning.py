"""The card's HTTPS certificate as try-image --smoke checks it: pinned to the fingerprint the
card showed on its serial console, and trusted alone.

The card makes its own self-signed certificate at first boot and prints its SHA-256
fingerprint on its consoles; a person compares it with what the browser shows. The smoke does
the same from outside, through the forwarded port: it reads the server's certificate once
without trusting it (peer_certificate), compares its fingerprint with the console's, exactly,
and from then on every client (requests, the kernel's websocket, Chromium) trusts that one
certificate and nothing else (Pin). A different certificate on the port fails the handshake.
No client here skips verification.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from builder.firstboot.tls import fingerprint

# What the card prints in the wizard's result and before its login prompts (the TLS contract
# between the card and this checker: builder/firstboot/result.py prints it).
SHOWN_FINGERPRINT = r"Certificate SHA-256 fingerprint: ((?:[0-9A-F]{2}:){31}[0-9A-F]{2})"
# The result's URLs, each on a line of its own indented four spaces. Matched only once the
# line after them has arrived whole (a block cut between two reads of the serial line would
# lose the URLs still to come; the .local one is last), which is looked at, not consumed: it
# may be the fingerprint's.
SHOWN_URLS = r"((?:\n {4}https?://\S+)+)\n(?=(?! {4}https?://)[^\n]*\n)"
_URL = re.compile(r"^ {4}(https?)://(\[[^\]]+\]|[^/:\s]+)", re.MULTILINE)
# Jupyter's login page, or a redirect to it, in a plain-HTTP answer.
_LOGIN_PAGE = re.compile(rb'name="password"|<form[^>]*login|^location:[^\r\n]*/login',
                         re.IGNORECASE | re.MULTILINE)
RETRY = 3.0


class PinError(Exception):
    """The certificate or the port did not do what HTTPS on the card promises: one line."""


@dataclass(frozen=True)
class Shown:
    """What the card's console showed of its HTTPS."""

    fingerprint: str                # the certificate's SHA-256, "AB:CD:..."
    hostname: str | None            # its <name>.local, when it printed a URL with one


def shown(fingerprint_line: str, urls: str) -> Shown:
    """The fingerprint and the .local name from the wizard's result (SHOWN_FINGERPRINT's and
    SHOWN_URLS's groups); PinError when a URL it printed is not https://."""
    found = _URL.findall(urls)
    plain = [f"{scheme}://{host}" for scheme, host in found if scheme != "https"]
    if plain or not found:
        raise PinError(f"the card's console shows {', '.join(plain) or 'no URL'} where it "
                       f"should show https:// URLs (the image says JUPYTER_TLS=yes)")
    names = [host for _, host in found if host.endswith(".local")]
    return Shown(fingerprint_line, names[0] if names else None)


@dataclass(frozen=True)
class Pin:
    """The one certificate a client trusts: the card's, as its console showed it."""

    certificate: bytes              # DER
    hostname: str | None            # <name>.local: sent as SNI and checked against it

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)

    @property
    def pem(self) -> str:
        return ssl.DER_cert_to_PEM_cert(self.certificate)

    def context(self) -> ssl.SSLContext:
        """CERT_REQUIRED with this certificate as the only trust anchor (no system CAs).
        Without a .local name the host name is not checked: the anchor is exact anyway."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cadata=self.pem)
        # Trusted as itself, whatever it says about signing (its key usage has no
        # keyCertSign): a chain may end at any certificate in the store, and only this one
        # is there.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        if self.hostname is None:
            context.check_hostname = False
        return context

    def spki_sha256(self) -> str:
        """Base64 of the SHA-256 of the certificate's public key (SubjectPublicKeyInfo DER),
        as Chromium's --ignore-certificate-errors-spki-list takes it."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        key = x509.load_der_x509_certificate(self.certificate).public_key()
        spki = key.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def peer_certificate(host: str, port: int, timeout: float,
                     server_name: str | None = None) -> bytes:
    """The certificate the server at host:port presents (DER). Read without verification,
    and nothing is sent over the connection: it is only compared with the console's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=timeout) as raw, \
            context.wrap_socket(raw, server_hostname=server_name) as tls:
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise PinError(f"the server at {host}:{port} presented no certificate")
    return der


def wait_for_certificate(host: str, port: int, timeout: float, server_name: str | None = None,
                         alive: Callable[[], bool] | None = None) -> bytes:
    """The server's certificate once it does a TLS handshake (Jupyter may still be starting:
    QEMU accepts on the forwarded port and closes when nothing listens in the guest).
    `alive()` returning False (the guest has stopped) ends the wait early."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if alive is not None and not alive():
            raise PinError(f"the guest stopped before Jupyter answered over HTTPS ({last})")
        try:
            return peer_certificate(host, port, min(30.0, max(1.0, deadline - time.monotonic())),
                                    server_name)
        except OSError as exc:       # refused, reset, a handshake cut short, a plain answer
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() + RETRY > deadline:
            raise PinError(f"Jupyter did not answer over HTTPS at {host}:{port} in "
                           f"{timeout:.0f} s ({last})")
        time.sleep(RETRY)


def pin(certificate: bytes, on_console: str, hostname: str | None) -> Pin:
    """The certificate pinned, when its fingerprint is exactly the one the console showed."""
    served = fingerprint(certificate)
    if served != on_console:
        raise PinError(f"the server's certificate is {served} but the card's console shows "
                       f"{on_console}: something else answers on Jupyter's port, or the card "
                       f"serves another certificate than it announces")
    return Pin(certificate, hostname)


def no_login_page_over_http(host: str, port: int, timeout: float = 60) -> str:
    """A plain-HTTP request for Jupyter's login page on the HTTPS port: what came back (a
    dropped connection, a TLS alert, silence). PinError when an HTTP answer serves the login
    page, or anything but an error: the password would then cross the network in clear."""
    request = (f"GET /login HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
               f"\r\n").encode()
    answer = b""
    ended = "the connection was closed"
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
            while len(answer) < (1 << 20):
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except ConnectionResetError:
            ended = "the connection was reset"
        except TimeoutError:
            ended = f"no answer in {timeout:.0f} s"
        except BrokenPipeError:
            ended = "the connection was closed before the request was sent"
    if not answer:
        return ended
    if answer[0] == 0x15:           # a TLS record of type alert
        return "a TLS alert"
    if not answer.startswith(b"HTTP/"):
        return "an answer that is not HTTP"
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    status = 0
    with contextlib.suppress(IndexError, ValueError):
        status = int(status_line.split()[1])
    login_page = _LOGIN_PAGE.search(answer) is not None
    if login_page or status < 400:
        what = "Jupyter's login page" if login_page else "a page"
        raise PinError(f"plain HTTP to port {port} got {what} ({status_line}): Jupyter must "
                       f"serve HTTPS only there, or the password crosses the network in clear")
    return f"an HTTP error ({status_line})"
