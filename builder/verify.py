"""Checking what was downloaded: sha256 digests and Armbian's detached OpenPGP signatures.

The keys a signature may be made by are Armbian's own, shipped with the builder
(keys/armbian-2025.asc), and those the user adds with --gpg-keyring. Nothing else is trusted:
the user's ~/.gnupg is never read or changed.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from builder import log
from builder.errors import BuildError
from builder.files import sha256_of
from builder.run import run

# Armbian's public signing key (2025 onwards), as Armbian publishes it: the keyring every
# build trusts. Public data; its fingerprint is checked by tests/test_fetch.py.
SHIPPED_KEYRING = Path(
    str(importlib.resources.files("builder") / "keys" / "armbian-2025.asc")).resolve()

# Armbian's signing keys, to name them in messages and the manifest. Only the 2025 key is
# shipped; images signed with the older one verify once the user adds that key.
ARMBIAN_KEYS = {
    "DF00FAF1C577104B50BF1D0093D6889F9F0E78D5": "Igor Pecovnik (Armbian, older images)",
    "8CFA83D13EB2181EEF5843E41EB30FAF236099FE": "Armbian Repository Signing Key (2025)",
}

# The two ways on from a signature the build will not take.
WAYS_ON = "add the key with --gpg-keyring FILE, or lower the check with --base-verify sha256"


def sha256_file(path: Path, what: str | None = None) -> str:
    with log.progress(f"checking {what or path.name}", path.stat().st_size) as bar:
        return sha256_of(path, bar.update)


def parse_sha_file(data: bytes, what: str) -> str:
    """The digest in an Armbian .sha file: `<hex> <name>` or, before 2025, `<hex> */build/path`.

    Only the first token matters; the name after it is whatever the build machine had.
    """
    tokens = data.decode("ascii", errors="replace").split()
    if not tokens or not re.fullmatch(r"[0-9a-fA-F]{64}", tokens[0]):
        raise BuildError(
            f"{what} does not start with a sha256 digest: the checksum file is damaged")
    return tokens[0].lower()


def check_digest(actual: str, expected: str, what: str, removed: Path | None) -> None:
    if actual != expected:
        gone = f"; {removed} was removed, rerun to download it again" if removed else ""
        raise BuildError(f"sha256 mismatch for {what}: expected {expected}, got {actual}{gone}")


class BadSignature(BuildError):
    """The signature does not match the file: the file must not be used."""


class UnknownSigner(BuildError):
    """The signature was made by a key the build does not trust (the file may be fine)."""

    def __init__(self, message: str, fingerprint: str) -> None:
        super().__init__(message)
        self.fingerprint = fingerprint


def keyring_fingerprints(keyring: Path) -> set[str]:
    """Fingerprints of every key and subkey in a keyring file (binary or armored).

    Read in a throwaway home directory: the user's ~/.gnupg is never read or changed. A
    fingerprint is a hash of the key material, so a signature that verified with a key of a
    given fingerprint verifies with any keyring holding that fingerprint.
    """
    with tempfile.TemporaryDirectory(prefix="build-image-gpg-") as home:
        proc = run(["gpg", "--homedir", home, "--batch", "--with-colons", "--show-keys",
                    keyring], capture=True, check=False)
    found = {line.split(":")[9] for line in proc.stdout.decode(errors="replace").splitlines()
             if line.startswith("fpr:")}
    if not found:
        raise BuildError(f"GPG keyring {keyring} holds no OpenPGP public key: export one with "
                         f"gpg --export KEYID > FILE (or --armor) and pass that file")
    return found


def key_name(fingerprint: str) -> str:
    """`FPR (Armbian Repository Signing Key (2025))`, or the fingerprint alone."""
    name = ARMBIAN_KEYS.get(fingerprint)
    return f"{fingerprint} ({name})" if name else fingerprint


@dataclass(frozen=True)
class Keys:
    """The keys a signature may be made by: Armbian's shipped key, then the user's keyrings."""

    keyrings: tuple[Path, ...]
    fingerprints: frozenset[str]

    @classmethod
    def load(cls, added: Sequence[Path] = ()) -> Keys:
        """The shipped key and every keyring in `added`, each checked now, before anything is
        downloaded: a keyring that is missing, unreadable or holds no key is an error."""
        if not SHIPPED_KEYRING.is_file():
            raise BuildError(f"Armbian's signing key is missing from the installation "
                             f"({SHIPPED_KEYRING}): reinstall orangepi-jupyter")
        for keyring in added:
            if not keyring.is_file():
                raise BuildError(f"GPG keyring {keyring} not found: check --gpg-keyring "
                                 f"(base.gpg_keyring); export a key with gpg --export KEYID "
                                 f"> FILE")
            if not os.access(keyring, os.R_OK):
                raise BuildError(f"GPG keyring {keyring} is not readable: check its "
                                 f"permissions (--gpg-keyring, base.gpg_keyring)")
        keyrings = (SHIPPED_KEYRING, *added)
        fingerprints: set[str] = set()
        for keyring in keyrings:
            fingerprints |= keyring_fingerprints(keyring)
        return cls(keyrings, frozenset(fingerprints))

    def describe(self) -> str:
        """For messages: `Armbian's key 8CFA... and /path/added.gpg`."""
        added = [str(k) for k in self.keyrings if k != SHIPPED_KEYRING]
        return " and ".join(["Armbian's key 8CFA83D13EB2181EEF5843E41EB30FAF236099FE", *added])

    def unknown(self, fingerprint: str, what: str) -> UnknownSigner:
        return UnknownSigner(f"{what} is signed by key {fingerprint}, which is not a trusted key "
                             f"(trusted: {self.describe()}): {WAYS_ON}", fingerprint)

    def check_known_signer(self, fingerprint: str, what: str) -> None:
        """A signature checked earlier was made by `fingerprint`: it verifies with these keys
        exactly when they hold that key. No file needs reading."""
        if fingerprint not in self.fingerprints:
            raise self.unknown(fingerprint, what)


def _gpgv(data: Path, signature: Path, keys: Keys) -> tuple[int, str]:
    """gpgv's exit status and status lines for `signature` over `data`.

    gpgv is made for exactly this: it trusts every key in the keyrings it is given and nothing
    else, and never touches the user's ~/.gnupg. It reads only binary keyrings, so an armored
    export (what Armbian publishes) is converted first.
    """
    with tempfile.TemporaryDirectory(prefix="build-image-gpg-") as tmp:
        argv: list[str | Path] = ["gpgv", "--homedir", tmp, "--status-fd", "1"]
        for number, keyring in enumerate(keys.keyrings):
            binary = keyring
            if keyring.read_bytes()[:64].lstrip().startswith(b"-----BEGIN PGP"):
                binary = Path(tmp) / f"keyring-{number}.gpg"
                run(["gpg", "--batch", "--yes", "--homedir", tmp, "--dearmor", "--output",
                     binary, keyring], capture=True, what=f"read the armored keyring {keyring}")
            argv += ["--keyring", binary]
        proc = run([*argv, signature, data], capture=True, check=False)
    return proc.returncode, proc.stdout.decode(errors="replace")


def _status(status: str, keyword: str) -> list[str] | None:
    """The fields after `[GNUPG:] KEYWORD` on its first line, or None."""
    found = re.search(rf"^\[GNUPG:\] {keyword}(?: (.*))?$", status, re.MULTILINE)
    return (found.group(1) or "").split() if found else None


def _issuer(status: str) -> str:
    """The fingerprint of the key a signature names: ERRSIG's last field (gpg >= 2.2.7, for
    signatures that carry it, as Armbian's do), else the key considered, else the key id."""
    errsig = _status(status, "ERRSIG")
    if errsig and len(errsig) >= 7 and re.fullmatch(r"[0-9A-F]{40,64}", errsig[6]):
        return errsig[6]
    considered = _status(status, "KEY_CONSIDERED")
    if considered:
        return considered[0]
    for keyword in ("NO_PUBKEY", "BADSIG", "ERRSIG"):
        fields = _status(status, keyword)
        if fields:
            return fields[0]
    return "?"


def verify_signature(data: Path, signature: Path, keys: Keys, what: str | None = None) -> str:
    """Verify a detached signature over `data`; return the fingerprint of the primary key that
    made it. A signature by a key not in `keys` raises UnknownSigner, one that does not match
    the file BadSignature."""
    what = what or data.name
    log.info(f"checking the signature of {what}")
    code, status = _gpgv(data, signature, keys)
    valid = _status(status, "VALIDSIG")
    if code == 0 and valid:
        # VALIDSIG: the signing (sub)key's fingerprint first, the primary key's last.
        fingerprint = valid[-1]
        log.info(f"signature good: {what} signed by {key_name(fingerprint)}")
        return fingerprint
    _refuse(status, what, keys)


def known_signer(signature: Path, keys: Keys, what: str) -> str:
    """Whether a signature was made by one of `keys`, before the file it signs is downloaded:
    gpgv over an empty file says BAD for a known key and NO_PUBKEY for an unknown one. Returns
    the signing key's fingerprint; raises UnknownSigner, or BuildError for what is not a
    signature. It proves nothing about the file: verify_signature does that afterwards."""
    with tempfile.TemporaryDirectory(prefix="build-image-asc-") as tmp:
        empty = Path(tmp) / "empty"
        empty.touch()
        _, status = _gpgv(empty, signature, keys)
    if _status(status, "BADSIG") is not None or _status(status, "VALIDSIG") is not None:
        return _issuer(status)
    _refuse(status, what, keys)


def _refuse(status: str, what: str, keys: Keys) -> NoReturn:
    if _status(status, "NO_PUBKEY") is not None:
        raise keys.unknown(_issuer(status), what)
    if _status(status, "BADSIG") is not None:
        raise BadSignature(f"BAD signature on {what} (key {_issuer(status)}): the file is not "
                           f"what its signer signed")
    if _status(status, "NODATA") is not None:
        raise BuildError(f"the signature of {what} is not an OpenPGP signature: the .asc file "
                         f"is damaged or not a signature")
    lines = status.strip().splitlines()
    raise BuildError(f"could not verify the signature of {what} with {keys.describe()}: "
                     f"{lines[-1] if lines else 'gpgv failed'}")
