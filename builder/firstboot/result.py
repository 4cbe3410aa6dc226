"""Where to open Jupyter once setup is done: the board's network addresses, its mDNS name,
and the result text every console shows (the token only where setup ran)."""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import time
from pathlib import Path

from builder.firstboot.system import Outcome, System


def addresses() -> list[str]:
    """Every non-loopback IPv4 and global/unique-local IPv6 address of the running system."""
    found: list[str] = []
    for _, name in socket.if_nameindex():
        if name == "lo":
            continue
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET,
                                                           socket.SOCK_DGRAM) as probe:
            packed = fcntl.ioctl(probe.fileno(), 0x8915,  # SIOCGIFADDR
                                 struct.pack("256s", name.encode()[:15]))
            found.append(socket.inet_ntoa(packed[20:24]))
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            hexed, _, _, scope, _, ifname = line.split()
            # Scope 0 is global (and unique-local); link-local needs a zone id browsers
            # do not accept.
            if scope == "00" and ifname != "lo":
                found.append(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(hexed)))
    return found


def wait_for_addresses(system: System, seconds: float = 30) -> list[str]:
    """At first boot the network may still be coming up (DHCP): wait a little for it."""
    deadline = time.monotonic() + (seconds if system.live else 0)
    while True:
        found = addresses()
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(1)


def urls(system: System, hostname: str, token: str | None) -> list[str]:
    s = system.settings
    query = f"?token={token}" if token else ""
    hosts = [f"[{a}]" if ":" in a else a for a in wait_for_addresses(system)]
    if system.path("usr/sbin/avahi-daemon").exists():
        hosts.append(f"{hostname}.local")
    return [f"http://{host}:{s.port}{s.base_url}lab{query}" for host in hosts]


def result_text(system: System, outcome: Outcome, found: list[str], with_token: bool) -> str:
    s = system.settings
    query = f"?token={outcome.token}" if outcome.token else ""
    shown = [url if with_token else url.removesuffix(query) for url in found]
    lines = ["", "Setup is complete.", ""]
    if shown:
        lines += ["Open Jupyter in a browser on the same network:"] + [f"    {u}" for u in shown]
    else:
        lines += ["No network address yet: connect the board to the network, then run",
                  "`jupyter-setup --status` to see where Jupyter is."]
    lines.append("")
    if outcome.token and with_token:
        lines.append(f"Token: {outcome.token}   (or log in with the Jupyter password)")
    elif outcome.token:
        lines.append("The token is shown on the console where setup ran.")
    if outcome.temporary_login_password and with_token:
        lines.append(f"Log in here as {s.user} with the one-time password "
                     f"{outcome.temporary_login_password} (you must change it), then run "
                     f"`sudo jupyter-setup` to set your own passwords.")
    else:
        lines.append(f"Log in as {s.user}. To change the passwords or make a new token later: "
                     f"sudo jupyter-setup")
    return "\n".join(lines) + "\n"

