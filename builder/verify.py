"""Checking what was downloaded: sha256 digests and Armbian's detached OpenPGP signatures."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from builder import log
from builder.errors import BuildError
from builder.files import sha256_of
from builder.run import run

# Armbian's own signing keys, to name them in messages. Trust comes only from the keyring the
# user gives: a signature is accepted when it verifies against that keyring, whatever the key.
ARMBIAN_KEYS = {
    "DF00FAF1C577104B50BF1D0093D6889F9F0E78D5": "Igor Pecovnik (Armbian, older images)",
    "8CFA83D13EB2181EEF5843E41EB30FAF236099FE": "Armbian Repository Signing Key (2025)",
}


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


def verify_signature(data: Path, signature: Path, keyring: Path) -> str:
    """Verify a detached signature with gpgv against `keyring`; return the fingerprint of the
    key that made it.

    gpgv is made for exactly this: it trusts every key in the keyring it is given and nothing
    else, and never touches the user's ~/.gnupg. It reads only binary keyrings, so an armored
    export (what Armbian publishes) is converted first.
    """
    with tempfile.TemporaryDirectory(prefix="build-image-gpg-") as tmp:
        binary = keyring
        if keyring.read_bytes()[:64].lstrip().startswith(b"-----BEGIN PGP"):
            binary = Path(tmp) / "keyring.gpg"
            run(["gpg", "--batch", "--yes", "--homedir", tmp, "--dearmor", "--output", binary,
                 keyring], capture=True, what=f"read the armored keyring {keyring}")
        log.info(f"checking the signature of {data.name}")
        proc = run(["gpgv", "--homedir", tmp, "--status-fd", "1", "--keyring", binary,
                    signature, data], capture=True, check=False)
    status = proc.stdout.decode(errors="replace")
    valid = re.search(r"^\[GNUPG:\] VALIDSIG (\S+)", status, re.MULTILINE)
    if proc.returncode == 0 and valid:
        fingerprint = valid.group(1)
        log.info(f"signature good: {data.name} signed by {fingerprint} "
                 f"{ARMBIAN_KEYS.get(fingerprint, '')}".rstrip())
        return fingerprint
    if "NO_PUBKEY" in status:
        key = re.search(r"NO_PUBKEY (\S+)", status)
        raise BuildError(
            f"signature of {data.name} is by key {key.group(1) if key else '?'}, which is not in "
            f"{keyring}: add Armbian's key to the keyring (or check --gpg-keyring)"
        )
    if "BADSIG" in status:
        raise BadSignature(f"BAD signature on {data.name}: the file is not what its publisher "
                           f"signed; do not use it")
    raise BuildError(f"could not verify the signature of {data.name} with {keyring}: "
                     f"{status.strip().splitlines()[-1] if status.strip() else 'gpgv failed'}")
