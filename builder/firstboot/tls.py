"""The card's own TLS certificate for Jupyter: made on the card, checked, and shown by its
fingerprint. Pure functions over PEM bytes; system.py writes the files.

The image carries no key: at first boot (and when the hostname changes, or the certificate
nears its end) the card makes an EC P-256 key and a self-signed certificate naming
<hostname>.local, the hostname and the addresses it has then. The browser cannot know it, so
it warns once; the person compares the SHA-256 fingerprint the browser shows with the one the
card shows on its consoles (a trusted channel: a cable or a screen), and accepts it or adds it
to the computer's trust store.

The validity window has to survive a board without a real-time clock: at first boot such a
board's clock may be days or years behind (systemd moves it forward only to its own build
time, or /usr/lib/clock-epoch, which the image build touches). A window that starts at that
clock's "now" would be valid already in the real world (it starts in the past), but would end
too early; one that starts later than the real date would be refused as not yet valid. So the
window starts a day before the later of the clock and the image's build time, and lasts
VALIDITY_DAYS: browsers on macOS and iOS refuse any TLS server certificate valid for longer
than 825 days, even one the user trusts. Every start of Jupyter checks it again, so once the
clock is right an expiring certificate is renewed.

The cryptography package is imported only where a certificate is made or read in depth: on
the card it is Debian's python3-cryptography (38 in bookworm; 3.4 in Ubuntu 22.04), so only
what those have is used. Reading a fingerprint needs the standard library alone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
import secrets
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509

# The longest validity Apple's platforms accept for a TLS server certificate (a day of it is
# spent before the start, see above); renewed when less than RENEW_DAYS are left.
VALIDITY_DAYS = 824
BACKDATE = dt.timedelta(days=1)
RENEW_DAYS = 30
FINGERPRINT = re.compile(r"(?:[0-9A-F]{2}:){31}[0-9A-F]{2}")
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s.*?-----END CERTIFICATE-----", re.S)


class CertificateError(ValueError):
    """A certificate or key that cannot serve: one line saying what is wrong with it."""


def fingerprint(der: bytes) -> str:
    """SHA-256 of the certificate as browsers show it: 32 hex pairs, upper case, colons."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def pem_fingerprint(cert_pem: bytes) -> str:
    """The fingerprint of the first certificate in a PEM file (the server's own)."""
    found = _PEM_CERT.search(cert_pem)
    if found is None:
        raise CertificateError("no PEM certificate in it (-----BEGIN CERTIFICATE-----)")
    try:
        return fingerprint(ssl.PEM_cert_to_DER_cert(found.group().decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        raise CertificateError("its PEM certificate is damaged") from None


def window(now: dt.datetime, floor: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    """The validity window of a certificate made at `now` on a card built at `floor`."""
    start = (max(now, floor) if floor else now) - BACKDATE
    return start, start + dt.timedelta(days=VALIDITY_DAYS)


def make(hostname: str, addresses: Sequence[str], now: dt.datetime,
         floor: dt.datetime | None = None) -> tuple[bytes, bytes]:
    """A new key and a self-signed certificate for Jupyter on this card: (cert, key), PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(f"{hostname}.local"), x509.DNSName(hostname)]
    for address in dict.fromkeys(addresses):
        names.append(x509.IPAddress(ipaddress.ip_address(address)))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{hostname}.local"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                            "orangepi-jupyter (this card's own)")])
    start, end = window(now, floor)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(subject)
               .public_key(key.public_key())
               # Positive, at most 20 bytes, unpredictable (RFC 5280 4.1.2.2).
               .serial_number(secrets.randbits(127) | 1 << 126)
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.SubjectAlternativeName(names), critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=False,
                   crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                              critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    cert = builder.sign(key, hashes.SHA256())
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@dataclass(frozen=True)
class Certificate:
    """What a certificate says that matters here."""

    fingerprint: str
    not_before: dt.datetime
    not_after: dt.datetime
    dns_names: tuple[str, ...]
    addresses: tuple[str, ...]

    def names(self, hostname: str) -> bool:
        return f"{hostname}.local" in self.dns_names or hostname in self.dns_names


def _load(cert_pem: bytes) -> x509.Certificate:
    from cryptography import x509

    found = _PEM_CERT.search(cert_pem)
    if found is None:
        raise CertificateError("it is not a PEM certificate (-----BEGIN CERTIFICATE-----)")
    try:
        return x509.load_pem_x509_certificate(found.group())
    except ValueError:
        raise CertificateError("its PEM certificate is damaged") from None


def read(cert_pem: bytes) -> Certificate:
    """The certificate of a PEM file (its first), or CertificateError."""
    from cryptography import x509

    cert = _load(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(a) for a in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    except ValueError:      # extensions are parsed only when asked for
        raise CertificateError("its extensions are damaged") from None
    return Certificate(pem_fingerprint(cert_pem), _utc(cert, "not_valid_before"),
                       _utc(cert, "not_valid_after"), dns, ips)


def _utc(cert: object, name: str) -> dt.datetime:
    # cryptography 42 added the *_utc attributes and deprecated the naive ones.
    aware: dt.datetime | None = getattr(cert, f"{name}_utc", None)
    if aware is not None:
        return aware
    naive: dt.datetime = getattr(cert, name)
    return naive.replace(tzinfo=dt.UTC)


def check_pair(cert_pem: bytes, key_pem: bytes, now: dt.datetime) -> Certificate:
    """A certificate and key someone brings for a card: PEM, the key the certificate's, no
    passphrase (nobody is there to type it at boot), valid now. CertificateError says why
    not; the words name the file's role ("the certificate", "the key")."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        cert = read(cert_pem)
    except CertificateError as exc:
        raise CertificateError(f"the certificate: {exc}") from None
    if b"-----BEGIN" not in key_pem or b"PRIVATE KEY-----" not in key_pem:
        raise CertificateError("the key: it is not a PEM private key "
                               "(-----BEGIN PRIVATE KEY-----)")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertificateError("the key has a passphrase, which nobody is there to type "
                               "when the card boots: remove it (openssl pkey -in KEY -out "
                               "NEW-KEY)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"the key cannot be read ({exc})") from None
    if not _same_public_key(cert_pem, key):
        raise CertificateError("the key is not the certificate's (they do not match)")
    if now >= cert.not_after:
        raise CertificateError(f"the certificate expired on {cert.not_after:%Y-%m-%d}")
    if now < cert.not_before:
        raise CertificateError(f"the certificate is not valid before "
                               f"{cert.not_before:%Y-%m-%d %H:%M} UTC")
    return cert


def matches(cert_pem: bytes, key_pem: bytes) -> bool:
    """Whether the key (PEM, no passphrase) is the certificate's; False for anything that
    cannot be read."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        return _same_public_key(cert_pem, key)
    except (ValueError, TypeError, UnsupportedAlgorithm, CertificateError):
        return False


def _same_public_key(cert_pem: bytes, key: object) -> bool:
    from cryptography.hazmat.primitives import serialization

    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(_load(cert_pem).public_key().public_bytes(*spki) ==
                key.public_key().public_bytes(*spki))  # type: ignore[attr-defined]


def renewal_reason(cert: Certificate, hostname: str, now: dt.datetime) -> str | None:
    """Why the card's own certificate should be made anew now, or None. Never because it is
    not valid yet by the card's clock: that clock is the one likely wrong (no RTC), and a new
    certificate at every boot without network would change the fingerprint each time."""
    if not cert.names(hostname):
        return f"it does not name {hostname}.local"
    if now + dt.timedelta(days=RENEW_DAYS) >= cert.not_after:
        return f"it ends on {cert.not_after:%Y-%m-%d}"
    return None
