"""The board on the network: its addresses now (for the URLs shown and the names its TLS
certificate carries), waited for a little at first boot, Jupyter's URL on a host, and that
URL as a QR code."""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

from builder.firstboot.card import Settings


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


def wait_for_addresses(live: bool, seconds: float = 30) -> list[str]:
    """At first boot the network may still be coming up (DHCP): wait a little for it (only
    on the running card; a test's tree or a chroot has the host's network)."""
    deadline = time.monotonic() + (seconds if live else 0)
    while True:
        found = addresses()
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(1)


def jupyter_url(settings: Settings, host: str, tls: bool) -> str:
    """Jupyter's address on `host` (a name or an address), as a browser takes it."""
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{settings.port}{settings.base_url}lab"


def qr_code(url: str) -> str | None:
    """The address as a QR code for a phone's camera, drawn with Unicode half blocks (two
    rows of modules per line): qrencode, where the image has it."""
    program = shutil.which("qrencode")
    if program is None:
        return None
    try:
        drawn = subprocess.run([program, "-t", "UTF8", "-m", "2", "-o", "-", url],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return drawn.stdout.rstrip("\n") if drawn.returncode == 0 and drawn.stdout else None
