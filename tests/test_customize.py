"""customize.d/ discovery and overlay paths, without an image: the rules users rely on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from builder.boards import load_catalog
from builder.config import load_config
from builder.customize import (
    config_env,
    find_scripts,
    read_outputs,
    render_templates,
    template_context,
)
from builder.errors import BuildError
from builder.inside import in_root


def script(directory: Path, name: str, body: str = "#!/bin/sh\n", mode: int = 0o755) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text(body)
    path.chmod(mode)
    return path


def test_order_kinds_skips_and_replacement(tmp_path: Path) -> None:
    builtin, mine = tmp_path / "builtin", tmp_path / "mine"
    script(builtin, "10-a.chroot")
    script(builtin, "20-b.host.sh")
    script(builtin, "30-c.chroot.disabled")
    script(builtin, ".hidden.chroot")
    script(mine, "20-b.host.sh", "#!/bin/sh\necho mine\n")
    script(mine, "15-x.chroot.py", "#!/usr/bin/python3\n")
    found = find_scripts([builtin, mine])
    assert [(s.name, s.where) for s in found] == [
        ("10-a.chroot", "chroot"), ("15-x.chroot.py", "chroot"), ("20-b.host.sh", "host")]
    assert found[2].path.parent == mine, "a user script replaces the built-in of that name"


def test_a_name_without_a_number_is_refused(tmp_path: Path) -> None:
    script(tmp_path, "setup.chroot")
    with pytest.raises(BuildError, match=r"setup.chroot: a customize script's name must be "
                                         r"NN-name.chroot"):
        find_scripts([tmp_path])


def test_scripts_below_50_run_before_the_overlays(tmp_path: Path) -> None:
    for name in ("05-a.chroot", "49-b.host", "50-c.chroot", "100-d.chroot"):
        script(tmp_path, name)
    found = find_scripts([tmp_path])
    assert [(s.name, s.before_overlays) for s in found] == [
        ("05-a.chroot", True), ("49-b.host", True), ("50-c.chroot", False),
        ("100-d.chroot", False)]


def test_settings_reach_shell_scripts_as_variables() -> None:
    env = config_env(load_config(overrides=["jupyter.port=9999", "apt.proxy=null"]).to_dict())
    assert env["IMAGE_CONFIG_JUPYTER_PORT"] == "9999"
    assert env["IMAGE_CONFIG_APT_PROXY"] == ""
    assert env["IMAGE_CONFIG_VENV_SYSTEM_SITE_PACKAGES"] == "true"
    assert env["IMAGE_CONFIG_PACKAGES_PIP"].split() == ["jupyterlab", "notebook>=7,<8",
                                                         "ipykernel", "ipywidgets"]


def test_script_outputs_become_files_and_manifest_sections(tmp_path: Path) -> None:
    (tmp_path / "manifest").mkdir(parents=True)
    (tmp_path / "requirements.txt").write_text("x==1\n")
    (tmp_path / "manifest/python.json").write_text('{"version": "3.13.5"}')
    files, sections = read_outputs(tmp_path)
    assert list(files) == ["requirements.txt"] and sections == {"python": {"version": "3.13.5"}}
    (tmp_path / "manifest/bad.json").write_text("{")
    with pytest.raises(BuildError, match=r"manifest/bad.json that is not JSON"):
        read_outputs(tmp_path)
    (tmp_path / "manifest/bad.json").unlink()
    (tmp_path / "manifest/packages.json").write_text("[]")
    with pytest.raises(BuildError, match=r"manifest's 'packages' is the build's own"):
        read_outputs(tmp_path)
    (tmp_path / "manifest/packages.json").unlink()
    (tmp_path / "passwd").symlink_to("/etc/passwd")     # as the host would resolve it
    with pytest.raises(BuildError, match=r"passwd is not a regular file"):
        read_outputs(tmp_path)
    (tmp_path / "passwd").unlink()
    (tmp_path / "img.zst.sha256").write_text("0" * 64)
    with pytest.raises(BuildError, match=r"the build writes that name itself"):
        read_outputs(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"customize directory .* does not exist"):
        find_scripts([tmp_path / "nope"])


def test_builtin_scripts_and_templates_pass_their_own_checks() -> None:
    repo = Path(__file__).resolve().parent.parent
    assert find_scripts([repo / "customize.d"])
    config = load_config()
    board, _ = load_catalog().lookup("orangepi5")
    rendered = render_templates([repo / "overlays"], template_context(config, board))
    assert any("BOARD=orangepi5" in text for text in rendered.values())


def rendered_jupyter(*overrides: str) -> tuple[str, str]:
    """jupyter.service and Jupyter's settings as the builder renders them."""
    repo = Path(__file__).resolve().parent.parent
    board, _ = load_catalog().lookup("orangepi5")
    rendered = render_templates([repo / "overlays"],
                                template_context(load_config(overrides=overrides), board))
    found = {path.name: text for path, text in rendered.items()}
    return found["jupyter.service.j2"], found["jupyter_server_config.py.j2"]


def test_jupyter_culls_idle_kernels_and_fails_closed() -> None:
    unit, settings = rendered_jupyter()
    assert "\nEnvironment=TRAITLETS_APPLICATION_RAISE_CONFIG_FILE_ERROR=1\n" in unit
    assert "c.MappingKernelManager.cull_idle_timeout = 3600\n" in settings
    assert "c.MappingKernelManager.cull_interval = 300\n" in settings
    assert 'c.ServerApp.cookie_secret_file = COOKIE_SECRET\n' in settings
    compile(settings, "jupyter_server_config.py", "exec")
    unit, settings = rendered_jupyter("jupyter.cull_idle_minutes=2.5")
    assert "cull_idle_timeout = 150\n" in settings and "cull_interval = 150\n" in settings
    unit, settings = rendered_jupyter("jupyter.cull_idle_minutes=0")
    assert "cull_idle_timeout" not in settings
    compile(settings, "jupyter_server_config.py", "exec")


def test_every_jupyter_setting_is_one_jupyter_knows() -> None:
    """A misspelt setting would only be warned about in the journal and then ignored: each
    one the rendered file sets is a configurable trait of the real jupyter_server's class."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_server.auth.identity import IdentityProvider, PasswordIdentityProvider
    from jupyter_server.serverapp import ServerApp
    from jupyter_server.services.kernels.kernelmanager import MappingKernelManager
    from traitlets.config import Config

    classes = {cls.__name__: cls for cls in (ServerApp, IdentityProvider,
                                             PasswordIdentityProvider, MappingKernelManager,
                                             KernelSpecManager)}
    _, settings = rendered_jupyter()
    config = Config()
    exec(compile(settings, "jupyter_server_config.py", "exec"), {"get_config": lambda: config})
    assert config.MappingKernelManager.cull_idle_timeout == 3600
    for section, values in config.items():
        traits = classes[section].class_traits(config=True)
        for name in values:
            assert name in traits, f"{section}.{name} is not a setting of {section}"


def test_the_package_finds_the_top_level_directories() -> None:
    """In a checkout the package reaches customize.d/ and overlays/ through its links; a wheel
    copies what they hold, and a link inside them would arrive as a plain file (systemd would
    not take a unit's .wants entry then): the built-in directories hold none."""
    from builder import customize
    repo = Path(__file__).resolve().parent.parent
    # The directories themselves, not the links: the step cache's digest of a link would be
    # its target's name, and a changed overlay would not change the key.
    assert repo / "customize.d" == customize.BUILTIN_CUSTOMIZE
    assert repo / "overlays" == customize.BUILTIN_OVERLAYS
    links = [p for top in ("customize.d", "overlays") for p in (repo / top).rglob("*")
             if p.is_symlink()]
    assert links == []


def test_in_root_follows_links_inside_the_image(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (root / "var").mkdir()
    os.symlink("/run", root / "var/run")             # absolute, as Debian has it
    (root / "etc").mkdir()
    os.symlink("../../../../../../..", root / "etc/up")
    assert in_root(root, "var/run/x") == root / "run/x"
    assert in_root(root, "/etc/up/etc") == root / "etc"   # .. stops at the image's /
    assert in_root(root, "../../etc/passwd") == root / "etc/passwd"


def test_build_only_files_are_found_through_the_images_links(tmp_path: Path) -> None:
    """finalize's globs ("home/*/.bash_history") follow links the way the image does: a home
    that is an absolute link lands in the image, never on the host."""
    from builder.finish import image_glob
    root = tmp_path / "root"
    (root / "home/ann").mkdir(parents=True)
    (root / "home/ann/.bash_history").write_text("secret\n")
    (root / "srv/bob").mkdir(parents=True)
    (root / "srv/bob/.bash_history").write_text("secret\n")
    os.symlink("/srv/bob", root / "home/bob")           # absolute: the image's /srv
    host = tmp_path / "host-home"
    host.mkdir()
    (host / ".bash_history").write_text("the host's own\n")
    os.symlink(str(host), root / "home/eve")            # would be the host's, read naively
    found = sorted(image_glob(root, "home/*/.bash_history"))
    assert found == [root / "home/ann/.bash_history", root / "srv/bob/.bash_history"]


def test_host_scripts_see_where_pip_looks_not_what_it_chooses(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    from types import SimpleNamespace

    from builder.pipeline import _host_env
    monkeypatch.setenv("PIP_INDEX_URL", "http://index.example/simple")
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("PIP_NO_DEPS", "1")
    monkeypatch.setenv("BUILD_IMAGE_SECRET", "x")
    ctx = SimpleNamespace(cache=SimpleNamespace(root=tmp_path),
                          options=SimpleNamespace(offline=True))
    env = _host_env(ctx)  # type: ignore[arg-type]
    assert env["PIP_INDEX_URL"] == "http://index.example/simple"
    assert env["https_proxy"] == "http://proxy.example:3128"
    assert "PIP_NO_DEPS" not in env and "BUILD_IMAGE_SECRET" not in env
    assert env["IMAGE_OFFLINE"] == "1" and env["IMAGE_CACHE"] == str(tmp_path / "host")


def test_host_scripts_declare_every_builder_module_they_run() -> None:
    """A host script's `code` line is what its stage key covers of the builder: each module
    the program it starts loads must be in it, or a change there would reuse a stale stage.
    Measured in a fresh interpreter, importing what the script runs (`-m builder.X`,
    `import builder.X`)."""
    import json
    import re
    import subprocess
    import sys

    from builder.customize import BUILTIN_CUSTOMIZE
    checked = 0
    for found in find_scripts([BUILTIN_CUSTOMIZE]):
        if found.where != "host" or found.code is None:
            continue
        modules = {m for pair in re.findall(r"-m (builder[\w.]*)|import (builder[\w.]*)",
                                            found.path.read_text()) for m in pair if m}
        assert modules, found.name
        probe = (f"import json, sys, {', '.join(sorted(modules))}; print(json.dumps(sorted("
                 f"m.__file__ for n, m in sys.modules.items() if n.startswith('builder.'))))")
        files = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                          text=True, check=True).stdout)
        package = Path(__import__("builder").__file__).parent
        used = {Path(f).relative_to(package).as_posix() for f in files}
        declared = set(found.code)
        undeclared = {name for name in used if name not in declared and not any(
            name.startswith(entry) for entry in declared if entry.endswith("/"))}
        assert undeclared == set(), found.name
        checked += 1
    assert checked >= 2


def test_an_undeclared_host_script_depends_on_every_module_and_subpackage() -> None:
    """Without a `code` line a host script's stage key covers all of builder/: the
    subpackages (first boot, flash) as DIR/, not only the top-level modules."""
    from builder import stages
    names = stages.all_code()
    assert {"firstboot/", "flash/", "pipeline.py", "files.py"} <= set(names)
    assert not [n for n in names if not (n.endswith(".py") or n.endswith("/"))]
    assert "__pycache__/" not in names and names == sorted(names)
