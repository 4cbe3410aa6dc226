"""Where scripts run and files are laid into the image: customize.d/ and overlays/.

customize.d/ scripts run by number, then name. The name says where a script runs:

    NN-name.chroot[.sh|.py|...]   inside the image (chroot, under qemu-user-static)
    NN-name.host[.sh|.py|...]     on the build host, with the mounted image at $IMAGE_ROOT

NN is a number. overlays/ is laid into the image after the scripts numbered below 50 and
before those numbered 50 and above, so packages installed early cannot overwrite an overlay
file, and late scripts can use (enable, check) what the overlays brought.

Files ending in `.disabled` and dotfiles are skipped; any other name, or a script that is not
executable, is an error before the build starts. Every script gets this environment:

    IMAGE_BOARD    board id (orangepi5)          IMAGE_ARCH     armhf | arm64
    IMAGE_RELEASE  trixie, noble, ...            IMAGE_FAMILY   Armbian family (rockchip-rk3588)
    IMAGE_CONFIG   a JSON file {"config": settings, "board": catalog entry} (inside the image
                   for .chroot scripts); the settings are those the script declares (below)
    IMAGE_CONFIG_<SECTION>_<KEY>   each of them for shell scripts: IMAGE_CONFIG_JUPYTER_PORT=8888,
                   lists joined by spaces, true/false, empty for null
    IMAGE_OUTPUT   a directory: a file written there is published next to the image as
                   <image name>.<file name>, and manifest/<key>.json goes into the manifest
                   under <key>. Scripts hand files to each other in its parent, the work
                   directory /tmp/build-image: a directory of the build's workspace, mounted
                   there in every session, kept with each stage in the step cache.
    IMAGE_ROOT     the mounted root filesystem   (.host scripts only; paths in it through
                   `image-path PATH`, on their PATH: see builder/inside.py)
    IMAGE_CACHE    a directory of the build cache for downloads (.host scripts only)
    IMAGE_OFFLINE  1 with --offline: use the cache, no network (.host scripts only)
    IMAGE_BUILDER_PYTHON  the Python running the builder, with pip (.host scripts only)

overlays/ is copied into the root filesystem with modes and symlinks kept, owned by root.
A file ending in `.j2` is a Jinja2 template: it is rendered with `config` (the settings) and
`board` (the catalog entry) and written without the suffix. An unknown variable is an error,
found before the build starts by rendering every template once.

--customize DIR and --overlay DIR add directories after the built-in ones; a user script
with the same name as a built-in one replaces it.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from builder import log
from builder.boards import Board
from builder.chroot import Chroot
from builder.config import Config
from builder.errors import BuildError
from builder.inside import entry_in_root, in_root, remove_entry, write_file
from builder.run import stream
from builder.stages import BUILDER_DIR

# The package's customize.d and overlays are links to the repository's top-level directories
# in a checkout (and an editable install), and copies of them in a wheel (pyproject.toml).
# Resolved: messages name the real directory, and digests read what the link leads to.
BUILTIN_CUSTOMIZE = Path(str(importlib.resources.files("builder") / "customize.d")).resolve()
BUILTIN_OVERLAYS = Path(str(importlib.resources.files("builder") / "overlays")).resolve()
# The build's work directory (on the host, mounted here in every session) and where each
# script's copy and settings file go (the session's own /tmp).
WORK_IN_IMAGE = "/tmp/build-image"
SCRIPTS_IN_IMAGE = "/tmp/build-image-scripts"
# Scripts numbered below this run before overlays/ is laid in, the others after.
OVERLAY_POINT = 50


@dataclass(frozen=True)
class Script:
    path: Path
    where: str          # "chroot" or "host"
    number: int
    # What the script declares in `# build-image:` lines (see DIRECTIVES); None: undeclared,
    # which means everything.
    settings: tuple[str, ...] | None = None
    reads: tuple[str, ...] | None = None
    code: tuple[str, ...] | None = None
    keep: bool = False

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def before_overlays(self) -> bool:
        return self.number < OVERLAY_POINT


# Lines `# build-image: NAME VALUES...` among a script's first lines say what it depends on,
# for the step cache (builder/stages.py) and for what the script is given:
#   settings a.b c ...  the only settings it is given (a section name gives the whole
#                       section); none after the word: no settings. Undeclared: all of them.
#   reads NAME ...      the files of the work directory it reads; none: it reads none.
#                       Undeclared: all of them.
#   code FILE ...       for a host script, the builder's modules (builder/FILE) it runs;
#                       a subpackage as DIR/, for all of its modules. Undeclared: all of them.
#   keep                keep the image after it in the step cache.
DIRECTIVES = ("settings", "reads", "code", "keep")
DIRECTIVE = re.compile(r"#\s*build-image:\s*(\S+)(.*)$")


def _directives(path: Path) -> dict[str, tuple[str, ...]]:
    found: dict[str, tuple[str, ...]] = {}
    with open(path, "rb") as f:
        head = [next(f, b"") for _ in range(40)]
    for number, raw in enumerate(head, 1):
        match = DIRECTIVE.match(raw.decode(errors="replace").strip())
        if not match:
            continue
        name, values = match.group(1), tuple(match.group(2).split())
        if name not in DIRECTIVES:
            raise BuildError(f"{path}:{number}: unknown `build-image: {name}`; known: "
                             f"{', '.join(DIRECTIVES)}")
        found[name] = found.get(name, ()) + values
    return found


def _check_code(script: Path, name: str) -> None:
    """A `code` name must be one of the builder's files, or a directory of them written as
    DIR/: a typo would otherwise stop the build only when the script's key is made."""
    path = BUILDER_DIR / name
    inside = not Path(name).is_absolute() and ".." not in Path(name).parts
    if not inside or not (path.is_dir() if name.endswith("/") else path.is_file()):
        raise BuildError(f"{script}: `build-image: code` names {name}, which is not "
                         f"{'a directory' if name.endswith('/') else 'a file'} of the builder "
                         f"({BUILDER_DIR}; a directory ends in /)")


def _skipped(name: str) -> bool:
    return name.startswith(".") or name.endswith(".disabled") or name in ("README.md",)


def find_scripts(dirs: Sequence[Path]) -> list[Script]:
    """The scripts to run, in order; a later directory's script replaces one of the same
    name. Checked completely before anything runs."""
    chosen: dict[str, Script] = {}
    for directory in dirs:
        if not directory.is_dir():
            raise BuildError(f"customize directory {directory} does not exist")
        for path in sorted(directory.iterdir()):
            if _skipped(path.name) or path.is_dir():
                continue
            suffixes = path.suffixes
            where = ("chroot" if ".chroot" in suffixes else
                     "host" if ".host" in suffixes else None)
            number = re.match(r"(\d+)-", path.name)
            if where is None or number is None:
                raise BuildError(f"{path}: a customize script's name must be NN-name.chroot "
                                 f"(runs in the image) or NN-name.host (runs on the host), NN "
                                 f"a number; rename it, or add .disabled to skip it")
            if not os.access(path, os.X_OK):
                raise BuildError(f"{path} is not executable: chmod +x {path}")
            with open(path, "rb") as f:
                if f.read(2) != b"#!":
                    raise BuildError(f"{path} has no #! line: start it with #!/bin/sh "
                                     f"(or the interpreter it needs)")
            declared = _directives(path)
            for name in declared.get("code", ()):
                _check_code(path, name)
            chosen[path.name] = Script(path, where, int(number.group(1)),
                                       settings=declared.get("settings"),
                                       reads=declared.get("reads"),
                                       code=declared.get("code"), keep="keep" in declared)
    # By number, then name: 100-x runs after 50-y.
    return sorted(chosen.values(), key=lambda script: (script.number, script.name))


def settings_for(script: Script, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings the script declared, in the same nesting; all of them if it did not."""
    if script.settings is None:
        return dict(settings)
    view: dict[str, Any] = {}
    for name in script.settings:
        section, _, key = name.partition(".")
        if section not in settings or (key and key not in settings[section]):
            raise BuildError(f"{script.path}: `build-image: settings` names {name}, which is "
                             f"not a setting (see build-image --print-config)")
        if key:
            view.setdefault(section, {})[key] = settings[section][key]
        else:
            view[section] = settings[section]
    return view


def script_env(view: Mapping[str, Any], config: Config, board: Board, work: str,
               config_file: str) -> dict[str, str]:
    return {
        "IMAGE_BOARD": board.id,
        "IMAGE_ARCH": board.arch,
        "IMAGE_RELEASE": config.base.release,
        "IMAGE_FAMILY": board.family,
        "IMAGE_CONFIG": config_file,
        "IMAGE_OUTPUT": f"{work}/output",
        **config_env(view),
    }


def config_env(settings: Mapping[str, Any], prefix: str = "IMAGE_CONFIG") -> dict[str, str]:
    """The settings as variables for shell scripts, one per leaf key."""
    env: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}_{key.upper()}"
        if isinstance(value, Mapping):
            env.update(config_env(value, name))
        elif isinstance(value, list | tuple):
            env[name] = " ".join(str(item) for item in value)
        elif isinstance(value, bool):
            env[name] = "true" if value else "false"
        else:
            env[name] = "" if value is None else str(value)
    return env


def run_script(script: Script, chroot: Chroot, config: Config, board: Board,
               host_env: Mapping[str, str]) -> float:
    """Run one script with the settings it declared, streaming its output with its name in
    front; returns how long it took. The work directory is mounted at WORK_IN_IMAGE."""
    log.info(f"running customize.d/{script.name} ({script.where})")
    started = time.monotonic()
    view = settings_for(script, config.to_dict())
    scratch = chroot.path(SCRIPTS_IN_IMAGE)
    scratch.mkdir(parents=True, exist_ok=True)
    config_file = scratch / f"{script.name}.json"
    context = template_context(config, board)
    config_file.write_text(json.dumps({"config": view, "board": context["board"]}, indent=2))
    inside = f"{SCRIPTS_IN_IMAGE}/{script.name}.json"
    if script.where == "chroot":
        copy = scratch / script.name
        shutil.copyfile(script.path, copy)
        copy.chmod(0o755)
        chroot.run([f"{SCRIPTS_IN_IMAGE}/{script.name}"],
                   env=script_env(view, config, board, WORK_IN_IMAGE, inside),
                   prefix=script.name, what=f"customize.d/{script.name}")
    else:
        env = {**host_env, **script_env(view, config, board, str(chroot.path(WORK_IN_IMAGE)),
                                        str(config_file)),
               "IMAGE_ROOT": str(chroot.root)}
        stream([str(script.path)], env=env, prefix=script.name,
               what=f"customize.d/{script.name}", cwd=script.path.parent)
    return time.monotonic() - started


# Names the build's own outputs have: a script cannot replace them.
RESERVED_OUTPUTS = ("img", "manifest.json", "sbom.cdx.json", "build.log")
RESERVED_SECTIONS = ("builder", "built", "board", "base", "config", "packages", "sbom", "steps",
                     "scripts", "stages")


def read_outputs(outputs: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """What the scripts handed over: files to publish by name, and manifest sections."""
    files: dict[str, Path] = {}
    entries = sorted(outputs.iterdir()) if outputs.is_dir() else []
    for path in entries:
        if path.name == "manifest" and path.is_dir() and not path.is_symlink():
            continue
        if path.is_symlink() or not path.is_file():
            raise BuildError(f"$IMAGE_OUTPUT/{path.name} is not a regular file: a customize "
                             f"script must write the file itself there, not a link")
        if path.name.startswith(RESERVED_OUTPUTS):
            raise BuildError(f"$IMAGE_OUTPUT/{path.name}: the build writes that name itself; "
                             f"name the script's output differently")
        files[path.name] = path
    sections: dict[str, Any] = {}
    for path in sorted((outputs / "manifest").glob("*.json")):
        if path.stem in RESERVED_SECTIONS or path.is_symlink():
            raise BuildError(f"$IMAGE_OUTPUT/manifest/{path.name}: the manifest's "
                             f"{path.stem!r} is the build's own; use another name")
        try:
            sections[path.stem] = json.loads(path.read_text())
        except ValueError as exc:
            raise BuildError(f"a customize script wrote $IMAGE_OUTPUT/manifest/{path.name} "
                             f"that is not JSON: {exc}") from None
    return files, sections


def template_context(config: Config, board: Board) -> dict[str, Any]:
    board_data = dataclasses.asdict(board)
    board_data["consoles"] = [dataclasses.asdict(c) for c in board.consoles]
    # Outside "board", which keys the step cache from the base on: the choice of consoles
    # changes only the files rendered from it.
    return {"config": config.to_dict(), "board": board_data,
            "wizard_consoles": list(board.wizard_consoles(config.firstboot.consoles))}


def _environment(directory: Path) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(directory)),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              autoescape=False)


def render_templates(dirs: Sequence[Path], context: Mapping[str, Any]) -> dict[Path, str]:
    """Render every .j2 file of the overlays; a template error names the file and line."""
    rendered: dict[Path, str] = {}
    for directory in dirs:
        if not directory.is_dir():
            raise BuildError(f"overlay directory {directory} does not exist")
        env = _environment(directory)
        for path in sorted(directory.rglob("*.j2")):
            name = path.relative_to(directory).as_posix()
            try:
                rendered[path] = env.get_template(name).render(**context)
            except jinja2.TemplateError as exc:
                line = getattr(exc, "lineno", None) or _template_line(exc, path)
                where = f"{path}:{line}" if line else str(path)
                raise BuildError(f"overlay template {where}: {exc}") from None
    return rendered


def _template_line(exc: BaseException, path: Path) -> int | None:
    """The template line a render error happened on. Jinja2 rewrites the traceback so that
    frames of template code carry the template's file name and line."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def apply_overlays(dirs: Sequence[Path], root: Path, rendered: Mapping[Path, str]) -> int:
    """Copy each overlay tree into root, later trees over earlier ones; return file count."""
    count = 0
    for directory in dirs:
        for source in sorted(directory.rglob("*")):
            relative = source.relative_to(directory)
            if any(part.startswith(".") for part in relative.parts) or \
                    relative.as_posix() == "README.md":
                continue
            # Resolved the way the image sees it: through Debian's /var/run -> /run into the
            # image's /run, never the host's.
            target = entry_in_root(root, relative.as_posix())
            if source.is_symlink():
                remove_entry(target)
                os.symlink(os.readlink(source), target)
                os.lchown(target, 0, 0)
            elif source.is_dir():
                # A directory the image already has (/etc, /tmp) keeps its own mode; where
                # the image has a link (/var/run), the directory it leads to in the image.
                directory_in_image = in_root(root, relative.as_posix())
                if not directory_in_image.exists():
                    directory_in_image.mkdir()
                    os.chown(directory_in_image, 0, 0)
                    directory_in_image.chmod(stat.S_IMODE(source.stat().st_mode))
            else:
                mode = stat.S_IMODE(source.stat().st_mode)
                if source.suffix == ".j2":
                    target = target.with_suffix("")
                    data = rendered[source].encode()
                else:
                    data = source.read_bytes()
                write_file(target, data, mode)
                count += 1
    return count
