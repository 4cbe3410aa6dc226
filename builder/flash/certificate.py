"""A certificate and key of the user's own for this card's HTTPS (--tls-cert, --tls-key): read
and checked with the card's own rules before the card is touched (check_given_tls), shown by
its fingerprint and names (GivenTls.describe), and written beside the preseed by
personalise_card. Without them the card makes its own self-signed certificate."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from builder import log
from builder.errors import UsageError
from builder.firstboot import tls

# A PEM certificate, even with its chain, is a few KiB: anything far larger is the wrong file
# (and /dev/zero must not be read for ever).
MAX_PEM = 1 << 20


@dataclass(frozen=True)
class GivenTls:
    """The user's certificate and key, as read from their files and checked."""

    cert_path: Path
    key_path: Path
    cert_pem: bytes
    key_pem: bytes
    cert: tls.Certificate

    def names(self) -> str:
        return ", ".join((*self.cert.dns_names, *self.cert.addresses)) or "no names"

    def describe(self) -> str:
        return (f"this card gets your certificate {self.cert_path.name} ({self.names()}; "
                f"valid until {self.cert.not_after:%Y-%m-%d})\n"
                f"    SHA-256 fingerprint: {self.cert.fingerprint}\n"
                f"    (the browser shows it for https://...:8888: compare the two)")


def check_given_tls(cert_path: Path | None, key_path: Path | None,
                    now: dt.datetime) -> GivenTls | None:
    """Both files or neither; each a PEM file the card will accept at first boot."""
    if cert_path is None and key_path is None:
        return None
    if key_path is None:
        raise UsageError(f"--tls-cert {cert_path} needs --tls-key: pass the certificate's "
                         f"private key too (a PEM file without a passphrase)")
    if cert_path is None:
        raise UsageError(f"--tls-key {key_path} needs --tls-cert: pass the certificate made "
                         f"for that key too (a PEM file)")
    cert_pem = _read("--tls-cert", cert_path)
    key_pem = _read("--tls-key", key_path)
    if b"PRIVATE KEY-----" in cert_pem:
        if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
            swapped = b"-----BEGIN CERTIFICATE-----" in key_pem
            raise UsageError(f"--tls-cert {cert_path} holds a private key, not a certificate: "
                             + ("swap --tls-cert and --tls-key" if swapped else
                                "pass the certificate the key was made for"))
        # The certificate file is left readable by everyone on the card.
        raise UsageError(f"--tls-cert {cert_path} holds a private key as well: pass a file "
                         f"with the certificate alone, and the key with --tls-key")
    try:
        cert = tls.check_pair(cert_pem, key_pem, now)
    except tls.CertificateError as exc:
        raise _refusal(str(exc), cert_path, key_path) from None
    except ValueError as exc:
        # cryptography parses extensions only when asked: a damaged one surfaces here.
        raise UsageError(f"--tls-cert {cert_path}: the certificate cannot be read ({exc}); "
                         f"pass an intact PEM certificate") from None
    return GivenTls(cert_path, key_path, cert_pem, key_pem, cert)


def _read(flag: str, path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM + 1)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot be read ({exc.strerror}): pass the path of "
                         f"a readable PEM file") from None
    if len(data) > MAX_PEM:
        raise UsageError(f"{flag} {path}: larger than {MAX_PEM >> 20} MiB, so no PEM file: "
                         f"pass the right file")
    return data


# check_pair's reasons (they begin "the certificate..." or "the key..."): the file each is
# about, and how to put it right. The first that matches wins.
_FIXES = (
    ("the key is not the certificate's", "--tls-key",
     "pass the key the certificate was made for"),
    ("expired", "--tls-cert", "pass a renewed certificate (or set this computer's clock right)"),
    ("not valid before", "--tls-cert",
     "wait until then, or set this computer's clock right, or pass a certificate valid now"),
    ("passphrase", "--tls-key", ""),               # its reason says how to remove it
    ("the key", "--tls-key", "pass the certificate's private key, in PEM form"),
    ("the certificate", "--tls-cert", "pass the certificate as PEM (openssl x509 -in FILE "
                                      "-out cert.pem; add -inform DER for a binary one)"),
)


def _refusal(reason: str, cert_path: Path, key_path: Path) -> UsageError:
    flag, fix = next(((f, x) for words, f, x in _FIXES if words in reason), ("--tls-cert", ""))
    path = key_path if flag == "--tls-key" else cert_path
    reason = reason.removeprefix("the certificate: ").removeprefix("the key: ")
    return UsageError(f"{flag} {path}: {reason}" + (f"; {fix}" if fix else ""))


def warn_about(given: GivenTls, hostname: str | None, now: dt.datetime) -> None:
    """What is worth a warning but not a refusal: a certificate for other names (people use
    their own DNS names) or one that ends soon (the card never replaces one it was given)."""
    if hostname:
        warn_unnamed(given, hostname, "this card")
    left = given.cert.not_after - now
    if left <= dt.timedelta(days=tls.RENEW_DAYS):
        log.warn(f"--tls-cert {given.cert_path} expires on {given.cert.not_after:%Y-%m-%d} "
                 f"(in {max(left.days, 0)} days): the card does not renew a certificate it "
                 f"was given, so browsers will refuse it then; renew it soon")


def warn_unnamed(given: GivenTls, hostname: str, whose: str) -> None:
    if not _names(given.cert, hostname):
        log.warn(f"--tls-cert {given.cert_path} names {given.names()}, not {hostname}.local "
                 f"or {hostname} ({whose}'s hostname): browsers will warn at "
                 f"https://{hostname}.local:8888 (fine if you open Jupyter by a name it has)")


def _names(cert: tls.Certificate, hostname: str) -> bool:
    # DNS names compare without regard to case (RFC 4343).
    names = {n.lower().rstrip(".") for n in cert.dns_names}
    return hostname.lower() in names or f"{hostname.lower()}.local" in names
