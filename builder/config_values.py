"""What a setting's value may be: the Rule attached to each field of builder/config.py's
dataclasses, and the checks it names. Each check receives a value of the right Python type
(config.py converts it first) and returns the value to keep, or raises ValueError with the
reason, which config.py puts after the key and the value:

    my.yaml: jupyter.port: 'abc' is not a port number (1-65535)
"""

from __future__ import annotations

import ipaddress
import re
import typing
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], Any]


@dataclass(frozen=True)
class Rule:
    """Attached to a field as Annotated[type, Rule(...)]: the value must pass `check`, which
    returns it (maybe normalised) or raises ValueError with the reason. `expect` names what a
    value of the wrong type should have been ("a port number"), a better message than "is not
    a whole number"."""

    check: Check
    expect: str | None = None
    # For a list setting that used to hold one value: a single string (or null) is taken as
    # a list of one (or none), so settings files written for the old form keep working.
    one_or_list: bool = False
    # For a setting that names something on this machine: FILE (read by the build), DIRECTORY
    # (read by the build) or NEW_DIRECTORY (made when needed). config.py resolves a relative
    # one written in a config file against that file's directory and checks it is there;
    # `not_paths` are values that name no path (base.source's armbian and debian).
    path: str | None = None
    not_paths: tuple[str, ...] = ()


FILE, DIRECTORY, NEW_DIRECTORY = "file", "directory", "new directory"


# Sizes are written "3GiB", "512MiB" or as a number of bytes and kept as bytes.
ByteSize = typing.NewType("ByteSize", int)


# Checks: each receives a value of the right Python type and returns the value to keep.


def port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("is not a port number (1-65535)")
    return value


def name(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", value):
        raise ValueError("is not a valid name (lower-case letters, digits, '.', '_', '-')")
    return value


def user(value: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", value):
        raise ValueError("is not a valid user name (e.g. jupyter)")
    if value == "root":
        raise ValueError("is not allowed: Jupyter must not run as root")
    return value


def listen_ip(value: str) -> str:
    if value in ("*", ""):
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError("is not an IP address (or * for every interface)") from None
    return value


def base_url(value: str) -> str:
    if not (value.startswith("/") and value.endswith("/")):
        raise ValueError("must start and end with / (e.g. / or /jupyter/)")
    return value


def absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must be an absolute path inside the image (e.g. /opt/jupyter)")
    return value


def http_url(value: str) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("is not an http(s) URL")
    return value.rstrip("/")


def url_or_path(value: str) -> str:
    if "://" in value:
        return http_url(value)
    if not value:
        raise ValueError("is empty: give a URL or a file path")
    return value


def non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty")
    return value


def local_path(value: str) -> str:
    if not value or "://" in value:
        raise ValueError("is not a local file path (download the file first)")
    return value


# The bases base.source names by a word rather than a path or URL.
SOURCE_WORDS = ("armbian", "debian")


def source(value: str) -> str:
    return value if value in SOURCE_WORDS else url_or_path(value)


def as_given(value: Any) -> Any:
    """Nothing to check beyond the type (for a Rule that exists for its `path`)."""
    return value


def sha256(value: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ValueError("is not a sha256 digest (64 hex digits)")
    return value.lower()


_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "KIB": 1024, "M": 1024**2, "MIB": 1024**2,
               "G": 1024**3, "GIB": 1024**3}


def parse_size(value: int | str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("is not a size (e.g. 3GiB, 512MiB or a number of bytes)")
    if isinstance(value, int):
        number = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError("is not a size (e.g. 3GiB, 512MiB or a number of bytes)")
        number = int(match.group(1)) * _SIZE_UNITS[unit]
    if number < 0:
        raise ValueError("must not be negative")
    return number


def positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def non_negative_minutes(value: float) -> float:
    if value < 0:
        raise ValueError("must be 0 (never) or more")
    return value


def non_negative(value: int) -> int:
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def choice(*allowed: str) -> Check:
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"is not one of {', '.join(allowed)}")
        return value

    return check


def password_length(value: int) -> int:
    if value < 6:
        raise ValueError("is too short to protect a board on a network: 6 at least")
    return value


class BadItem(ValueError):
    """One element of a list is wrong: the message names the element, not the whole list."""


def local_paths(value: tuple[str, ...]) -> tuple[str, ...]:
    for path in value:
        try:
            local_path(path)
        except ValueError as exc:
            raise BadItem(f"{path!r} {exc}") from None
    return value


def package_names(value: tuple[str, ...]) -> tuple[str, ...]:
    for name in value:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+\-\[\],<>=!~ ]*", name):
            raise BadItem(f"{name!r} is not a package name (or version requirement)")
    return value


def module_names(value: tuple[str, ...]) -> tuple[str, ...]:
    for name in value:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
            raise BadItem(f"{name!r} is not a Python module name (e.g. numpy, PIL)")
    return value


def group_names(value: tuple[str, ...]) -> tuple[str, ...]:
    for name in value:
        if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", name):
            raise BadItem(f"{name!r} is not a valid group name (e.g. dialout)")
    return value


def memory_share(value: str) -> str:
    """A share of the board's memory for systemd's MemoryMax=: a percentage, which systemd
    reckons from the memory of the board it runs on, or `infinity`."""
    number = value.removesuffix("%")
    if value == "infinity" or (value.endswith("%") and number.isdigit()
                               and 1 <= int(number) <= 100):
        return value
    raise ValueError("is not a share of the board's memory: a percentage such as 85%, or "
                     "infinity")


def console_words(value: tuple[str, ...]) -> tuple[str, ...]:
    for word in value:
        if word not in ("local", "gadget") and not re.fullmatch(r"tty[A-Za-z]*\d+", word):
            raise BadItem(f"{word!r} is neither local, gadget nor a console device (ttyS0, "
                          f"tty1, ttyGS0)")
    return value


def cpu_model(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.,=+-]*", value):
        raise ValueError("is not a qemu CPU model (auto, qemu, or a name from qemu's "
                         "-cpu help such as cortex-a53)")
    return value
