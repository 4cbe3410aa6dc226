"""A temporary card for the first-boot wizard's tests (tests/test_firstboot*.py): a root
directory with its own passwd, shadow and hostname, and the card's own zipapp to run on a
pseudo-terminal against it. conftest.py makes `card` and `wizard_program` fixtures of every
test."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pexpect
import pytest

from builder.firstboot import bundle
from builder.firstboot.answers import _crypt
from builder.firstboot.card import COOKIE_SECRET, CREDENTIALS, PRESEED, SETTINGS, STAMP

PYTHON = sys.executable        # the test venv's, with jupyter_server: the card's venv here
UID = 1000
LOGIN = "l0gin pä$$ 'q\"uo;te` #x"         # shell metacharacters, quotes, non-ASCII, '#'
JUPYTER = "jupyter-Pässwort $(rm -rf /)"


@pytest.fixture(scope="session")
def wizard_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zipapp the card gets (customize.d/50-install-firstboot.host), run by the tests."""
    program = tmp_path_factory.mktemp("bundle") / "firstboot.pyz"
    bundle.build(program)
    return program


@dataclass
class Card:
    root: Path
    program: Path

    def shadow(self, user: str) -> str:
        for line in (self.root / "etc/shadow").read_text().splitlines():
            if line.startswith(f"{user}:"):
                return line.split(":")[1]
        raise AssertionError(f"{user} not in shadow")

    def login_accepts(self, password: str) -> bool:
        hashed = self.shadow("jupyter")
        return _crypt(password.encode(), hashed.encode()).decode() == hashed

    def credentials(self) -> dict[str, str]:
        return dict(json.loads((self.root / CREDENTIALS).read_text()))

    def cookie_secret(self) -> bytes:
        path = self.root / COOKIE_SECRET
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        return path.read_bytes()

    def untouched(self) -> None:
        """Nothing of setup happened: no credentials, no stamp, passwords still locked."""
        assert not (self.root / CREDENTIALS).exists()
        assert not (self.root / STAMP).exists()
        assert self.shadow("jupyter") == "!"
        assert (self.root / "etc/hostname").read_text() == "orangepipcplus\n"

    def settings(self, **changes: object) -> None:
        path = self.root / SETTINGS
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))

    def preseed(self, text: str) -> Path:
        path = self.root / PRESEED
        path.write_text(text)
        path.chmod(0o600)
        return path

    def wizard(self, *args: str, console: str = "ttyT0", env: dict[str, str] | None = None,
               jupyter_python: str = PYTHON) -> pexpect.spawn:
        child = pexpect.spawn(
            PYTHON, [str(self.program), "--root", str(self.root), "--jupyter-python",
                     jupyter_python, "--console", console, *args],
            env={**os.environ, **(env or {})}, encoding="utf-8", codec_errors="replace", timeout=60,
            dimensions=(50, 200))
        child.logfile_read = open(self.root.parent / f"{console}.log", "a")  # noqa: SIM115
        return child

    def boot(self, console: str = "ttyT0", env: dict[str, str] | None = None,
             jupyter_python: str = PYTHON) -> pexpect.spawn:
        return self.wizard("--boot", console=console, env=env, jupyter_python=jupyter_python)

    def begin(self, console: str = "ttyT0", **kwargs: object) -> pexpect.spawn:
        """A wizard at its first question, Enter pressed at the banner."""
        child = self.boot(console, **kwargs)  # type: ignore[arg-type]
        child.expect("Press Enter to begin setup")
        child.sendline("")
        child.expect_exact("Login password for jupyter: ")
        return child


@pytest.fixture
def card(tmp_path: Path, wizard_program: Path) -> Iterator[Card]:
    if os.geteuid() != 0:
        pytest.skip("needs root: chpasswd --root changes a card's shadow file by chroot(2)")
    if shutil.which("chpasswd") is None:
        pytest.skip("chpasswd is missing: apt-get install passwd")
    root = tmp_path / "card"
    for d in ("etc/orangepi-jupyter", "boot", "var/lib/jupyter", "var/lib/orangepi-jupyter",
              "run", "home/jupyter", "usr/share"):
        (root / d).mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n"
                                     f"jupyter:x:{UID}:{UID}:Jupyter:/home/jupyter:/bin/bash\n")
    (root / "etc/group").write_text(f"root:x:0:\njupyter:x:{UID}:\n")
    (root / "etc/shadow").write_text("root:$1$armbian$fakehashofroot1234:20000:0:99999:7:::\n"
                                     "jupyter:!:20000:0:99999:7:::\n")
    (root / "etc/gshadow").write_text("root:*::\njupyter:!::\n")
    (root / "etc/shadow").chmod(0o640)
    (root / "etc/hostname").write_text("orangepipcplus\n")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\torangepipcplus\n")
    (root / "usr/share/zoneinfo").symlink_to("/usr/share/zoneinfo")
    os.chown(root / "home/jupyter", UID, UID)
    os.chown(root / "var/lib/jupyter", UID, UID)
    (root / SETTINGS).write_text(json.dumps({
        "user": "jupyter", "venv": "/opt/jupyter", "port": 8888, "base_url": "/",
        "board": "Orange Pi PC Plus", "consoles": [{"device": "ttyS0", "baud": 115200}],
        "root_password": "locked", "min_password_length": 8, "answer_timeout": 60,
        "unattended": "wait", "unattended_after": 900}))
    yield Card(root, wizard_program)


def finished(child: pexpect.spawn, code: int = 0) -> str:
    child.expect(pexpect.EOF, timeout=120)
    child.close()
    assert child.exitstatus == code, child.before
    return str(child.before)
