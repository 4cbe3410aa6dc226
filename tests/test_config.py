"""Settings: defaults, --config files, --set, flags; every bad value is one message that names
where it came from, the key path, the value and what would do."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.config import load_config, parse_size
from builder.errors import BuildError


def test_defaults_are_the_appliance() -> None:
    config = load_config()
    assert config.board is None
    assert config.base.source == "armbian"
    assert (config.base.release, config.base.branch, config.base.variant) == \
        ("trixie", "current", "minimal")
    assert config.jupyter.port == 8888 and config.jupyter.user == "jupyter"
    assert config.venv.path == "/opt/jupyter" and config.venv.system_site_packages is True
    assert config.image.headroom == 3 << 30
    for package in ("build-essential", "python3-dev", "libzmq3-dev", "python3-numpy",
                    "python3-geopandas", "python3-osmnx"):
        assert package in config.packages.apt
    assert "jupyterlab" in config.packages.pip and "notebook>=7,<8" in config.packages.pip
    with pytest.raises(AttributeError):
        config.jupyter.port = 1  # type: ignore[misc]


BAD_OVERRIDES = [
    ("jupyter.port=abc", "--set jupyter.port: 'abc' is not a port number (1-65535)"),
    ("jupyter.port=70000", "--set jupyter.port: 70000 is not a port number (1-65535)"),
    ("jupyter.port=true", "--set jupyter.port: True is not a port number (1-65535)"),
    ("jupyter.prot=9000", "--set jupyter.prot: unknown key (did you mean jupyter.port?)"),
    ("jupyter.user=root",
     "--set jupyter.user: 'root' is not allowed: Jupyter must not run as root"),
    ("jupyter.user=Bad User", "--set jupyter.user: 'Bad User' is not a valid user name"),
    ("jupyter.base_url=lab", "--set jupyter.base_url: 'lab' must start and end with /"),
    ("jupyter.ip=everywhere", "--set jupyter.ip: 'everywhere' is not an IP address"),
    ("jupyter.cull_idle_minutes=-5", "--set jupyter.cull_idle_minutes: -5 must be 0 (never) "
                                     "or more"),
    ("image.headroom=3GB", "--set image.headroom: '3GB' is not a size"),
    ("image.compression=rar", "--set image.compression: 'rar' is not one of xz, zstd, gzip, none"),
    ("image.compression_level=12",
     "--set image.compression_level: 12 is out of range for xz (0-9)"),
    ("venv.path=opt/jupyter", "--set venv.path: 'opt/jupyter' must be an absolute path"),
    ("venv.system_site_packages=maybe", "--set venv.system_site_packages: 'maybe' is not true"),
    ("venv=3", "--set venv: 3 is not a section"),
    ("packages.apt=vim", "--set packages.apt: 'vim' is not a list of strings"),
    ("packages.pip=[ok, 'bad;rm -rf /']",
     "--set packages.pip: 'bad;rm -rf /' is not a package name"),
    ("jupyter.user=1st", "--set jupyter.user: '1st' is not a valid user name"),
    ("jupyter.groups=[dialout, 'Wheel Users']",
     "--set jupyter.groups: 'Wheel Users' is not a valid group name"),
    ("packages.check_imports=[numpy, PIL.Image, 'not-a-module']",
     "--set packages.check_imports: 'not-a-module' is not a Python module name"),
    ("venv.kernel_name='Python 3'", "--set venv.kernel_name: 'Python 3' is not a valid name"),
    ("customize.builtin=sometimes", "--set customize.builtin: 'sometimes' is not true"),
    ("base.sha256=abc", "--set base.sha256: 'abc' is not a sha256 digest"),
    ("base.armbian_mirror=ftp://x", "--set base.armbian_mirror: 'ftp://x' is not an http(s) URL"),
    ("base.release=Trixie!", "--set base.release: 'Trixie!' is not a valid name"),
    ("download.timeout=0", "--set download.timeout: 0 must be greater than 0"),
    ("firstboot.root_password=open", "--set firstboot.root_password: 'open' is not one of "
                                     "locked, same"),
    ("firstboot.min_password_length=4", "--set firstboot.min_password_length: 4 is too short"),
    ("firstboot.unattended=open", "--set firstboot.unattended: 'open' is not one of wait, token"),
    ("firstboot.preseed=http://x/p.conf", "--set firstboot.preseed: 'http://x/p.conf' is not a "
                                          "local file path"),
    ("download.retries=-1", "--set download.retries: -1 must be 0 or more"),
    ("jupyter.memory_max=900M", "--set jupyter.memory_max: '900M' is not a share of the "
                                "board's memory"),
    ("firstboot.consoles=[local, usb]", "--set firstboot.consoles: 'usb' is neither local, "
                                        "gadget nor a console device"),
    ("base.verify=gpg", "--set base.verify: 'gpg' is not one of signature, sha256, none"),
    ("base.gpg_keyring=[/k.gpg, 'https://x/k.gpg']",
     "--set base.gpg_keyring: 'https://x/k.gpg' is not a local file path"),
    ("base.gpg_keyring=3", "--set base.gpg_keyring: 3 is not a list of strings"),
    ("download.retries=many", "--set download.retries: 'many' is not a whole number of retries"),
    ("nothing=1", "--set nothing: unknown key (known: board, base, packages"),
    ("jupyter", "--set 'jupyter': expected KEY.PATH=VALUE"),
    ("jupyter..port=1", "--set 'jupyter..port=1': expected KEY.PATH=VALUE"),
]


@pytest.mark.parametrize(("override", "message"), BAD_OVERRIDES)
def test_bad_override(override: str, message: str) -> None:
    with pytest.raises(BuildError) as error:
        load_config(overrides=[override])
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)


GOOD_OVERRIDES = [
    # The level is for compressors: the default one must not stop `--compress none`.
    ("image.compression=none", lambda c: c.image.compression == "none"),
    ("firstboot.unattended=token", lambda c: c.firstboot.unattended == "token"),
    ("jupyter.port=9000", lambda c: c.jupyter.port == 9000),
    ("jupyter.ip=::", lambda c: c.jupyter.ip == "::"),
    ("jupyter.base_url=/lab/", lambda c: c.jupyter.base_url == "/lab/"),
    ("image.headroom=512MiB", lambda c: c.image.headroom == 512 << 20),
    ("image.headroom=1048576", lambda c: c.image.headroom == 1 << 20),
    ("packages.pip=[jupyterlab, 'numba>=0.60']", lambda c: c.packages.pip[1] == "numba>=0.60"),
    ("base.sha256=" + "AB" * 32, lambda c: c.base.sha256 == "ab" * 32),
    ("base.armbian_mirror=http://mirror.local/armbian/",
     lambda c: c.base.armbian_mirror == "http://mirror.local/armbian"),
    ("download.timeout=2.5", lambda c: c.download.timeout == 2.5),
    ("cache.dir=/var/cache/x", lambda c: c.cache.dir == "/var/cache/x"),
    ("base.verify=none", lambda c: c.base.verify == "none"),
    # One keyring, as settings files wrote it before it became a list, or none.
    ("base.gpg_keyring=/etc/armbian.gpg", lambda c: c.base.gpg_keyring == ("/etc/armbian.gpg",)),
    ("base.gpg_keyring=null", lambda c: c.base.gpg_keyring == ()),
    ("base.gpg_keyring=[a.gpg, b.asc]", lambda c: c.base.gpg_keyring == ("a.gpg", "b.asc")),
]


@pytest.mark.parametrize(("override", "check"), GOOD_OVERRIDES)
def test_good_override(override: str, check) -> None:  # type: ignore[no-untyped-def]
    assert check(load_config(overrides=[override]))


def test_base_is_verified_by_signature_by_default() -> None:
    config = load_config()
    assert config.base.verify == "signature" and config.base.gpg_keyring == ()
    assert config.to_dict()["base"]["gpg_keyring"] == []


def test_sha256_level_needs_a_digest_for_a_file_of_your_own(tmp_path: Path) -> None:
    flags = {"base.source": "/srv/my.img.xz", "base.verify": "sha256"}
    with pytest.raises(BuildError, match=r"^command line: base.verify: 'sha256' needs the "
                                         r"digest of /srv/my.img.xz: pass --base-sha256 HEX"):
        load_config(flags=flags)
    assert load_config(flags={**flags, "base.sha256": "a" * 64}).base.verify == "sha256"
    # Armbian publishes a .sha beside each image.
    assert load_config(flags={"base.verify": "sha256"}).base.verify == "sha256"


def test_config_file_merges_key_by_key(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("board: orangepipc\njupyter:\n  port: 9999\npackages:\n  pip: [jupyterlab]\n")
    config = load_config([path])
    assert config.board == "orangepipc"
    assert config.jupyter.port == 9999
    assert config.jupyter.user == "jupyter"          # untouched keys keep their default
    assert config.packages.pip == ("jupyterlab",)    # a list replaces the whole list
    assert "python3-numpy" in config.packages.apt


def test_precedence_file_then_set_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("base:\n  release: bookworm\n  branch: edge\n  variant: server\n")
    later = tmp_path / "b.yaml"
    later.write_text("base:\n  variant: xfce\n")
    config = load_config([path, later], ["base.branch=vendor"], {"base.release": "noble",
                                                                 "base.variant": None})
    assert (config.base.release, config.base.branch, config.base.variant) == \
        ("noble", "vendor", "xfce")


def test_a_section_replaced_by_a_value(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("base: armbian\n")
    with pytest.raises(BuildError, match=rf"^{path}: base: 'armbian' is not a section"):
        load_config([path], flags={"base.release": "noble"})
    with pytest.raises(BuildError, match=r"^--set base: 'x' is not a section"):
        load_config(overrides=["base=x"], flags={"base.release": "noble"})


def test_flag_values_are_checked_too() -> None:
    with pytest.raises(BuildError, match=r"^command line: base.release: 'Trixie!' is not a"):
        load_config(flags={"base.release": "Trixie!"})
    with pytest.raises(BuildError, match=r"base.gpg_keyring: 'https://x/k.gpg' is not a local"):
        load_config(flags={"base.gpg_keyring": "https://x/k.gpg"})


def test_bad_value_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("jupyter:\n  port: abc\n")
    with pytest.raises(BuildError, match=rf"^{path}: jupyter.port: 'abc' is not a port number"):
        load_config([path])


def test_unknown_key_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("jupyter:\n  passwd: x\n")
    with pytest.raises(BuildError, match=rf"^{path}: jupyter.passwd: unknown key"):
        load_config([path])


@pytest.mark.parametrize(("text", "message"), [
    ("jupyter:\n  port: 1\n bad", "is not valid YAML at line 3"),
    ("- a\n- b\n", "must hold a mapping of settings"),
    ("jupyter: [1, 2]\n", "jupyter: list is not a section"),
])
def test_broken_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(BuildError, match=message):
        load_config([path])


def test_empty_file_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    assert load_config([path]) == load_config()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="not found: check the path given to --config"):
        load_config([tmp_path / "nope.yaml"])


def test_to_dict_is_plain_data() -> None:
    data = load_config().to_dict()
    assert isinstance(data["packages"]["apt"], list)
    assert data["jupyter"]["port"] == 8888


@pytest.mark.parametrize(("text", "size"), [("0", 0), ("10K", 10240), ("2 GiB", 2 << 30),
                                            ("7MiB", 7 << 20), (42, 42)])
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


# A key written twice at one level: YAML loaders keep the last and say nothing.


@pytest.mark.parametrize(("text", "line", "key", "first"), [
    ("jupyter:\n  port: 9000\n  user: jupyter\n  port: 8888\n", 4, "port", 2),
    ("jupyter:\n  port: 9000\nbase:\n  release: noble\njupyter:\n  ip: '*'\n", 5, "jupyter", 1),
    ("jupyter: {port: 9000, port: 8888}\n", 1, "port", 1),
])
def test_a_key_given_twice_in_a_file_is_refused(tmp_path: Path, text: str, line: int, key: str,
                                                first: int) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(BuildError) as error:
        load_config([path])
    assert str(error.value) == (
        f"config file {path}: line {line}: {key!r} is given twice at one level (first at line "
        f"{first}; the last would win silently): keep one")


def test_the_same_key_in_different_sections_or_merged_is_no_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    # `dir` twice, but in two sections; `<<` merges keys the mapping may override.
    path.write_text("output:\n  dir: o\ncache:\n  dir: c\n"
                    "jupyter:\n  <<: {port: 9000, user: lab}\n  port: 9001\n")
    config = load_config([path])
    assert (config.jupyter.port, config.jupyter.user) == (9001, "lab")


def test_a_key_given_twice_in_a_set_value_is_refused() -> None:
    with pytest.raises(BuildError, match=r"^--set 'jupyter=\{port: 1, port: 2\}': 'port' is "
                                         r"given twice: keep one$"):
        load_config(overrides=["jupyter={port: 1, port: 2}"])


def test_the_defaults_have_no_key_twice() -> None:
    from importlib import resources

    from builder.config import load_yaml
    text = resources.files("builder").joinpath("defaults.yaml").read_text(encoding="utf-8")
    assert load_yaml(text)["jupyter"]["port"] == 8888


# Paths in a --config file are relative to the file; on the command line, to the current
# directory.


# Every setting that names something on this machine, and what it must be there.
HOST_PATHS = {"base.source": "file", "base.armbian_index": "file", "base.gpg_keyring": "file",
              "firstboot.preseed": "file", "customize.scripts": "directory",
              "customize.overlays": "directory", "output.dir": "new directory",
              "cache.dir": "new directory"}


def test_the_settings_that_are_paths() -> None:
    import dataclasses
    import typing

    from builder.config import Config
    from builder.config_values import Rule

    found = {}
    for section in dataclasses.fields(Config):
        if not (isinstance(section.type, str) and section.type.endswith("Config")):
            continue
        cls = typing.get_type_hints(Config)[section.name]
        for name, hint in typing.get_type_hints(cls, include_extras=True).items():
            rule = next((a for a in getattr(hint, "__metadata__", ()) if isinstance(a, Rule)),
                        None)
            if rule is not None and rule.path is not None:
                found[f"{section.name}.{name}"] = rule.path
    assert found == HOST_PATHS


def config_dir_with_files(tmp_path: Path) -> Path:
    conf = tmp_path / "conf"
    for directory in ("scripts", "overlay"):
        (conf / directory).mkdir(parents=True)
    for name in ("answers.conf", "key.gpg", "base.img.xz", "index.json"):
        (conf / name).write_text("x")
    return conf


SETTINGS_WITH_PATHS = (
    "base:\n  source: base.img.xz\n  armbian_index: index.json\n  gpg_keyring: [key.gpg]\n"
    "firstboot:\n  preseed: answers.conf\n"
    "customize:\n  scripts: [scripts]\n  overlays: [./overlay]\n"
    "output:\n  dir: out\ncache:\n  dir: ../cache\n")


def test_paths_in_a_config_file_are_relative_to_its_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = config_dir_with_files(tmp_path)
    (conf / "site.yaml").write_text(SETTINGS_WITH_PATHS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config([Path("../conf/site.yaml")])
    assert config.base.source == str(conf / "base.img.xz")
    assert config.base.armbian_index == str(conf / "index.json")
    assert config.base.gpg_keyring == (str(conf / "key.gpg"),)
    assert config.firstboot.preseed == str(conf / "answers.conf")
    assert config.customize.scripts == (str(conf / "scripts"),)
    assert config.customize.overlays == (str(conf / "overlay"),)
    assert config.output.dir == str(conf / "out")
    assert Path(config.cache.dir or "") == conf / "../cache"
    # What names no path is left alone; an absolute path stays what it is.
    (conf / "words.yaml").write_text(
        f"base:\n  source: debian\n  armbian_index: https://example.org/i.json\n"
        f"firstboot:\n  preseed: {conf / 'answers.conf'}\n")
    config = load_config([conf / "words.yaml"])
    assert (config.base.source, config.base.armbian_index, config.firstboot.preseed) == \
        ("debian", "https://example.org/i.json", str(conf / "answers.conf"))


def test_paths_on_the_command_line_stay_relative_to_the_current_directory(
        tmp_path: Path) -> None:
    conf = config_dir_with_files(tmp_path)
    (conf / "site.yaml").write_text(SETTINGS_WITH_PATHS)
    config = load_config([conf / "site.yaml"], ["firstboot.preseed=mine.conf",
                                                "customize.scripts=[here]"],
                         {"base.source": "my.img", "output.dir": "build", "cache.dir": "c"})
    assert (config.firstboot.preseed, config.customize.scripts, config.base.source,
            config.output.dir, config.cache.dir) == \
        ("mine.conf", ("here",), "my.img", "build", "c")
    # The defaults' output directory is where build-image runs, as before.
    assert load_config().output.dir == "out"


@pytest.mark.parametrize(("text", "message"), [
    ("firstboot:\n  preseed: answer.conf\n",
     "{file}: firstboot.preseed: 'answer.conf': {conf}/answer.conf does not exist (a relative "
     "path in a config file is taken from the file's directory): fix the path to name a file"),
    ("base:\n  gpg_keyring: [key.gpg, scripts]\n",
     "{file}: base.gpg_keyring: 'scripts': {conf}/scripts is a directory, not a file (a "
     "relative path in a config file is taken from the file's directory): fix the path to "
     "name a file"),
    ("customize:\n  overlays: [answers.conf]\n",
     "{file}: customize.overlays: 'answers.conf': {conf}/answers.conf is not a directory (a "
     "relative path in a config file is taken from the file's directory): fix the path to "
     "name a directory"),
    ("base:\n  source: /nowhere/base.img\n",
     "{file}: base.source: '/nowhere/base.img': /nowhere/base.img does not exist: fix the "
     "path to name a file"),
])
def test_a_bad_path_in_a_config_file_names_the_file_and_key(tmp_path: Path, text: str,
                                                            message: str) -> None:
    conf = config_dir_with_files(tmp_path)
    (conf / "site.yaml").write_text(text)
    with pytest.raises(BuildError) as error:
        load_config([conf / "site.yaml"])
    assert str(error.value) == message.format(file=conf / "site.yaml", conf=conf)


def test_where_a_value_was_given(tmp_path: Path) -> None:
    conf = config_dir_with_files(tmp_path)
    (conf / "site.yaml").write_text("firstboot:\n  preseed: answers.conf\n")
    config = load_config([conf / "site.yaml"], ["jupyter.port=9000"], {"base.release": "noble"})
    assert config.given_as("firstboot.preseed", "--preseed") == \
        f"{conf / 'site.yaml'}: firstboot.preseed"
    assert config.given_as("jupyter.port", "--port") == "--set jupyter.port"
    assert config.given_as("base.release", "--release") == "--release"
    assert config.given_as("base.branch", "--branch") == "base.branch"
    # Not a setting: neither in the scripts' JSON nor a key a file may set.
    assert "origins" not in config.to_dict()
    (conf / "bad.yaml").write_text("origins: {}\n")
    with pytest.raises(BuildError, match="origins: unknown key"):
        load_config([conf / "bad.yaml"])
