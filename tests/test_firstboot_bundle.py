"""The card's first-boot program as one file (builder/firstboot/bundle.py): a zipapp that the
image's own python3 runs with nothing but its standard library, the same bytes for the same
sources. Run here with the host's /usr/bin/python3 in isolated mode (-I -S: no site-packages,
no environment, not the checkout), as close to the card as a host gets."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

from builder.firstboot import bundle

SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "firstboot.pyz"
    bundle.build(path)
    return path


def card_python(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if not shutil.which(SYSTEM_PYTHON):
        pytest.skip(f"{SYSTEM_PYTHON} is missing (the card's interpreter)")
    return subprocess.run([SYSTEM_PYTHON, "-I", "-S", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})


def test_the_bundle_holds_the_package_and_nothing_else(program: Path, tmp_path: Path) -> None:
    package = {p.name for p in (REPO / "builder/firstboot").glob("*.py")} - {"bundle.py"}
    with zipfile.ZipFile(program) as archive:
        infos = archive.infolist()
        main = archive.read("__main__.py")
    names = [info.filename for info in infos]
    assert names == sorted(names)
    assert set(names) == {"__main__.py", "builder/__init__.py", "builder/files.py",
                          *(f"builder/firstboot/{name}" for name in package)}
    assert main == (REPO / "builder/firstboot/__main__.py").read_bytes()
    assert {info.date_time for info in infos} == {bundle.EPOCH}
    assert program.read_bytes().startswith(b"#!/usr/bin/python3\n")
    assert stat.S_IMODE(program.stat().st_mode) == 0o755
    again = tmp_path / "again.pyz"
    bundle.build(again)
    assert again.read_bytes() == program.read_bytes(), "the same sources make the same bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.pyz", "firstboot.pyz"], \
        "no temporary file is left"


def test_the_bundle_runs_on_the_standard_library_alone(program: Path, tmp_path: Path) -> None:
    shown = card_python(str(program), "--help", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: jupyter-setup")
    good, bad = tmp_path / "good.conf", tmp_path / "bad.conf"
    good.write_text("hostname = lab\nssh_key = ssh-ed25519 AAAA\n")
    bad.write_text("hostname = la b\n")
    checked = card_python(str(program), "--check", str(good), cwd=tmp_path)
    assert checked.returncode == 1
    assert checked.stderr == (f"{good}: line 2: 'ssh_key': 'ssh-ed25519 AAAA' is not an SSH "
                              f"public key line (e.g. the contents of ~/.ssh/id_ed25519.pub)\n")
    good.write_text("hostname = lab\njupyter_token = generate\n")
    assert card_python(str(program), "--check", str(good), cwd=tmp_path).returncode == 0
    checked = card_python(str(program), "--check", str(bad), cwd=tmp_path)
    assert checked.returncode == 1 and "'la b' is not a host name" in checked.stderr
    # Everything the program loads (the whole of it, not only what --check needs) comes from
    # the bundle or the standard library; cryptography (Debian's python3-cryptography on the
    # card) only when a certificate is made or read, not to start.
    probe = (f"import json, sys; sys.path.insert(0, {str(program)!r}); "
             f"import builder.firstboot.cli, builder.firstboot.session; "
             f"print(json.dumps({{n: getattr(m, '__file__', None) for n, m in "
             f"sys.modules.items() if n.partition('.')[0] not in sys.stdlib_module_names}}))")
    loaded = json.loads(card_python("-c", probe, cwd=tmp_path).stdout)
    assert set(loaded) == {"__main__", "builder", "builder.files", *(
        f"builder.firstboot{name}" for name in ("", ".answers", ".armbian_preset", ".card",
                                                ".cli", ".console", ".netconf",
                                                ".network", ".result", ".session",
                                                ".setup_drive", ".system", ".tls",
                                                ".wizard"))}
    assert all(f.startswith(f"{program}/") for n, f in loaded.items() if n != "__main__")


def test_jupyter_setup_is_a_link_to_the_bundle(program: Path, tmp_path: Path) -> None:
    """As on the card: /usr/local/sbin/jupyter-setup -> firstboot.pyz, started by its #!."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is missing (the card's interpreter)")
    link = tmp_path / "jupyter-setup"
    link.symlink_to(program)
    shown = subprocess.run([str(link), "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "--rotate-token" in shown.stdout, shown.stderr


def test_the_host_runs_the_package_as_a_module(tmp_path: Path) -> None:
    check = tmp_path / "check.conf"
    check.write_text("hostname = lab\n")
    result = subprocess.run([sys.executable, "-m", "builder.firstboot", "--check", str(check)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == f"{check}: ok\n", result.stderr


def test_the_install_scripts_key_covers_every_file_of_the_bundle() -> None:
    """The step cache reuses the image after 50-install-firstboot while its `code` line's
    files are unchanged: every file the bundle takes must be among them."""
    from builder.customize import BUILTIN_CUSTOMIZE, find_scripts
    script = next(s for s in find_scripts([BUILTIN_CUSTOMIZE])
                  if s.name == "50-install-firstboot.host")
    assert script.code is not None
    builder = REPO / "builder"
    for source in bundle.members().values():
        name = source.relative_to(builder).as_posix()
        assert name in script.code or any(
            name.startswith(entry) for entry in script.code if entry.endswith("/")), name
