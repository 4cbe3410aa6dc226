"""Settings: defaults.yaml, then --config files, then --set overrides, into frozen dataclasses.

Every value is checked here, before the first download (what each may be:
builder/config_values.py), and a bad one is reported with where it came from, its key path,
the value and what would be accepted:

    my.yaml: jupyter.port: 'abc' is not a port number (1-65535)

The dataclasses carry no defaults of their own: defaults.yaml is the one place they live.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml

from builder import config_values as allowed
from builder.config_values import BadItem, ByteSize, Rule, parse_size
from builder.errors import BuildError

DEFAULTS_NAME = "defaults.yaml"

# How far a downloaded or local base image must be vouched for (base.verify), strongest first:
# a good OpenPGP signature, a known sha256, nothing (fetch.py applies them).
BASE_VERIFY_LEVELS = ("signature", "sha256", "none")

@dataclass(frozen=True)
class BaseConfig:
    source: Annotated[str, Rule(allowed.source, path=allowed.FILE,
                                not_paths=allowed.SOURCE_WORDS)]
    sha256: Annotated[str | None, Rule(allowed.sha256)]
    release: Annotated[str, Rule(allowed.name)]
    branch: Annotated[str, Rule(allowed.name)]
    variant: Annotated[str, Rule(allowed.name)]
    armbian_index: Annotated[str, Rule(allowed.url_or_path, path=allowed.FILE)]
    armbian_mirror: Annotated[str | None, Rule(allowed.http_url)]
    debian_mirror: Annotated[str, Rule(allowed.http_url)]
    verify: Annotated[str, Rule(allowed.choice(*BASE_VERIFY_LEVELS))]
    gpg_keyring: Annotated[tuple[str, ...], Rule(allowed.local_paths, one_or_list=True,
                                                 path=allowed.FILE)]


@dataclass(frozen=True)
class PackagesConfig:
    apt: Annotated[tuple[str, ...], Rule(allowed.package_names)]
    apt_recommends: bool
    pip: Annotated[tuple[str, ...], Rule(allowed.package_names)]
    check_imports: Annotated[tuple[str, ...], Rule(allowed.module_names)]


@dataclass(frozen=True)
class VenvConfig:
    path: Annotated[str, Rule(allowed.absolute_path)]
    system_site_packages: bool
    kernel_name: Annotated[str, Rule(allowed.name)]
    kernel_display_name: Annotated[str, Rule(allowed.non_empty)]


@dataclass(frozen=True)
class JupyterConfig:
    user: Annotated[str, Rule(allowed.user)]
    ip: Annotated[str, Rule(allowed.listen_ip)]
    port: Annotated[int, Rule(allowed.port, "a port number (1-65535)")]
    base_url: Annotated[str, Rule(allowed.base_url)]
    groups: Annotated[tuple[str, ...], Rule(allowed.group_names)]
    cull_idle_minutes: Annotated[float, Rule(allowed.non_negative_minutes, "a number of minutes")]
    memory_max: Annotated[str, Rule(allowed.memory_share)]
    tls: bool


@dataclass(frozen=True)
class FirstbootConfig:
    root_password: Annotated[str, Rule(allowed.choice("locked", "same"))]
    min_password_length: Annotated[int, Rule(allowed.password_length, "a whole number, 6 or more")]
    answer_timeout: Annotated[float, Rule(allowed.positive, "a number of seconds")]
    unattended: Annotated[str, Rule(allowed.choice("wait", "token"))]
    unattended_after: Annotated[float, Rule(allowed.positive, "a number of seconds")]
    preseed: Annotated[str | None, Rule(allowed.local_path, path=allowed.FILE)]
    ssh_passwords: Annotated[str, Rule(allowed.choice("off_with_key", "keep"))]
    consoles: Annotated[tuple[str, ...], Rule(allowed.console_words, one_or_list=True)]


@dataclass(frozen=True)
class ImageConfig:
    headroom: ByteSize
    free_space: ByteSize
    compression: Annotated[str, Rule(allowed.choice("xz", "zstd", "gzip", "none"))]
    compression_level: int
    setup_partition: bool


@dataclass(frozen=True)
class OutputConfig:
    dir: Annotated[str, Rule(allowed.non_empty, path=allowed.NEW_DIRECTORY)]
    product: Annotated[str, Rule(allowed.name)]


@dataclass(frozen=True)
class CustomizeConfig:
    builtin: bool
    scripts: Annotated[tuple[str, ...], Rule(allowed.local_paths, path=allowed.DIRECTORY)]
    overlays: Annotated[tuple[str, ...], Rule(allowed.local_paths, path=allowed.DIRECTORY)]


@dataclass(frozen=True)
class AptConfig:
    proxy: Annotated[str | None, Rule(allowed.http_url)]


@dataclass(frozen=True)
class EmulationConfig:
    cpu: Annotated[str, Rule(allowed.cpu_model)]
    quick_apt: bool


@dataclass(frozen=True)
class DownloadConfig:
    timeout: Annotated[float, Rule(allowed.positive, "a number of seconds")]
    retries: Annotated[int, Rule(allowed.non_negative, "a whole number of retries")]


@dataclass(frozen=True)
class CacheConfig:
    dir: Annotated[str | None, Rule(allowed.as_given, path=allowed.NEW_DIRECTORY)]
    stages_size: ByteSize
    stage_days: Annotated[float, Rule(allowed.positive, "a number of days")]


@dataclass(frozen=True)
class Config:
    board: str | None
    base: BaseConfig
    packages: PackagesConfig
    venv: VenvConfig
    jupyter: JupyterConfig
    firstboot: FirstbootConfig
    image: ImageConfig
    output: OutputConfig
    customize: CustomizeConfig
    apt: AptConfig
    emulation: EmulationConfig
    download: DownloadConfig
    cache: CacheConfig
    # Not a setting: where each key path was set last (a --config file's name, "--set",
    # the dedicated option such as "--release", or defaults.yaml), for messages about a
    # value found wrong later and for the dry run's plan.
    origins: Mapping[str, str] = dataclasses.field(
        default_factory=dict, compare=False, repr=False, metadata={"setting": False})

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) for the JSON handed to customize.d scripts."""
        plain: dict[str, Any] = _plain(dataclasses.asdict(self))
        del plain["origins"]
        return plain

    def given_as(self, key: str, flag: str) -> str:
        """Where the value of `key` was given, as the user wrote it: "site.yaml: key",
        "--set key", or `flag` (the dedicated option) when it came from the command line."""
        origin = self.origins.get(key)
        if origin == "command line":
            return flag
        if origin is not None and origin.startswith("--") and origin != "--set":
            return origin              # the dedicated option that gave it
        if origin == "--set":
            return f"--set {key}"
        if origin in (None, DEFAULTS_NAME):
            return key
        return f"{origin}: {key}"


def leaves(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}: the settings as --set names them (lists are values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _settings(cls: type[Any]) -> list[dataclasses.Field[Any]]:
    """The fields of a settings dataclass that are settings (Config.origins is not)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("setting", True)]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


_COMPRESSION_LEVELS = {"xz": (0, 9), "zstd": (1, 19), "gzip": (1, 9), "none": (0, 0)}


def _check_across_keys(config: Config, origin: Callable[[str], str]) -> None:
    """Rules that involve more than one key."""
    base = config.base
    if (base.verify == "sha256" and base.source not in ("armbian", "debian")
            and not base.sha256):
        # Armbian publishes a .sha beside each image; a file of your own has none.
        raise BuildError(
            f"{origin('base.verify')}base.verify: 'sha256' needs the digest of {base.source}: "
            f"pass --base-sha256 HEX (base.sha256), or keep --base-verify signature with its "
            f".asc beside it")
    low, high = _COMPRESSION_LEVELS[config.image.compression]
    level = config.image.compression_level
    # With no compression the level means nothing: `--compress none` alone must work.
    if config.image.compression != "none" and not low <= level <= high:
        raise BuildError(
            f"{origin('image.compression_level')}image.compression_level: {level!r} is out of "
            f"range for {config.image.compression} ({low}-{high})"
        )


# Loading and merging.


class _Layers:
    """The merged settings and, for each key path, the name of the layer that set it last, so
    errors can say which file (or --set) a bad value came from."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.origins: dict[str, str] = {}
        # The directory of each --config file, by its layer's name: what a relative path
        # written in it is relative to.
        self.directories: dict[str, Path] = {}

    def merge(self, overlay: Mapping[str, Any], source: str, prefix: str = "") -> None:
        _check_keys(overlay, prefix, source)
        _merge_into(self.data, overlay, prefix, source, self.origins)

    def origin(self, path: str) -> str:
        source = self.origins.get(path)
        if source == "--set":
            return "--set "
        return f"{source}: " if source and source != DEFAULTS_NAME else ""


def _merge_into(
    target: dict[str, Any],
    overlay: Mapping[str, Any],
    prefix: str,
    source: str,
    origins: dict[str, str],
) -> None:
    for key, value in overlay.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge_into(target[key], value, f"{path}.", source, origins)
        elif isinstance(target.get(key), dict):
            # Replacing a whole section by a value would lose every key in it.
            where = "--set " if source == "--set" else f"{source}: "
            raise BuildError(f"{where}{path}: {_describe(value)} is not a section "
                             f"(expected key: value lines under it)")
        else:
            target[key] = copy.deepcopy(value)
            origins[path] = source


def _schema_at(prefix: str) -> type[Any] | None:
    """The dataclass that describes the section at `prefix` ("" is the top)."""
    cls: type[Any] = Config
    for part in filter(None, prefix.rstrip(".").split(".")):
        hint = typing.get_type_hints(cls).get(part)
        if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
            return None
        cls = hint
    return cls


def _check_keys(data: Mapping[str, Any], prefix: str, source: str) -> None:
    """Reject keys the schema does not know, with the closest known key as a hint."""
    cls = _schema_at(prefix)
    if cls is None:
        return
    known = [f.name for f in _settings(cls)]
    for key, value in data.items():
        if not isinstance(key, str) or key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known: {', '.join(known)}"
            where = "--set " if source == "--set" else f"{source}: "
            raise BuildError(f"{where}{prefix}{key}: unknown key ({hint})")
        if isinstance(value, Mapping):
            _check_keys(value, f"{prefix}{key}.", source)


class DuplicateKey(yaml.YAMLError):
    """A key written twice in one mapping. Plain YAML loaders keep the last and say nothing,
    so a setting changed near the top of a file is silently undone by its old line further
    down."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"{key!r} twice")
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice at one level (lines counted from 1)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[tuple[type, Any], int] = {}
        for key_node, _ in node.value:
            # `<<: *anchor` merges keys that the mapping may then override: YAML allows that.
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            # By type too: YAML's `1` and `true` are different keys that Python finds equal.
            try:
                first = seen.get((type(key), key))
            except TypeError:
                continue            # an unhashable key: SafeLoader itself refuses it below
            if first is not None:
                raise DuplicateKey(key, key_node.start_mark.line + 1, first + 1)
            seen[(type(key), key)] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """YAML as users write it: safe tags only, and a key given twice at one level refused
    (DuplicateKey) rather than the last one silently taken."""
    return yaml.load(text, Loader=_UniqueKeyLoader)   # a SafeLoader: no arbitrary objects


def read_yaml_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BuildError(
            f"config file {path} not found: check the path given to --config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"config file {path} cannot be read: {exc}") from None
    try:
        data = load_yaml(text)
    except DuplicateKey as exc:
        raise BuildError(f"config file {path}: line {exc.line}: {exc.key!r} is given twice at "
                         f"one level (first at line {exc.first_line}; the last would win "
                         f"silently): keep one") from None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BuildError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BuildError(
            f"config file {path} must hold a mapping of settings (key: value), "
            f"not a {type(data).__name__}"
        )
    return data


def parse_override(text: str) -> dict[str, Any]:
    """`jupyter.port=9000` → {"jupyter": {"port": 9000}}; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise BuildError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. --set jupyter.port=9000")
    # The value is YAML so that numbers, booleans, null and [lists] work, but only a scalar or
    # a [flow] / {flow} collection: "::" or "a: b" mean the string the user typed.
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except DuplicateKey as exc:
        raise BuildError(f"--set {text!r}: {exc.key!r} is given twice: keep one") from None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict | list) and not raw.strip().startswith(("[", "{")):
        value = raw
    return _nested(key, value)


def load_config(
    files: Iterable[Path] = (),
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> Config:
    """Merge defaults.yaml, the --config files in order, --set overrides and flags, then check.

    `flags` maps key paths ("base.release") to values given by dedicated command-line options,
    `flag_names` key paths to those options ("--release"): what origins and errors name.
    """
    layers = _Layers()
    defaults = resources.files("builder").joinpath(DEFAULTS_NAME).read_text(encoding="utf-8")
    layers.merge(load_yaml(defaults), DEFAULTS_NAME)
    for file in files:
        layers.merge(read_yaml_file(file), str(file))
        # The directory, not the file, is resolved: a config file that is a symlink is read
        # beside the link, where its user sees it.
        layers.directories[str(file)] = file.expanduser().absolute().parent.resolve()
    for text in overrides:
        layers.merge(parse_override(text), "--set")
    for path, value in (flags or {}).items():
        if value is not None:
            layers.merge(_nested(path, value), (flag_names or {}).get(path, "command line"))
    config: Config = _build(Config, layers.data, "", layers)
    config = dataclasses.replace(config, origins=dict(layers.origins))
    _check_across_keys(config, layers.origin)
    return config


def _nested(path: str, value: Any) -> dict[str, Any]:
    """"a.b.c", 1 → {"a": {"b": {"c": 1}}}"""
    result: dict[str, Any] = {}
    node = result
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return result


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, dict | list) else type(value).__name__


def _build(cls: type[Any], data: Any, prefix: str, layers: _Layers) -> Any:
    section = prefix.rstrip(".") or "settings"
    if not isinstance(data, dict):
        raise BuildError(
            f"{layers.origin(section)}{section}: {_describe(data)} is not a section "
            f"(expected key: value lines under it)"
        )
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in _settings(cls):
        path = f"{prefix}{f.name}"
        if f.name not in data:
            raise BuildError(f"{path}: missing from the settings (is {DEFAULTS_NAME} intact?)")
        hint, rule = hints[f.name], None
        if typing.get_origin(hint) is Annotated:
            hint, rule = typing.get_args(hint)[0], typing.get_args(hint)[1]
        values[f.name] = _convert(data[f.name], hint, path, rule, layers)
    return cls(**values)


def _convert(value: Any, hint: Any, path: str, rule: Rule | None, layers: _Layers) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{path}.", layers)
    where = f"{layers.origin(path)}{path}"
    args = typing.get_args(hint)
    if rule is not None and rule.one_or_list:
        value = [] if value is None else [value] if isinstance(value, str) else value
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    try:
        try:
            converted = _convert_type(value, hint)
        except ValueError:
            if rule is not None and rule.expect:
                raise ValueError(f"is not {rule.expect}") from None
            raise
        checked = rule.check(converted) if rule else converted
        if rule is not None and rule.path is not None:
            checked = _host_paths(checked, path, rule, layers)
        return checked
    except BadItem as exc:
        raise BuildError(f"{where}: {exc}") from None
    except ValueError as exc:
        raise BuildError(f"{where}: {_describe(value)} {exc}") from None


def _host_paths(value: Any, key: str, rule: Rule, layers: _Layers) -> Any:
    """A path written in a --config file is relative to that file's directory, wherever
    build-image is started, and is checked now, while it is known which file and key it came
    from (later a missing file could only be blamed on the option that sets it). A path from
    the command line (a flag or --set) keeps meaning what the shell means: relative to the
    current directory, and checked where it is used."""
    origin = layers.origins.get(key, "")
    directory = layers.directories.get(origin)
    if directory is None:
        return value
    resolved = [_resolve(item, directory, f"{origin}: {key}", rule)
                for item in (value if isinstance(value, tuple) else (value,))]
    return tuple(resolved) if isinstance(value, tuple) else resolved[0]


def _resolve(item: str, directory: Path, where: str, rule: Rule) -> str:
    if not item or "://" in item or item in rule.not_paths:
        return item
    path = directory / Path(item).expanduser()   # an absolute one stays as it is
    if rule.path == allowed.NEW_DIRECTORY:
        return str(path)
    exists = path.is_file() if rule.path == allowed.FILE else path.is_dir()
    if not exists:
        problem = ("is a directory, not a file" if path.is_dir() else
                   "is not a directory" if path.exists() else "does not exist")
        relative = "" if Path(item).expanduser().is_absolute() else \
            " (a relative path in a config file is taken from the file's directory)"
        raise BuildError(f"{where}: {item!r}: {path} {problem}{relative}: fix the path "
                         f"to name a {rule.path}")
    return str(path)


def _convert_type(value: Any, hint: Any) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError("is not true or false")
        return value
    if hint is ByteSize:
        return parse_size(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("is not a whole number")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("is not a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError("is not a string (quote it in YAML)")
        return value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("is not a list of strings")
        return tuple(value)
    raise TypeError(f"unsupported type in the settings schema: {hint!r}")
