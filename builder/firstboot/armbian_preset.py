"""Armbian's first-login presets: the `PRESET_*` lines that Armbian Imager (or a person)
writes into /root/.not_logged_in_yet, which Armbian's own first login would read. This image
replaces that first login with its wizard, so at first boot the presets become the wizard's
answers (preseed lines) instead of being silently lost.

Armbian sources the file with bash, as root. Here it is never run: each line is read as one
shell assignment (unquoted, "double", 'single' and $'ANSI-C' quoting, as Armbian Imager and
Armbian's docs write them) and anything else (a command, an expansion, a substitution) is
said and skipped. What has no meaning on this image (another user name, root's password
while root stays locked, a remote configuration to download) is said as ignored, never
dropped silently. The file is removed once taken: it holds passwords in plain text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PRESET_FILE = "root/.not_logged_in_yet"

_NAME = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=")
# What a backslash stands for inside $'...' (bash's ANSI-C quoting).
_ANSI_C = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b",
           "f": "\f", "v": "\v", "\\": "\\", "'": "'", '"': '"', "?": "?"}
_SPECIAL = set("$`;|&<>()")


class NotASetting(ValueError):
    """A line that is not one plain assignment: bash would run or expand something."""


def parse(text: str) -> tuple[dict[str, str], list[str]]:
    """The file's assignments by name (the last wins, as in bash) and one line per line that
    was not read. CRLF and a BOM are allowed (Armbian strips CRs too)."""
    values: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.removeprefix("\ufeff").splitlines(), 1):
        line = raw.rstrip("\r").strip()
        if not line or line.startswith("#"):
            continue
        match = _NAME.match(line)
        if not match:
            problems.append(f"line {number}: not a NAME=value setting: not read (the card "
                            f"never runs this file)")
            continue
        try:
            values[match.group(1)] = _word(line[match.end():])
        except NotASetting as exc:
            problems.append(f"line {number}: {match.group(1)}: {exc}: not read (the card "
                            f"never runs this file)")
    return values, problems


def _word(rest: str) -> str:
    """The value of an assignment as bash would assign it, if bash would only assign it."""
    out: list[str] = []
    i = 0
    while i < len(rest):
        ch = rest[i]
        if ch in " \t":
            tail = rest[i:].strip()
            if tail and not tail.startswith("#"):
                raise NotASetting("more than one word (bash would run the rest as a command)")
            break
        if ch == "\\":
            if i + 1 < len(rest):
                out.append(rest[i + 1])
            i += 2
        elif ch == "'":
            end = rest.find("'", i + 1)
            if end < 0:
                raise NotASetting("a ' quote is not closed on its line")
            out.append(rest[i + 1:end])
            i = end + 1
        elif ch == '"':
            i = _double_quoted(rest, i + 1, out)
        elif rest.startswith("$'", i):
            i = _ansi_c(rest, i + 2, out)
        elif ch in _SPECIAL:
            raise NotASetting(f"{ch!r} outside quotes (an expansion or a command)")
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _double_quoted(rest: str, i: int, out: list[str]) -> int:
    while i < len(rest):
        ch = rest[i]
        if ch == '"':
            return i + 1
        if ch == "\\" and i + 1 < len(rest) and rest[i + 1] in '\\"$`':
            out.append(rest[i + 1])
            i += 2
        elif ch in "$`":
            raise NotASetting(f"{ch!r} inside double quotes (an expansion): write \\{ch}")
        else:
            out.append(ch)
            i += 1
    raise NotASetting('a " quote is not closed on its line')


def _ansi_c(rest: str, i: int, out: list[str]) -> int:
    while i < len(rest):
        ch = rest[i]
        if ch == "'":
            return i + 1
        if ch == "\\" and i + 1 < len(rest):
            out.append(_ANSI_C.get(rest[i + 1], "\\" + rest[i + 1]))
            i += 2
        else:
            out.append(ch)
            i += 1
    raise NotASetting("a $' quote is not closed on its line")


@dataclass
class Taken:
    """The presets as preseed lines, and what to say about them."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    said: list[str] = field(default_factory=list)
    # The user's password, which also becomes Jupyter's unless a preseed gives Jupyter one.
    password: str | None = None

    def preseed(self, jupyter_given: bool) -> str:
        """The lines as a preseed; the password Jupyter's too unless `jupyter_given`."""
        lines = list(self.lines)
        if self.password is not None and not jupyter_given:
            lines.append(("jupyter_password", self.password))
        return "".join(f'{key} = "{value}"\n' for key, value in lines)


def _mask_address(ip: str, mask: str) -> str:
    """Armbian's STATIC_IP and STATIC_MASK (dotted, or a prefix length) as address/prefix."""
    return f"{ip.strip()}/{mask.strip()}" if mask.strip() else ip.strip()


def take(values: dict[str, str], user: str, root_same: bool) -> Taken:
    """The presets Armbian's first login reads, mapped to this image's preseed keys; every
    other line said. `user` is the image's Jupyter user; `root_same` whether root gets the
    login password (firstboot.root_password: same)."""
    taken = Taken()
    v = {key: value for key, value in values.items() if value != ""}
    said = taken.said

    def line(key: str, value: str) -> None:
        if "\n" in value:
            said.append(f"{key}: a line break in the value: not used")
        else:
            taken.lines.append((key, value))

    name = v.pop("PRESET_USER_NAME", None)
    if name is not None and name.lower() != user:
        said.append(f"PRESET_USER_NAME={name} ignored: this card's user is {user} (Jupyter "
                    f"runs as it); the other presets are applied to {user}")
    if "PRESET_USER_PASSWORD" in v:
        taken.password = v.pop("PRESET_USER_PASSWORD")
        if "\n" in taken.password:
            said.append("PRESET_USER_PASSWORD: a line break in the value: not used")
            taken.password = None
        else:
            line("login_password", taken.password)
    key_source = v.pop("PRESET_USER_KEY", None)
    if key_source is not None:
        if re.match(r"https?://", key_source):
            line("ssh_key_url", key_source)
        else:
            line("ssh_key", key_source)
    if "PRESET_TIMEZONE" in v:
        line("timezone", v.pop("PRESET_TIMEZONE"))
    locale = v.pop("PRESET_LOCALE", None)
    if locale is not None and "skip" not in locale.lower():
        line("locale", locale.split()[0])

    network = {k: v.pop(k) for k in list(v) if k.startswith("PRESET_NET_")}
    if network and network.get("PRESET_NET_CHANGE_DEFAULTS") != "1":
        said.append("PRESET_NET_* ignored: PRESET_NET_CHANGE_DEFAULTS is not 1 (as on "
                    "Armbian, the network stays as it is)")
    elif network:
        wifi = network.get("PRESET_NET_WIFI_ENABLED") == "1"
        if wifi and "PRESET_NET_WIFI_SSID" in network:
            line("wifi_ssid", network["PRESET_NET_WIFI_SSID"])
            if "PRESET_NET_WIFI_KEY" in network:
                line("wifi_key", network["PRESET_NET_WIFI_KEY"])
        if wifi and "PRESET_NET_WIFI_COUNTRYCODE" in network:
            line("wifi_country", network["PRESET_NET_WIFI_COUNTRYCODE"])
        if network.get("PRESET_NET_USE_STATIC") == "1":
            line("address", _mask_address(network.get("PRESET_NET_STATIC_IP", ""),
                                          network.get("PRESET_NET_STATIC_MASK", "")))
            if "PRESET_NET_STATIC_GATEWAY" in network:
                line("gateway", network["PRESET_NET_STATIC_GATEWAY"])
            if "PRESET_NET_STATIC_DNS" in network:
                line("dns", network["PRESET_NET_STATIC_DNS"])

    if "PRESET_ROOT_PASSWORD" in v:
        v.pop("PRESET_ROOT_PASSWORD")
        said.append("PRESET_ROOT_PASSWORD ignored: " + (
            "root gets the login password (firstboot.root_password: same)" if root_same else
            f"root stays locked; {user} uses sudo with the login password"))
    if "PRESET_ROOT_KEY" in v:
        v.pop("PRESET_ROOT_KEY")
        said.append("PRESET_ROOT_KEY ignored: root never logs in over SSH here (give "
                    "PRESET_USER_KEY)")
    shell = v.pop("PRESET_USER_SHELL", None)
    if shell is not None and shell != "bash":
        said.append(f"PRESET_USER_SHELL={shell} ignored: {user}'s shell stays bash")
    if "PRESET_DEFAULT_REALNAME" in v:
        said.append(f"PRESET_DEFAULT_REALNAME ignored: {user} keeps its name")
        v.pop("PRESET_DEFAULT_REALNAME")
    if "PRESET_CONFIGURATION" in v:
        v.pop("PRESET_CONFIGURATION")
        said.append("PRESET_CONFIGURATION ignored: a remote configuration is not downloaded "
                    "(put its lines in the file itself)")
    if v.pop("SET_LANG_BASED_ON_LOCATION", "n").lower().startswith("y"):
        said.append("SET_LANG_BASED_ON_LOCATION ignored: the card does not look up where it "
                    "is (give PRESET_TIMEZONE and PRESET_LOCALE)")
    v.pop("PRESET_CONNECT_WIRELESS", None)      # only answers a question this image never asks
    said += [f"{key} ignored: not an Armbian preset this image knows" for key in sorted(v)]
    return taken
