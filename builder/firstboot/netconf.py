"""The network and locale answers applied to the card's files: the Wi-Fi network and its
country, a static IPv4 address, and the locale.

Whichever network stack the image has gets them, found by its files under the root, in this
order: netplan (Armbian's images, whatever renders it), NetworkManager, systemd-networkd alone
(the Debian base: wired ports only, it has no Wi-Fi supplicant). A static address goes where
Armbian's own presets put it: on the Wi-Fi network when one is given, else on the wired ports.
What cannot be applied is said as NOT configured, with why; a Wi-Fi key is never said.

Every path is relative to the root, so the tests apply answers to a temporary tree; commands
(netplan apply, nmcli, networkctl, iw, locale-gen) run only on the running card.
"""

from __future__ import annotations

import ipaddress
import json
import os
import posixpath
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.files import sync_directory

if TYPE_CHECKING:
    # Type only: system.py calls this module, so importing it here would be a cycle.
    from builder.firstboot.system import System

# What this module writes, relative to the root.
NETPLAN_DIR = "etc/netplan"
NETPLAN_WIFI = f"{NETPLAN_DIR}/30-jupyter-wifi.yaml"
NETPLAN_WIRED = f"{NETPLAN_DIR}/30-jupyter-wired.yaml"
NM_CONNECTIONS = "etc/NetworkManager/system-connections"
NM_WIRED = f"{NM_CONNECTIONS}/jupyter-wired.nmconnection"
# networkd takes the first .network file, in lexical order, that matches a link: 10- comes
# before the Debian base's 20-wired.network.
NETWORKD_DIR = "etc/systemd/network"
NETWORKD_WIRED = f"{NETWORKD_DIR}/10-jupyter-wired.network"
WIFI_COUNTRY = "etc/modprobe.d/orangepi-jupyter-wifi-country.conf"
# A netplan file that would configure the wired ports beside ours is renamed with this
# suffix (netplan reads only *.yaml), so it is kept and can be put back.
SET_ASIDE = ".orangepi-jupyter-off"

# The interface netplan's Wi-Fi definition names: its networkd backend needs a name (it
# starts one wpa_supplicant per interface), not a match; the boards' Wi-Fi is wlan0.
WIFI_INTERFACE = "wlan0"
# The wired ports: what Armbian's 10-dhcp-all-interfaces.yaml matches (eth0, end0, enP4p65s0,
# ...) for netplan, and what the Debian base's 20-wired.network matches for networkd. Router
# boards' switch ports (lan0, wan) are left out: one address on several ports of a switch
# clashes. A board with two wired ports cabled at once would have the address on both.
NETPLAN_WIRED_MATCH = "e*"
NETWORKD_WIRED_MATCH = "en* eth*"
# NetworkManager's own "Wired connection 1" has priority -999, a saved profile 0 by default:
# ours must win over both on every wired device.
NM_WIRED_PRIORITY = 10
# The same UUID on every run: NetworkManager sees one profile updated, not a new one.
NM_WIRED_UUID = str(uuid.uuid5(uuid.NAMESPACE_URL, "https://orangepi-jupyter/wired-static"))

# How long a command on the card may take before setup goes on without it.
APPLY_TIMEOUT = 120
# locale-gen on an emulated or small board: about a minute per locale.
LOCALE_GEN_TIMEOUT = 600


def network_stack(system: System) -> str | None:
    """The image's network stack: "netplan", "NetworkManager", "networkd", or None.

    netplan first: Armbian's images have it, and it hands the devices to NetworkManager or
    networkd itself. networkd counts only where something uses it: enabled, or with a .network
    file (the Debian base has both); its program alone is in every systemd image."""
    if _present(system.path("usr/sbin/netplan")):
        return "netplan"
    if _present(system.path("usr/sbin/NetworkManager")):
        return "NetworkManager"
    networkd = any(_present(system.path(p)) for p in ("usr/lib/systemd/systemd-networkd",
                                                      "lib/systemd/systemd-networkd"))
    enabled = _present(system.path(
        "etc/systemd/system/multi-user.target.wants/systemd-networkd.service"))
    if networkd and (enabled or any(system.path(NETWORKD_DIR).glob("*.network"))):
        return "networkd"
    return None


@dataclass(frozen=True)
class Static:
    """A static IPv4 address (with its prefix), its gateway and name servers (either family)."""

    address: str
    gateway: str | None
    dns: tuple[str, ...]

    def servers(self, version: int) -> list[str]:
        return [s for s in self.dns if ipaddress.ip_address(s).version == version]

    def shown(self, where: str) -> str:
        line = f"address {self.address} {where}"
        line += f", gateway {self.gateway}" if self.gateway else ", no gateway"
        return line + (f", DNS {' '.join(self.dns)}" if self.dns else "")


def set_network(system: System, *, wifi_ssid: str | None, wifi_key: str | None,
                wifi_country: str | None, address: str | None, gateway: str | None,
                dns: Sequence[str]) -> list[str]:
    """Apply the network answers; returns the lines to show (never the Wi-Fi key).

    The country goes everywhere (the kernel's setting at every boot, and netplan's Wi-Fi
    definition). A static address (`gateway` and `dns` go with it, and are ignored without
    it) goes on the Wi-Fi network when `wifi_ssid` is given, else on the wired ports; moved
    onto Wi-Fi, an earlier wired one of ours is removed, so one address is not on both."""
    stack = network_stack(system)
    static = Static(str(ipaddress.IPv4Interface(address).with_prefixlen), gateway,
                    tuple(dns)) if address else None
    lines: list[str] = []
    changed = False       # a file of the stack's own changed: reload it on the running card
    if wifi_country:
        lines.append(_set_country(system, wifi_country, bool(wifi_ssid)))
    if wifi_ssid:
        shown = _shown(wifi_ssid)
        joined = _set_wifi(system, stack, wifi_ssid, wifi_key, wifi_country, static)
        if joined:
            lines.append(f"Wi-Fi {shown}: configured ({stack})")
            changed = True
        else:
            lines.append(f"Wi-Fi {shown}: NOT configured: this image has neither netplan nor "
                         f"NetworkManager")
        if static and joined:
            lines.append(static.shown("on Wi-Fi"))
            if _drop_wired(system):
                lines.append("wired ports: back to the image's own settings (the address is "
                             "on Wi-Fi now)")
        elif static:
            lines.append(f"address {static.address}: NOT configured: it is for the Wi-Fi "
                         f"network, which this image cannot join")
    elif static:
        if stack is None:
            lines.append(f"address {static.address}: NOT configured: this image has neither "
                         f"netplan, NetworkManager nor systemd-networkd")
        else:
            lines += _set_wired(system, stack, static)
            changed = True
    if system.live and changed and stack:
        lines += _reload(stack, wired=static is not None and not wifi_ssid)
    return lines


# The Wi-Fi country: the kernel's regulatory domain (channels, power), for every stack.


def _set_country(system: System, country: str, with_network: bool) -> str:
    # cfg80211's module parameter: read when the module loads at boot, whoever then joins the
    # network (wpa_supplicant under NetworkManager or networkd, netplan's either). A kernel
    # with cfg80211 built in would need it on its command line; Armbian's and Debian's
    # kernels have it as a module.
    system.write(WIFI_COUNTRY, f"# orangepi-jupyter's first-boot setup: the Wi-Fi country "
                               f"(wifi_country).\noptions cfg80211 ieee80211_regdom={country}\n")
    later = "" if with_network else " (for a Wi-Fi network joined later)"
    if not system.live:
        return f"Wi-Fi country: {country}{later}"
    # The module is already loaded on the running card: iw sets the domain now.
    iw = next((system.path(p) for p in ("usr/sbin/iw", "sbin/iw", "usr/bin/iw")
               if _present(system.path(p))), None)
    problem = (_run([str(iw), "reg", "set", country], APPLY_TIMEOUT) if iw
               else "iw is not installed")
    if problem:
        return f"Wi-Fi country: {country}{later}, from the next boot (not now: {problem})"
    return f"Wi-Fi country: {country}{later}"


# The Wi-Fi network.


def _set_wifi(system: System, stack: str | None, ssid: str, key: str | None,
              country: str | None, static: Static | None) -> bool:
    """Write the network's configuration; False when the image has nothing to join it with."""
    if stack == "netplan":
        network: dict[str, Any] = {"access-points": {ssid: {"password": key} if key else {}},
                                   "dhcp4": True, "dhcp6": True}
        if country:
            network["regulatory-domain"] = country
        if static:
            network.update(_netplan_static(static))
        plan = {"network": {"version": 2, "wifis": {WIFI_INTERFACE: network}}}
        system.write(NETPLAN_WIFI, _yaml(plan), 0o600)
        return True
    if stack == "NetworkManager":
        name = re.sub(r"[^A-Za-z0-9_-]", "_", ssid)
        security = (f"[wifi-security]\nkey-mgmt=wpa-psk\npsk={_keyfile(key)}\n\n" if key
                    else "")
        system.write(f"{NM_CONNECTIONS}/{name}.nmconnection",
                     f"[connection]\nid={_keyfile(ssid)}\ntype=wifi\nautoconnect=true\n\n"
                     f"[wifi]\nmode=infrastructure\nssid={_nm_ssid(ssid)}\n\n{security}"
                     f"{_nm_ip(static)}", 0o600)
        return True
    return False


def _drop_wired(system: System) -> list[str]:
    """Our wired static address removed, and the netplan files set aside for it put back:
    the wired ports are as the image had them. Returns what was removed."""
    removed = []
    for relative in (NETPLAN_WIRED, NM_WIRED, NETWORKD_WIRED):
        path = system.path(relative)
        if path.exists():
            path.unlink()
            sync_directory(path.parent)
            removed.append(f"/{relative}")
    for path in sorted(system.path(NETPLAN_DIR).glob(f"*.yaml{SET_ASIDE}")):
        original = path.with_name(path.name.removesuffix(SET_ASIDE))
        if not original.exists():
            os.replace(path, original)
            sync_directory(path.parent)
    return removed


# A static address on the wired ports.


def _set_wired(system: System, stack: str, static: Static) -> list[str]:
    lines = []
    if stack == "netplan":
        set_aside, renderers = _set_aside_wired_plans(system)
        lines += [f"/{NETPLAN_DIR}/{name}: set aside as {name}{SET_ASIDE} (it configured the "
                  f"wired ports too)" for name in set_aside]
        wired: dict[str, Any] = {"match": {"name": NETPLAN_WIRED_MATCH}}
        # The file set aside may have chosen the renderer (NetworkManager on an image that
        # does not run networkd): the wired ports keep it.
        if len(renderers) == 1:
            wired["renderer"] = renderers.pop()
        wired.update(_netplan_static(static))
        plan = {"network": {"version": 2, "ethernets": {"jupyter-wired": wired}}}
        system.write(NETPLAN_WIRED, _yaml(plan), 0o600)
    elif stack == "NetworkManager":
        # No interface-name: the profile takes whichever wired device has a cable (a profile
        # is active on one device at a time).
        system.write(NM_WIRED, f"[connection]\nid=jupyter-wired\nuuid={NM_WIRED_UUID}\n"
                               f"type=ethernet\nautoconnect=true\n"
                               f"autoconnect-priority={NM_WIRED_PRIORITY}\n\n[ethernet]\n\n"
                               f"{_nm_ip(static)}", 0o600)
    else:
        network = [f"Address={static.address}"]
        network += [f"Gateway={static.gateway}"] if static.gateway else []
        network += [f"DNS={server}" for server in static.dns]
        # IPv6 as the base's DHCP=yes had it: router advertisements and DHCPv6.
        network.append("DHCP=ipv6")
        system.write(NETWORKD_WIRED,
                     "# orangepi-jupyter's first-boot setup: the static address for the wired "
                     "ports (address,\n# gateway, dns). It comes before 20-wired.network, so "
                     "networkd takes it.\n"
                     f"[Match]\nName={NETWORKD_WIRED_MATCH}\n\n[Network]\n"
                     + "\n".join(network) + "\n")
    lines.append(static.shown(f"on the wired ports ({stack})"))
    return lines


_COMMENT = re.compile(r"(^|\s)#.*")
_ETHERNETS = re.compile(r"""(?:^|[\s{,])["']?ethernets["']?\s*:""", re.MULTILINE)
_RENDERER = re.compile(r"""(?:^|[\s{,])["']?renderer["']?\s*:\s*["']?(networkd|NetworkManager)\b""",
                       re.MULTILINE)


def _set_aside_wired_plans(system: System) -> tuple[list[str], set[str]]:
    """Rename every other netplan file under /etc/netplan that defines ethernets: two
    definitions matching one interface conflict (networkd takes whichever generated file
    sorts first, and Armbian's all-eth-interfaces comes before ours), as Armbian's own first
    login deletes its 10-dhcp-all-interfaces.yaml for a static wired address. Returns the
    names set aside now, and the renderers chosen by every file set aside (now or by an
    earlier run).

    Read as text (this package uses the standard library only): a file that merely mentions
    `ethernets:` as a key is set aside too, which keeps it whole and says so."""
    names: list[str] = []
    directory = system.path(NETPLAN_DIR)
    ours = {posixpath.basename(NETPLAN_WIFI), posixpath.basename(NETPLAN_WIRED)}
    for path in sorted(directory.glob("*.yaml")):
        if path.name not in ours and _ETHERNETS.search(_uncommented(path)):
            os.replace(path, path.with_name(path.name + SET_ASIDE))
            names.append(path.name)
    if names:
        sync_directory(directory)
    renderers = {renderer for path in directory.glob(f"*.yaml{SET_ASIDE}")
                 for renderer in _RENDERER.findall(_uncommented(path))}
    return names, renderers


def _uncommented(path: Path) -> str:
    """A YAML file's text without its comments ('#' at a line's start or after a space);
    empty when it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(_COMMENT.sub(r"\1", line) for line in text.splitlines())


# Applying it on the running card.


def _reload(stack: str, wired: bool) -> list[str]:
    """Have the stack read its files now; what did not work is said (the files are there,
    so the next boot applies them anyway)."""
    problems = []
    if stack == "netplan":
        problems.append(("netplan apply", _run(["netplan", "apply"], APPLY_TIMEOUT)))
    elif stack == "NetworkManager":
        problems.append(("nmcli", _run(["nmcli", "connection", "reload"], APPLY_TIMEOUT)))
        if wired:
            # NetworkManager does not move a device that is up (on its automatic DHCP
            # profile) to a better profile by itself.
            problems.append(("nmcli", _run(["nmcli", "--wait", "60", "connection", "up",
                                            "uuid", NM_WIRED_UUID], APPLY_TIMEOUT)))
    else:
        problems.append(("networkctl", _run(["networkctl", "reload"], APPLY_TIMEOUT)))
    return [f"{what}: {problem} (the settings apply at the next boot)"
            for what, problem in problems if problem]


# netplan's YAML and NetworkManager's keyfiles.


def _netplan_static(static: Static) -> dict[str, Any]:
    # IPv6 stays automatic, as it was.
    found: dict[str, Any] = {"dhcp4": False, "dhcp6": True, "addresses": [static.address]}
    if static.gateway:
        found["routes"] = [{"to": "default", "via": static.gateway}]
    if static.dns:
        found["nameservers"] = {"addresses": list(static.dns)}
    return found


# Characters YAML does not take raw in a quoted string (DEL, C1 controls, non-characters) or
# reads as a line break there (U+0085, U+2028, U+2029); \uXXXX is the same in JSON and YAML.
_YAML_RAW_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff]")


def _yaml(document: dict[str, Any]) -> str:
    """JSON, which YAML reads too, so an SSID or key with quotes, backslashes or a '#' needs
    no YAML quoting rules. Beyond ASCII characters are written as they are: JSON's escapes for
    them (surrogate pairs, for an emoji) are not YAML, and netplan's parser rejects them."""
    text = json.dumps(document, indent=2, ensure_ascii=False)
    return _YAML_RAW_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n"


def _nm_ip(static: Static | None) -> str:
    """The [ipv4] and [ipv6] sections: automatic, or the static IPv4 address. Each family's
    name servers go in its own section (NetworkManager ignores an IPv6 one under [ipv4])."""
    if static is None:
        return "[ipv4]\nmethod=auto\n\n[ipv6]\nmethod=auto\n"
    gateway = f",{static.gateway}" if static.gateway else ""
    sections = []
    for version, settings in ((4, f"method=manual\naddress1={static.address}{gateway}\n"),
                              (6, "method=auto\n")):
        servers = static.servers(version)
        dns = f"dns={''.join(f'{s};' for s in servers)}\n" if servers else ""
        sections.append(f"[ipv{version}]\n{settings}{dns}")
    return "\n".join(sections)


def _keyfile(value: str) -> str:
    """A string value as NetworkManager's keyfile (GKeyFile) reads it back unchanged:
    backslashes and line breaks escaped, and a space at either end, which would be taken for
    the space around '=', as \\s."""
    escaped = (value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
               .replace("\t", "\\t"))
    if escaped.startswith(" "):
        escaped = "\\s" + escaped[1:]
    if escaped.endswith(" "):
        escaped = escaped[:-1] + "\\s"
    return escaped


def _nm_ssid(ssid: str) -> str:
    """The SSID as NetworkManager's own keyfile writer puts it: printable ASCII as a string
    with ';' escaped, anything else as its bytes, "67;97;102;195;169;". NetworkManager reads
    a value of only digits and ';' as bytes ("42;" would be the byte 42) and drops a '\\'
    before a ';', so a plain string could be misread."""
    raw = ssid.encode()
    if all(0x20 <= byte < 0x7F for byte in raw):
        return _keyfile(ssid.replace(";", "\\;"))
    return "".join(f"{byte};" for byte in raw)


# The locale.


def set_locale(system: System, locale: str,
               say: Callable[[str], None] | None = None) -> str:
    """Make `locale` the card's: listed in /etc/locale.gen (uncommented, or added with its
    charset from glibc's SUPPORTED list), generated by locale-gen on the running card, then
    LANG in /etc/default/locale (the whole file). Returns the line to show; `say`, when
    given, is told first that generating takes a while."""
    if not _present(system.path("usr/sbin/locale-gen")):
        return f"locale {locale}: NOT set: this image has no locale-gen (the locales package)"
    charset = _charset(system, locale)
    if charset is None:
        return f"locale {locale}: NOT set: /usr/share/i18n/SUPPORTED does not list it"
    gen = system.path("etc/locale.gen")
    text = gen.read_text(errors="replace") if gen.exists() else ""
    system.write("etc/locale.gen", _locale_gen(text, locale, charset))
    if system.live:
        if say:
            say(f"locale: generating {locale} (about a minute on a small board)...")
        # Only the locales not made yet: all of them again would take minutes more.
        problem = _run(["locale-gen", "--keep-existing"], LOCALE_GEN_TIMEOUT)
        # locale-gen goes on past a locale localedef could not make: ask for it instead.
        if problem is None and not _locale_available(locale):
            problem = "it made no such locale"
        if problem:
            return f"locale {locale}: NOT set: locale-gen: {problem}"
    for relative in _locale_files(system):
        system.write(relative, f"LANG={locale}\n")
    if not system.live:
        return f"locale: {locale} (not generated here, not the running card: run locale-gen)"
    return f"locale: {locale} (from the next login)"


def _charset(system: System, locale: str) -> str | None:
    """The charset glibc's list gives the locale ("de_DE.UTF-8 UTF-8"); without the list,
    the one its name says."""
    supported = system.path("usr/share/i18n/SUPPORTED")
    if supported.is_file():
        for line in supported.read_text(errors="replace").splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0] == locale:
                return fields[1]
        # Older lists lack C.UTF-8, which answers.py takes anyway (glibc has it built in).
        return "UTF-8" if locale == "C.UTF-8" else None
    codeset = locale.partition(".")[2].partition("@")[0]
    return codeset or None


def _locale_gen(text: str, locale: str, charset: str) -> str:
    """/etc/locale.gen with the locale's line active: the commented one uncommented (as
    Debian's file lists them all, "# de_DE.UTF-8 UTF-8"), else one added."""
    lines = text.splitlines()
    for number, line in enumerate(lines):
        fields = line.strip().lstrip("#").split()
        if fields[:1] == [locale] and len(fields) <= 2:
            if not line.lstrip().startswith("#"):
                return text if text.endswith("\n") else text + "\n"
            lines[number] = " ".join(fields) if len(fields) == 2 else f"{locale} {charset}"
            break
    else:
        lines.append(f"{locale} {charset}")
    return "\n".join(lines) + "\n"


def _locale_files(system: System) -> list[str]:
    """Where LANG goes: /etc/default/locale, which newer Debian (trixie) makes a link to
    /etc/locale.conf (written through, the link kept), and /etc/locale.conf where it is a
    file of its own (systemd reads that one)."""
    found: list[str] = []
    for relative in ("etc/default/locale", "etc/locale.conf"):
        target = _inside(system, relative)
        if target not in found and (relative == "etc/default/locale"
                                    or system.path(target).exists()):
            found.append(target)
    return found


def _inside(system: System, relative: str) -> str:
    """Where a link at `relative` leads, inside the root; the path itself when it is no
    link, or its link leads out of the root (then the link is replaced)."""
    for _ in range(8):
        path = system.path(relative)
        if not path.is_symlink():
            return relative
        target = os.readlink(path)
        resolved = posixpath.normpath(target.lstrip("/") if target.startswith("/") else
                                      posixpath.join(posixpath.dirname(relative), target))
        if resolved == ".." or resolved.startswith("../"):
            return relative
        relative = resolved
    return relative


def _locale_available(locale: str) -> bool:
    """Whether a new process can use the locale (in a child: setlocale changes a whole
    process)."""
    probe = "import locale, sys; locale.setlocale(locale.LC_ALL, sys.argv[1])"
    try:
        result = subprocess.run([sys.executable, "-I", "-c", probe, locale],
                                capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


# Small things.


def _present(path: Path) -> bool:
    """A file, or a link to one: an absolute link in a tree that is not the running card
    points outside it."""
    return path.exists() or path.is_symlink()


def _shown(text: str) -> str:
    """An SSID as the console can show it: as it is, unless it holds control characters."""
    return text if text.isprintable() else ascii(text)


def _run(argv: Sequence[str], timeout: int) -> str | None:
    """Run a command on the running card; None when it worked, else what went wrong."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                                check=False)
    except FileNotFoundError:
        return f"{argv[0]} is not installed"
    except OSError as exc:
        return str(exc)
    except subprocess.TimeoutExpired:
        return f"gave up after {timeout} s"
    if result.returncode == 0:
        return None
    said = (result.stderr.strip() or result.stdout.strip()).splitlines()
    return said[-1] if said else f"exit status {result.returncode}"
