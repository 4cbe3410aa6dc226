"""The network and locale answers on the card's files (builder/firstboot/netconf.py), for each
network stack an image can have: netplan (Armbian), NetworkManager alone, systemd-networkd
alone (the Debian base), none. Each applies to a temporary tree, and what it wrote is read
back as its reader would: netplan's YAML with yaml.safe_load, and where the host has them
with netplan itself (`netplan generate`, netplan.io) and NetworkManager's own keyfile reader
(libnm through python3-gi, gir1.2-nm-1.0); the locale's line compiled by localedef as
locale-gen would. Commands on a running card are stood in for: nothing here touches the
host's network or locales."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from firstboot_card import PYTHON

from builder.firstboot import netconf
from builder.firstboot.card import Settings
from builder.firstboot.netconf import (
    LOCALE_GEN_TIMEOUT,
    NETPLAN_WIFI,
    NETPLAN_WIRED,
    NETWORKD_WIRED,
    NM_WIRED,
    NM_WIRED_UUID,
    SET_ASIDE,
    WIFI_COUNTRY,
    network_stack,
    set_locale,
    set_network,
)
from builder.firstboot.system import System

KEY = "Zebra-Secret 4711"
STATIC = {"address": "192.168.1.50/24", "gateway": "192.168.1.1",
          "dns": ["1.1.1.1", "2606:4700:4700::1111"]}
NONE: dict[str, Any] = {"wifi_ssid": None, "wifi_key": None, "wifi_country": None,
                        "address": None, "gateway": None, "dns": []}
# The scenarios every stack is put through.
SCENARIOS: dict[str, dict[str, Any]] = {
    "wifi": {**NONE, "wifi_ssid": "Lab", "wifi_key": KEY},
    "wifi+country": {**NONE, "wifi_ssid": "Lab", "wifi_key": KEY, "wifi_country": "DE"},
    "wifi+static": {**NONE, "wifi_ssid": "Lab", "wifi_key": KEY, **STATIC},
    "wired-static": {**NONE, **STATIC},
    "country": {**NONE, "wifi_country": "DE"},
}
# SSIDs (1-32 bytes of anything) and keys (8-63 printable ASCII) that quoting gets wrong:
# YAML's own syntax and words, GKeyFile's escapes and leading/trailing spaces,
# NetworkManager's byte lists ("42;") and its escaped ';', line breaks YAML does not allow
# raw, characters JSON escapes as surrogate pairs.
NASTY_SSIDS = ['He said "hi" \\ #1: - x', " Lab\\Net;5G", "42;", "1;2;3;", "a\\;b", "yes",
               "null", "{[&*!|>'%@`]}", " lead and trail ", "tab\tnew\nline\r",
               "Café 😀", "\x85\u2028\x7f", "\\s\\n;;"]
NASTY_KEYS = ["pass\\word 123", " spaced out ", "#;'\"`$(x)%s{}", "\\\\\\\\;;;;", "a" * 63,
              "ab" * 32]
ARMBIAN_DHCP = ("# Added by Armbian\nnetwork:\n  version: 2\n  renderer: networkd\n"
                "  ethernets:\n    all-eth-interfaces:\n      match:\n        name: \"e*\"\n"
                "      dhcp4: yes\n      dhcp6: yes\n      ipv6-privacy: yes\n")
ARMBIAN_NM = "# Added by Armbian\nnetwork:\n  version: 2\n  renderer: NetworkManager\n"
DEBIAN_WIRED = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"


def card(root: Path, stack: str | None, live: bool = False) -> System:
    """A tree with `stack`'s files as the images have them."""
    (root / "usr/sbin").mkdir(parents=True, exist_ok=True)
    if stack == "netplan":
        (root / "usr/sbin/netplan").write_text("")
        (root / "etc/netplan").mkdir(parents=True)
        (root / "etc/netplan/10-dhcp-all-interfaces.yaml").write_text(ARMBIAN_DHCP)
    elif stack == "NetworkManager":
        (root / "usr/sbin/NetworkManager").write_text("")
    elif stack == "networkd":
        (root / "usr/lib/systemd").mkdir(parents=True)
        (root / "usr/lib/systemd/systemd-networkd").write_text("")
        (root / "etc/systemd/network").mkdir(parents=True)
        (root / "etc/systemd/network/20-wired.network").write_text(DEBIAN_WIRED)
    return System(root, Settings(), PYTHON, live=live)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plan(path: Path) -> dict[str, Any]:
    assert mode(path) == 0o600, "netplan warns about (and the key is in) a readable file"
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict) and document["network"]["version"] == 2
    network: dict[str, Any] = document["network"]
    return network


# Reading NetworkManager's keyfiles back: GKeyFile's escapes (glib's
# g_key_file_parse_value_as_string), then how NetworkManager reads an SSID (nm-keyfile.c's
# get_bytes: a value of only digits, spaces and ';' is a byte list, else '\;' is ';').


def gkeyfile(path: Path) -> dict[str, dict[str, str]]:
    assert mode(path) == 0o600, "NetworkManager ignores a keyfile others can read"
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(path.read_text())
    return {name: {key: unescape(value) for key, value in parser[name].items()}
            for name in parser.sections()}


def gkeyfile_value(path: Path, group: str, key: str) -> str:
    """One value as GKeyFile finds it: configparser strips Unicode spaces (U+0085, U+2028)
    off a value, GKeyFile only ASCII ones after the '='."""
    current = None
    for line in path.read_text().split("\n"):
        if line.startswith("["):
            current = line[1:line.index("]")]
        elif current == group and line.partition("=")[0].strip(" \t") == key:
            return unescape(line.partition("=")[2].lstrip(" \t"))
    raise AssertionError(f"no {key} in [{group}] of {path}")


def unescape(value: str) -> str:
    escapes = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    out, chars = [], iter(value)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            # Any other escape is left as it is (\; stays for NetworkManager to read).
            out.append(escapes.get(nxt, "\\" + nxt))
        else:
            out.append(ch)
    return "".join(out)


def nm_ssid(value: str) -> bytes:
    if re.fullmatch(r"(?:[ \t\n\r]*[0-9]{1,3}[ \t\n\r]*;)+[ \t\n\r]*", value):
        numbers = [int(n) for n in re.findall(r"[0-9]+", value)]
        if all(n <= 255 for n in numbers):
            return bytes(numbers)
    return value.replace("\\;", ";").encode()


# NetworkManager's own reader, libnm's nm_keyfile_read (the daemon's code), where the host's
# python3 has it through GObject introspection.
NM_READER = r"""
import json, sys
import gi
gi.require_version("NM", "1.0")
from gi.repository import GLib, NM
warnings = []
def handler(keyfile, connection, kind, data, *user):
    if kind == NM.KeyfileHandlerType.WARN:
        warnings.append(data.warn_get()[0])
    return False
keyfile = GLib.KeyFile()
keyfile.load_from_file(sys.argv[1], GLib.KeyFileFlags.NONE)
connection = NM.keyfile_read(keyfile, "/", NM.KeyfileHandlerFlags.NONE, handler, None)
connection.normalize()
connection.verify()
setting = connection.get_setting_connection()
out = {"id": setting.get_id(), "type": setting.get_connection_type(),
       "uuid": setting.get_uuid(), "interface": setting.get_interface_name(),
       "priority": setting.get_autoconnect_priority(),
       "autoconnect": setting.get_autoconnect(), "warnings": warnings}
wifi = connection.get_setting_wireless()
if wifi:
    out["ssid"] = list(wifi.get_ssid().get_data())
security = connection.get_setting_wireless_security()
if security:
    out["psk"] = security.get_psk()
for family, ip in (("ipv4", connection.get_setting_ip4_config()),
                   ("ipv6", connection.get_setting_ip6_config())):
    out[family] = {"method": ip.get_method(), "gateway": ip.get_gateway(),
                   "addresses": [f"{a.get_address()}/{a.get_prefix()}" for a in
                                 (ip.get_address(i) for i in range(ip.get_num_addresses()))],
                   "dns": [ip.get_dns(i) for i in range(ip.get_num_dns())],
                   "routes": [f"{r.get_dest()}/{r.get_prefix()} via {r.get_next_hop()}" for r in
                              (ip.get_route(i) for i in range(ip.get_num_routes()))]}
print(json.dumps(out))
"""


def libnm_python() -> str | None:
    for python in ("/usr/bin/python3",):
        if os.access(python, os.X_OK) and subprocess.run(
                [python, "-c", "import gi; gi.require_version('NM', '1.0'); "
                               "from gi.repository import NM"],
                capture_output=True, check=False).returncode == 0:
            return python
    return None


LIBNM = libnm_python()
needs_libnm = pytest.mark.skipif(LIBNM is None, reason="NetworkManager's keyfile reader (libnm) "
                                 "is not on this host: apt install python3-gi gir1.2-nm-1.0")
needs_netplan = pytest.mark.skipif(shutil.which("netplan") is None,
                                   reason="netplan is not on this host: apt install netplan.io")


def nm_read(path: Path) -> dict[str, Any]:
    assert LIBNM
    result = subprocess.run([LIBNM, "-c", NM_READER, str(path)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def netplan_generate(root: Path) -> Path:
    """netplan's own parser and generator over the tree; returns its /run."""
    result = subprocess.run(["netplan", "generate", "--root-dir", str(root)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "Error" not in result.stderr and "ERROR" not in result.stderr, result.stderr
    return root / "run"


def no_secret(lines: list[str]) -> list[str]:
    assert not any(KEY in line for line in lines), lines
    return lines


# netplan (Armbian).


def test_netplan_wifi(tmp_path: Path) -> None:
    system = card(tmp_path, "netplan")
    lines = no_secret(set_network(system, **SCENARIOS["wifi"]))
    assert lines == ["Wi-Fi Lab: configured (netplan)"]
    wifi = plan(tmp_path / NETPLAN_WIFI)["wifis"]["wlan0"]
    assert wifi == {"access-points": {"Lab": {"password": KEY}}, "dhcp4": True, "dhcp6": True}
    assert (tmp_path / "etc/netplan/10-dhcp-all-interfaces.yaml").read_text() == ARMBIAN_DHCP
    assert not (tmp_path / WIFI_COUNTRY).exists()


def test_netplan_wifi_with_its_country(tmp_path: Path) -> None:
    system = card(tmp_path, "netplan")
    lines = no_secret(set_network(system, **SCENARIOS["wifi+country"]))
    assert lines == ["Wi-Fi country: DE", "Wi-Fi Lab: configured (netplan)"]
    assert plan(tmp_path / NETPLAN_WIFI)["wifis"]["wlan0"]["regulatory-domain"] == "DE"
    assert "options cfg80211 ieee80211_regdom=DE\n" in (tmp_path / WIFI_COUNTRY).read_text()


def test_netplan_static_address_on_wifi(tmp_path: Path) -> None:
    system = card(tmp_path, "netplan")
    lines = no_secret(set_network(system, **SCENARIOS["wifi+static"]))
    assert lines == ["Wi-Fi Lab: configured (netplan)",
                     "address 192.168.1.50/24 on Wi-Fi, gateway 192.168.1.1, "
                     "DNS 1.1.1.1 2606:4700:4700::1111"]
    wifi = plan(tmp_path / NETPLAN_WIFI)["wifis"]["wlan0"]
    assert wifi["dhcp4"] is False and wifi["dhcp6"] is True
    assert wifi["addresses"] == ["192.168.1.50/24"]
    assert wifi["routes"] == [{"to": "default", "via": "192.168.1.1"}]
    assert wifi["nameservers"] == {"addresses": ["1.1.1.1", "2606:4700:4700::1111"]}
    assert "regulatory-domain" not in wifi
    # The wired ports keep Armbian's DHCP: the address is not theirs.
    assert (tmp_path / "etc/netplan/10-dhcp-all-interfaces.yaml").exists()
    assert not (tmp_path / NETPLAN_WIRED).exists()


def test_netplan_static_address_on_the_wired_ports(tmp_path: Path) -> None:
    system = card(tmp_path, "netplan")
    netplan_dir = tmp_path / "etc/netplan"
    (netplan_dir / "00-default-use-network-manager.yaml").write_text(ARMBIAN_NM)
    # Someone's own file in flow style, one only mentioning ethernets in a comment, and
    # one that is not netplan's (not *.yaml).
    (netplan_dir / "50-mine.yaml").write_text('{"network": {"ethernets": {"eth0": {}}}}\n')
    (netplan_dir / "60-wifi.yaml").write_text("# no ethernets: here\nnetwork:\n  wifis: {}\n")
    (netplan_dir / "70-old.yaml.bak").write_text(ARMBIAN_DHCP)
    lines = no_secret(set_network(system, **SCENARIOS["wired-static"]))
    assert lines == [
        "/etc/netplan/10-dhcp-all-interfaces.yaml: set aside as 10-dhcp-all-interfaces.yaml"
        f"{SET_ASIDE} (it configured the wired ports too)",
        f"/etc/netplan/50-mine.yaml: set aside as 50-mine.yaml{SET_ASIDE} (it configured the "
        "wired ports too)",
        "address 192.168.1.50/24 on the wired ports (netplan), gateway 192.168.1.1, "
        "DNS 1.1.1.1 2606:4700:4700::1111"]
    assert sorted(p.name for p in netplan_dir.iterdir()) == [
        "00-default-use-network-manager.yaml", f"10-dhcp-all-interfaces.yaml{SET_ASIDE}",
        "30-jupyter-wired.yaml", f"50-mine.yaml{SET_ASIDE}", "60-wifi.yaml", "70-old.yaml.bak"]
    assert (netplan_dir / f"10-dhcp-all-interfaces.yaml{SET_ASIDE}").read_text() == \
        ARMBIAN_DHCP, "kept whole, to be put back"
    wired = plan(tmp_path / NETPLAN_WIRED)["ethernets"]["jupyter-wired"]
    assert wired == {"match": {"name": "e*"}, "renderer": "networkd", "dhcp4": False,
                     "dhcp6": True, "addresses": ["192.168.1.50/24"],
                     "routes": [{"to": "default", "via": "192.168.1.1"}],
                     "nameservers": {"addresses": ["1.1.1.1", "2606:4700:4700::1111"]}}
    assert not (tmp_path / NETPLAN_WIFI).exists()


def test_netplan_country_alone(tmp_path: Path) -> None:
    system = card(tmp_path, "netplan")
    assert set_network(system, **SCENARIOS["country"]) == \
        ["Wi-Fi country: DE (for a Wi-Fi network joined later)"]
    assert (tmp_path / WIFI_COUNTRY).read_text().endswith(
        "\noptions cfg80211 ieee80211_regdom=DE\n")
    assert sorted(p.name for p in (tmp_path / "etc/netplan").iterdir()) == \
        ["10-dhcp-all-interfaces.yaml"]


def test_netplan_moves_the_address_from_the_wired_ports_to_wifi(tmp_path: Path) -> None:
    system = card(tmp_path, "netplan")
    set_network(system, **SCENARIOS["wired-static"])
    assert not (tmp_path / "etc/netplan/10-dhcp-all-interfaces.yaml").exists()
    lines = set_network(system, **SCENARIOS["wifi+static"])
    assert lines[-1] == "wired ports: back to the image's own settings (the address is on " \
                        "Wi-Fi now)"
    assert not (tmp_path / NETPLAN_WIRED).exists()
    assert (tmp_path / "etc/netplan/10-dhcp-all-interfaces.yaml").read_text() == ARMBIAN_DHCP
    assert not list((tmp_path / "etc/netplan").glob(f"*{SET_ASIDE}"))
    assert plan(tmp_path / NETPLAN_WIFI)["wifis"]["wlan0"]["addresses"] == ["192.168.1.50/24"]


@pytest.mark.parametrize("ssid", NASTY_SSIDS)
def test_netplan_yaml_keeps_any_ssid_and_key(tmp_path: Path, ssid: str) -> None:
    key = NASTY_KEYS[NASTY_SSIDS.index(ssid) % len(NASTY_KEYS)]
    system = card(tmp_path, "netplan")
    set_network(system, **{**SCENARIOS["wifi"], "wifi_ssid": ssid, "wifi_key": key})
    points = plan(tmp_path / NETPLAN_WIFI)["wifis"]["wlan0"]["access-points"]
    assert points == {ssid: {"password": key}}
    text = (tmp_path / NETPLAN_WIFI).read_text()
    assert not re.search("[\x7f-\x9f\u2028\u2029]|\\\\ud[89a-f]", text, re.IGNORECASE), \
        "nothing YAML takes for a line break, nor surrogate escapes libyaml refuses"
    if shutil.which("netplan"):
        netplan_generate(tmp_path)
        assert (tmp_path / "run/netplan/wpa-wlan0.conf").exists()


@needs_netplan
@pytest.mark.parametrize("scenario", ["wifi+country", "wifi+static"])
def test_netplan_reads_the_wifi_as_meant(tmp_path: Path, scenario: str) -> None:
    system = card(tmp_path, "netplan")
    set_network(system, **SCENARIOS[scenario])
    run = netplan_generate(tmp_path)
    supplicant = (run / "netplan/wpa-wlan0.conf").read_text()
    assert 'ssid="Lab"' in supplicant and f'psk="{KEY}"' in supplicant
    network = (run / "systemd/network/10-netplan-wlan0.network").read_text()
    if scenario == "wifi+country":
        assert "country=DE" in supplicant
        assert "DHCP=yes" in network
    else:
        assert "country=" not in supplicant
        assert "Address=192.168.1.50/24" in network and "Gateway=192.168.1.1" in network
        assert "DNS=1.1.1.1" in network and "DNS=2606:4700:4700::1111" in network
        assert "DHCP=ipv6" in network
    # Armbian's DHCP for the wired ports is still there, beside the Wi-Fi.
    assert (run / "systemd/network/10-netplan-all-eth-interfaces.network").exists()


@needs_netplan
def test_netplan_gives_the_wired_ports_the_address_alone(tmp_path: Path) -> None:
    system = card(tmp_path, "netplan")
    run = netplan_generate(tmp_path)
    assert (run / "systemd/network/10-netplan-all-eth-interfaces.network").exists(), \
        "the check below can fail: Armbian's file makes this one"
    shutil.rmtree(run)
    set_network(system, **SCENARIOS["wired-static"])
    run = netplan_generate(tmp_path)
    assert sorted(p.name for p in (run / "systemd/network").iterdir()) == \
        ["10-netplan-jupyter-wired.network"]
    network = (run / "systemd/network/10-netplan-jupyter-wired.network").read_text()
    assert "Name=e*" in network and "Address=192.168.1.50/24" in network
    assert "Gateway=192.168.1.1" in network and "DNS=1.1.1.1" in network


def networkmanager_plans(root: Path) -> System:
    """Armbian's netplan for NetworkManager, and someone's file giving eth0 DHCP there."""
    system = card(root, "netplan")
    netplan_dir = root / "etc/netplan"
    (netplan_dir / "10-dhcp-all-interfaces.yaml").unlink()
    (netplan_dir / "00-default-use-network-manager.yaml").write_text(ARMBIAN_NM)
    (netplan_dir / "20-lan.yaml").write_text(
        "network:\n  renderer: NetworkManager\n  ethernets:\n    eth0: {dhcp4: true}\n")
    return system


def test_netplan_keeps_the_renderer_of_what_it_sets_aside(tmp_path: Path) -> None:
    """An image that runs NetworkManager and not networkd: the wired ports stay with it."""
    system = networkmanager_plans(tmp_path)
    lines = set_network(system, **SCENARIOS["wired-static"])
    assert any("20-lan.yaml: set aside" in line for line in lines)
    assert plan(tmp_path / NETPLAN_WIRED)["ethernets"]["jupyter-wired"]["renderer"] == \
        "NetworkManager"
    set_network(system, **{**SCENARIOS["wired-static"], "dns": []})
    assert plan(tmp_path / NETPLAN_WIRED)["ethernets"]["jupyter-wired"]["renderer"] == \
        "NetworkManager", "an earlier run's file set aside still chooses it"
    assert (tmp_path / "etc/netplan/00-default-use-network-manager.yaml").read_text() == \
        ARMBIAN_NM


@needs_netplan
@needs_libnm
def test_netplan_for_networkmanager_makes_a_profile_it_reads(tmp_path: Path) -> None:
    """netplan renders for NetworkManager: the static address on the wired ports becomes a
    NetworkManager profile that NetworkManager reads, and eth0's DHCP one is gone."""
    system = networkmanager_plans(tmp_path)
    set_network(system, **SCENARIOS["wired-static"])
    run = netplan_generate(tmp_path)
    profile = nm_read(run / "NetworkManager/system-connections/"
                            "netplan-jupyter-wired.nmconnection")
    assert profile["ipv4"]["addresses"] == ["192.168.1.50/24"]
    assert profile["ipv4"]["routes"] == ["0.0.0.0/0 via 192.168.1.1"]
    assert profile["ipv6"]["method"] == "auto" and profile["warnings"] == []
    assert not list((run / "NetworkManager/system-connections").glob("netplan-eth0*"))


# NetworkManager alone.


def nm_wifi(root: Path, name: str = "Lab") -> Path:
    return root / netconf.NM_CONNECTIONS / f"{name}.nmconnection"


def test_networkmanager_wifi(tmp_path: Path) -> None:
    system = card(tmp_path, "NetworkManager")
    assert no_secret(set_network(system, **SCENARIOS["wifi"])) == \
        ["Wi-Fi Lab: configured (NetworkManager)"]
    keyfile = gkeyfile(nm_wifi(tmp_path))
    assert keyfile["connection"] == {"id": "Lab", "type": "wifi", "autoconnect": "true"}
    assert keyfile["wifi"] == {"mode": "infrastructure", "ssid": "Lab"}
    assert keyfile["wifi-security"] == {"key-mgmt": "wpa-psk", "psk": KEY}
    assert keyfile["ipv4"] == {"method": "auto"} and keyfile["ipv6"] == {"method": "auto"}
    assert not (tmp_path / NM_WIRED).exists() and not (tmp_path / WIFI_COUNTRY).exists()


def test_networkmanager_wifi_with_its_country(tmp_path: Path) -> None:
    system = card(tmp_path, "NetworkManager")
    lines = no_secret(set_network(system, **SCENARIOS["wifi+country"]))
    assert lines == ["Wi-Fi country: DE", "Wi-Fi Lab: configured (NetworkManager)"]
    # NetworkManager has no country of its own: the kernel's, at every boot.
    assert "options cfg80211 ieee80211_regdom=DE\n" in (tmp_path / WIFI_COUNTRY).read_text()
    assert gkeyfile(nm_wifi(tmp_path))["wifi"]["ssid"] == "Lab"


def test_networkmanager_static_address_on_wifi(tmp_path: Path) -> None:
    system = card(tmp_path, "NetworkManager")
    lines = no_secret(set_network(system, **SCENARIOS["wifi+static"]))
    assert lines[1] == "address 192.168.1.50/24 on Wi-Fi, gateway 192.168.1.1, " \
                       "DNS 1.1.1.1 2606:4700:4700::1111"
    keyfile = gkeyfile(nm_wifi(tmp_path))
    assert keyfile["ipv4"] == {"method": "manual", "address1": "192.168.1.50/24,192.168.1.1",
                               "dns": "1.1.1.1;"}
    assert keyfile["ipv6"] == {"method": "auto", "dns": "2606:4700:4700::1111;"}
    assert not (tmp_path / NM_WIRED).exists()


def test_networkmanager_static_address_on_the_wired_ports(tmp_path: Path) -> None:
    system = card(tmp_path, "NetworkManager")
    lines = no_secret(set_network(system, **{**SCENARIOS["wired-static"], "gateway": None,
                                             "dns": ["9.9.9.9"]}))
    assert lines == ["address 192.168.1.50/24 on the wired ports (NetworkManager), "
                     "no gateway, DNS 9.9.9.9"]
    keyfile = gkeyfile(tmp_path / NM_WIRED)
    assert keyfile["connection"]["type"] == "ethernet"
    assert "interface-name" not in keyfile["connection"], "any wired device"
    assert int(keyfile["connection"]["autoconnect-priority"]) > 0
    assert keyfile["connection"]["uuid"] == NM_WIRED_UUID
    assert keyfile["ipv4"] == {"method": "manual", "address1": "192.168.1.50/24",
                               "dns": "9.9.9.9;"}
    assert keyfile["ipv6"] == {"method": "auto"}
    assert not list((tmp_path / netconf.NM_CONNECTIONS).glob("Lab*"))


def test_networkmanager_country_alone(tmp_path: Path) -> None:
    system = card(tmp_path, "NetworkManager")
    assert set_network(system, **SCENARIOS["country"]) == \
        ["Wi-Fi country: DE (for a Wi-Fi network joined later)"]
    assert (tmp_path / WIFI_COUNTRY).exists()
    assert not (tmp_path / netconf.NM_CONNECTIONS).exists()


def test_networkmanager_moves_the_address_from_the_wired_ports_to_wifi(tmp_path: Path) -> None:
    system = card(tmp_path, "NetworkManager")
    set_network(system, **SCENARIOS["wired-static"])
    assert (tmp_path / NM_WIRED).exists()
    set_network(system, **SCENARIOS["wifi+static"])
    assert not (tmp_path / NM_WIRED).exists()
    assert gkeyfile(nm_wifi(tmp_path))["ipv4"]["method"] == "manual"


def test_networkmanager_ssid_as_its_own_writer_puts_it(tmp_path: Path) -> None:
    """NetworkManager's writer escapes ';' in an SSID and writes one beyond printable ASCII
    as its bytes: its reader would take "42;" for the byte 42."""
    system = card(tmp_path, "NetworkManager")
    set_network(system, **{**SCENARIOS["wifi"], "wifi_ssid": " Lab\\Net;5G",
                           "wifi_key": "pass\\word 123"})
    text = nm_wifi(tmp_path, "_Lab_Net_5G").read_text()
    assert "\nssid=\\sLab\\\\Net\\\\;5G\n" in text
    assert "\npsk=pass\\\\word 123\n" in text
    set_network(system, **{**SCENARIOS["wifi"], "wifi_ssid": "Café"})
    assert "\nssid=67;97;102;195;169;\n" in nm_wifi(tmp_path, "Caf_").read_text()


@pytest.mark.parametrize("ssid", NASTY_SSIDS)
def test_networkmanager_keyfile_keeps_any_ssid_and_key(tmp_path: Path, ssid: str) -> None:
    key = NASTY_KEYS[NASTY_SSIDS.index(ssid) % len(NASTY_KEYS)]
    system = card(tmp_path, "NetworkManager")
    lines = set_network(system, **{**SCENARIOS["wifi+static"], "wifi_ssid": ssid,
                                   "wifi_key": key})
    assert not any(key in line for line in lines)
    (path,) = (tmp_path / netconf.NM_CONNECTIONS).iterdir()
    keyfile = gkeyfile(path)
    assert list(keyfile) == ["connection", "wifi", "wifi-security", "ipv4", "ipv6"]
    assert nm_ssid(keyfile["wifi"]["ssid"]) == ssid.encode()
    assert keyfile["wifi-security"]["psk"] == key
    assert nm_ssid(gkeyfile_value(path, "wifi", "ssid")) == ssid.encode()
    assert gkeyfile_value(path, "wifi-security", "psk") == key
    assert gkeyfile_value(path, "connection", "id") == ssid
    if LIBNM:
        read = nm_read(path)
        assert (bytes(read["ssid"]), read["psk"], read["id"]) == (ssid.encode(), key, ssid)
        assert read["warnings"] == []


@needs_libnm
def test_networkmanager_reads_the_profiles_as_meant(tmp_path: Path) -> None:
    system = card(tmp_path, "NetworkManager")
    set_network(system, **SCENARIOS["wifi+static"])
    wifi = nm_read(nm_wifi(tmp_path))
    assert wifi["type"] == "802-11-wireless" and wifi["autoconnect"] is True
    assert wifi["ipv4"] == {"method": "manual", "gateway": "192.168.1.1",
                            "addresses": ["192.168.1.50/24"], "dns": ["1.1.1.1"],
                            "routes": []}
    assert wifi["ipv6"]["method"] == "auto"
    assert wifi["ipv6"]["dns"] == ["2606:4700:4700::1111"]
    assert wifi["warnings"] == []
    set_network(system, **SCENARIOS["wired-static"])
    wired = nm_read(tmp_path / NM_WIRED)
    assert wired["type"] == "802-3-ethernet" and wired["interface"] is None
    assert wired["uuid"] == NM_WIRED_UUID and wired["priority"] > 0
    assert wired["ipv4"]["addresses"] == ["192.168.1.50/24"]
    assert wired["ipv4"]["gateway"] == "192.168.1.1" and wired["warnings"] == []


# systemd-networkd alone (the Debian base).


def networkd_file(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A .network file's sections and their settings, in order (keys repeat: DNS=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            current.append((key, value))
    return sections


@pytest.mark.parametrize("scenario", ["wifi", "wifi+country", "wifi+static"])
def test_networkd_cannot_join_wifi(tmp_path: Path, scenario: str) -> None:
    system = card(tmp_path, "networkd")
    lines = no_secret(set_network(system, **SCENARIOS[scenario]))
    assert "Wi-Fi Lab: NOT configured: this image has neither netplan nor NetworkManager" in \
        lines
    if scenario == "wifi+static":
        assert lines[-1] == "address 192.168.1.50/24: NOT configured: it is for the Wi-Fi " \
                            "network, which this image cannot join"
    assert (tmp_path / WIFI_COUNTRY).exists() == (scenario == "wifi+country")
    assert sorted(p.name for p in (tmp_path / "etc/systemd/network").iterdir()) == \
        ["20-wired.network"]


def test_networkd_static_address_on_the_wired_ports(tmp_path: Path) -> None:
    system = card(tmp_path, "networkd")
    lines = set_network(system, **SCENARIOS["wired-static"])
    assert lines == ["address 192.168.1.50/24 on the wired ports (networkd), gateway "
                     "192.168.1.1, DNS 1.1.1.1 2606:4700:4700::1111"]
    ours = tmp_path / NETWORKD_WIRED
    assert networkd_file(ours) == {
        "Match": [("Name", "en* eth*")],
        "Network": [("Address", "192.168.1.50/24"), ("Gateway", "192.168.1.1"),
                    ("DNS", "1.1.1.1"), ("DNS", "2606:4700:4700::1111"), ("DHCP", "ipv6")]}
    base = tmp_path / "etc/systemd/network/20-wired.network"
    # networkd takes the first matching file in lexical order: ours, for the same ports.
    assert sorted([base.name, ours.name])[0] == ours.name
    assert networkd_file(ours)["Match"] == networkd_file(base)["Match"]
    assert base.read_text() == DEBIAN_WIRED


def test_networkd_country_alone(tmp_path: Path) -> None:
    system = card(tmp_path, "networkd")
    assert set_network(system, **SCENARIOS["country"]) == \
        ["Wi-Fi country: DE (for a Wi-Fi network joined later)"]
    assert (tmp_path / WIFI_COUNTRY).exists()
    assert not (tmp_path / NETWORKD_WIRED).exists()


def test_networkd_counts_only_where_it_is_used(tmp_path: Path) -> None:
    (tmp_path / "usr/lib/systemd").mkdir(parents=True)
    (tmp_path / "usr/lib/systemd/systemd-networkd").write_text("")
    system = System(tmp_path, Settings(), PYTHON)
    assert network_stack(system) is None, "in every systemd image, used or not"
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    # An absolute link, as systemctl enable makes it: it leads out of a tree.
    (wants / "systemd-networkd.service").symlink_to("/lib/systemd/system/nowhere.service")
    assert network_stack(system) == "networkd"


# No network stack at all.


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_without_a_stack_only_the_country_is_written(tmp_path: Path, scenario: str) -> None:
    system = card(tmp_path, None)
    assert network_stack(system) is None
    lines = no_secret(set_network(system, **SCENARIOS[scenario]))
    if scenario == "wired-static":
        assert lines == ["address 192.168.1.50/24: NOT configured: this image has neither "
                         "netplan, NetworkManager nor systemd-networkd"]
    if "wifi" in scenario:
        assert "Wi-Fi Lab: NOT configured: this image has neither netplan nor " \
               "NetworkManager" in lines
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ([WIFI_COUNTRY] if "country" in scenario else [])


@pytest.mark.parametrize("stack", ["netplan", "NetworkManager", "networkd", None])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_nothing_runs_off_the_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   stack: str | None, scenario: str) -> None:
    """A test's tree or a chroot: netplan apply, nmcli, iw would change the host."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"ran {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    system = card(tmp_path, stack)
    assert network_stack(system) == stack
    no_secret(set_network(system, **SCENARIOS[scenario]))


# On the running card: commands stood in for.


@dataclass
class Commands:
    """subprocess.run's stand-in: records each command and its timeout; `answer` says how
    one ends (a return code and its error, or an exception)."""

    answer: Callable[[list[str]], tuple[int, str] | BaseException] = \
        lambda argv: (0, "")
    ran: list[tuple[list[str], float | None]] = field(default_factory=list)

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.ran.append((list(argv), kwargs.get("timeout")))
        assert kwargs.get("timeout"), "every command on the card has a time limit"
        answer = self.answer(list(argv))
        if isinstance(answer, BaseException):
            raise answer
        code, error = answer
        return subprocess.CompletedProcess(argv, code, "", error)

    def names(self) -> list[str]:
        return [" ".join([Path(argv[0]).name, *argv[1:]]) for argv, _ in self.ran]


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> Iterator[Commands]:
    stand_in = Commands()
    monkeypatch.setattr(subprocess, "run", stand_in)
    yield stand_in


def test_live_netplan_applies_once(tmp_path: Path, commands: Commands) -> None:
    system = card(tmp_path, "netplan", live=True)
    (tmp_path / "usr/sbin/iw").write_text("")
    lines = set_network(system, **{**SCENARIOS["wifi+country"], **STATIC})
    assert commands.names() == ["iw reg set DE", "netplan apply"]
    assert all(timeout and timeout <= 600 for _, timeout in commands.ran)
    assert lines[0] == "Wi-Fi country: DE"


def test_live_country_without_iw_waits_for_the_next_boot(tmp_path: Path,
                                                         commands: Commands) -> None:
    system = card(tmp_path, "networkd", live=True)
    assert set_network(system, **SCENARIOS["country"]) == [
        "Wi-Fi country: DE (for a Wi-Fi network joined later), from the next boot (not now: "
        "iw is not installed)"]
    assert commands.ran == [], "the country alone changes no network file"


def test_live_networkmanager_moves_the_wired_device_to_the_address(
        tmp_path: Path, commands: Commands) -> None:
    system = card(tmp_path, "NetworkManager", live=True)
    set_network(system, **SCENARIOS["wired-static"])
    assert commands.names() == ["nmcli connection reload",
                                f"nmcli --wait 60 connection up uuid {NM_WIRED_UUID}"]
    commands.ran.clear()
    set_network(system, **SCENARIOS["wifi"])
    assert commands.names() == ["nmcli connection reload"]


def test_live_networkd_reloads(tmp_path: Path, commands: Commands) -> None:
    system = card(tmp_path, "networkd", live=True)
    set_network(system, **SCENARIOS["wired-static"])
    assert commands.names() == ["networkctl reload"]


def test_live_failures_are_said_not_raised(tmp_path: Path, commands: Commands) -> None:
    commands.answer = lambda argv: (1, "Error: something broke\nInvalid YAML: at line 3")
    system = card(tmp_path, "netplan", live=True)
    lines = set_network(system, **SCENARIOS["wifi"])
    assert lines[-1] == "netplan apply: Invalid YAML: at line 3 (the settings apply at the " \
                        "next boot)"
    commands.answer = lambda argv: subprocess.TimeoutExpired(argv, 120)
    lines = set_network(system, **SCENARIOS["wifi"])
    assert lines[-1] == "netplan apply: gave up after 120 s (the settings apply at the next " \
                        "boot)"


# The locale.


LOCALE_GEN = ("# This file lists locales that you wish to have built. You can find a list\n"
              "# of valid supported locales at /usr/share/i18n/SUPPORTED, and you can add\n"
              "\n# C.UTF-8 UTF-8\n# de_DE ISO-8859-1\n# de_DE.UTF-8 UTF-8\n"
              "# de_DE@euro ISO-8859-15\nen_US.UTF-8 UTF-8\n# fr_FR.UTF-8 UTF-8\n")
SUPPORTED = ("C.UTF-8 UTF-8\nde_DE.UTF-8 UTF-8\nde_DE ISO-8859-1\nde_DE@euro ISO-8859-15\n"
             "en_US.UTF-8 UTF-8\nsr_RS@latin UTF-8\nfr_FR.UTF-8 UTF-8\n")


def locale_card(root: Path, live: bool = False) -> System:
    for relative, text in (("usr/sbin/locale-gen", ""), ("usr/share/i18n/SUPPORTED", SUPPORTED),
                           ("etc/locale.gen", LOCALE_GEN),
                           ("etc/default/locale", "LANG=en_US.UTF-8\nLC_ALL=en_US.UTF-8\n")):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return System(root, Settings(), PYTHON, live=live)


def active(root: Path) -> list[str]:
    return [line for line in (root / "etc/locale.gen").read_text().splitlines()
            if line and not line.startswith("#")]


def test_locale_uncommented_and_made_the_default(tmp_path: Path) -> None:
    system = locale_card(tmp_path)
    told: list[str] = []
    said = set_locale(system, "de_DE.UTF-8", told.append)
    assert told == [], "nothing is generated off the card"
    assert said == "locale: de_DE.UTF-8 (not generated here, not the running card: run " \
                   "locale-gen)"
    assert active(tmp_path) == ["de_DE.UTF-8 UTF-8", "en_US.UTF-8 UTF-8"]
    text = (tmp_path / "etc/locale.gen").read_text()
    assert text == LOCALE_GEN.replace("# de_DE.UTF-8 UTF-8", "de_DE.UTF-8 UTF-8"), \
        "every other line as it was"
    assert (tmp_path / "etc/default/locale").read_text() == "LANG=de_DE.UTF-8\n"


def test_locale_added_with_its_charset_from_the_supported_list(tmp_path: Path) -> None:
    system = locale_card(tmp_path)
    set_locale(system, "sr_RS@latin")
    assert active(tmp_path) == ["en_US.UTF-8 UTF-8", "sr_RS@latin UTF-8"]
    set_locale(system, "sr_RS@latin")
    assert active(tmp_path) == ["en_US.UTF-8 UTF-8", "sr_RS@latin UTF-8"], "not twice"
    set_locale(system, "en_US.UTF-8")
    assert active(tmp_path) == ["en_US.UTF-8 UTF-8", "sr_RS@latin UTF-8"]
    assert (tmp_path / "etc/default/locale").read_text() == "LANG=en_US.UTF-8\n"
    (tmp_path / "usr/share/i18n/SUPPORTED").write_text("de_DE.UTF-8 UTF-8\n")
    set_locale(system, "C.UTF-8")
    assert active(tmp_path)[0] == "C.UTF-8 UTF-8", "an older list without it"


def test_locale_through_trixies_link_to_locale_conf(tmp_path: Path) -> None:
    """Debian trixie: /etc/default/locale is a link to /etc/locale.conf, which systemd reads."""
    system = locale_card(tmp_path)
    (tmp_path / "etc/default/locale").unlink()
    (tmp_path / "etc/locale.conf").write_text("LANG=C.UTF-8\n")
    (tmp_path / "etc/default/locale").symlink_to("../locale.conf")
    set_locale(system, "fr_FR.UTF-8")
    assert os.readlink(tmp_path / "etc/default/locale") == "../locale.conf"
    assert (tmp_path / "etc/locale.conf").read_text() == "LANG=fr_FR.UTF-8\n"


def test_locale_not_set_where_it_cannot_be_made(tmp_path: Path) -> None:
    system = locale_card(tmp_path)
    assert set_locale(system, "xx_YY.UTF-8") == \
        "locale xx_YY.UTF-8: NOT set: /usr/share/i18n/SUPPORTED does not list it"
    (tmp_path / "usr/sbin/locale-gen").unlink()
    assert set_locale(system, "de_DE.UTF-8") == \
        "locale de_DE.UTF-8: NOT set: this image has no locale-gen (the locales package)"
    assert (tmp_path / "etc/locale.gen").read_text() == LOCALE_GEN
    assert (tmp_path / "etc/default/locale").read_text().startswith("LANG=en_US.UTF-8\n")


def test_live_locale_is_generated_then_set(tmp_path: Path, commands: Commands) -> None:
    system = locale_card(tmp_path, live=True)
    said: list[str] = []
    assert set_locale(system, "de_DE.UTF-8", said.append) == \
        "locale: de_DE.UTF-8 (from the next login)"
    assert said == ["locale: generating de_DE.UTF-8 (about a minute on a small board)..."]
    (gen, gen_timeout), (probe, _) = commands.ran
    assert gen == ["locale-gen", "--keep-existing"] and gen_timeout == LOCALE_GEN_TIMEOUT
    assert probe[0] == sys.executable and probe[-1] == "de_DE.UTF-8"
    assert (tmp_path / "etc/default/locale").read_text() == "LANG=de_DE.UTF-8\n"


@pytest.mark.parametrize("failure", ["probe", "timeout"])
def test_live_locale_left_alone_when_not_generated(tmp_path: Path, commands: Commands,
                                                   failure: str) -> None:
    if failure == "probe":
        commands.answer = lambda argv: (1, "locale.Error") if argv[0] == sys.executable \
            else (0, "")
        expected = "locale de_DE.UTF-8: NOT set: locale-gen: it made no such locale"
    else:
        commands.answer = lambda argv: subprocess.TimeoutExpired(argv, LOCALE_GEN_TIMEOUT)
        expected = f"locale de_DE.UTF-8: NOT set: locale-gen: gave up after " \
                   f"{LOCALE_GEN_TIMEOUT} s"
    system = locale_card(tmp_path, live=True)
    assert set_locale(system, "de_DE.UTF-8") == expected
    assert (tmp_path / "etc/default/locale").read_text().startswith("LANG=en_US.UTF-8\n"), \
        "LANG never names a locale that is not there"


@pytest.mark.skipif(not (shutil.which("localedef") and
                         Path("/usr/share/i18n/SUPPORTED").is_file() and
                         Path("/usr/share/i18n/locales/de_DE").is_file()),
                    reason="glibc's locale sources are not on this host: apt install locales")
@pytest.mark.parametrize("locale", ["de_DE.UTF-8", "sr_RS@latin", "de_DE"])
def test_locale_line_is_one_localedef_makes(tmp_path: Path, locale: str) -> None:
    """The host's own SUPPORTED list, and its line compiled as locale-gen does it."""
    system = locale_card(tmp_path / "card")
    shutil.copy("/usr/share/i18n/SUPPORTED", tmp_path / "card/usr/share/i18n/SUPPORTED")
    (tmp_path / "card/etc/locale.gen").write_text("")
    set_locale(system, locale)
    (line,) = active(tmp_path / "card")
    name, charset = line.split()
    assert name == locale
    base = re.sub(r"\.[^@]*", "", name)       # locale-gen: de_DE.UTF-8 -> de_DE
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(["localedef", "-i", base, "-c", "-f", charset, str(out / name)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert (out / name / "LC_CTYPE").exists()
