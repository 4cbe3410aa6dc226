"""What every part of first boot shares: where it keeps things on the card, the settings the
builder writes for it, and the error that the person at the console (or the preseed's author)
has to fix. Standard library only, like the whole package (it runs on the card)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Inside the image, relative to the root.
SETTINGS = "etc/orangepi-jupyter/firstboot.json"
PRESEED = "boot/jupyter-firstboot.conf"
STAMP = "var/lib/orangepi-jupyter/firstboot-done"
CREDENTIALS = "var/lib/jupyter/credentials.json"
# What Jupyter signs its login cookies with (ServerApp.cookie_secret_file): a new one signs
# everyone out, so it is made anew with every new password or token.
COOKIE_SECRET = "var/lib/jupyter/cookie_secret"
RUN_DIR = "run/jupyter-firstboot"
# Jupyter's TLS certificate and key (tls.py): the card's own, made at first boot; or one the
# user brought (flash-image --tls-cert/--tls-key puts it beside the preseed as
# TLS_GIVEN_CERT/KEY, and first boot moves it here), marked by TLS_OWN so it is never
# replaced by one the card makes.
TLS_CERT = "var/lib/jupyter/tls/jupyter.crt"
TLS_KEY = "var/lib/jupyter/tls/jupyter.key"
TLS_OWN = "var/lib/jupyter/tls/given-by-user"
TLS_GIVEN_CERT = "boot/jupyter-tls.crt"
TLS_GIVEN_KEY = "boot/jupyter-tls.key"
# The setup drive (builder/setup_partition.py makes it, setup_drive.py reads and removes it):
# the FAT volume label people see as the drive's name, and on GPT the partition's name.
SETUP_LABEL = "JUPYTER-CFG"
SETUP_NAME = "jupyter-setup"
# systemd sets a clock that is behind this file's time forward to it at boot (boards without
# a real-time clock); the build touches it, so it is also the earliest the date can be.
CLOCK_EPOCH = "usr/lib/clock-epoch"
# Where to open Jupyter and the certificate's fingerprint, before every console's login
# prompt (not secret).
URL_ISSUE = "etc/issue.d/jupyter-url.issue"
# The same address as a QR code, shown only where the getty is told to (the screen's tty1,
# which draws UTF-8: customize.d/58-enable-firstboot), so outside /etc/issue.d.
QR_ISSUE = "etc/orangepi-jupyter/jupyter-qr.issue"
# Unattended setup's token and one-time login password, shown before the consoles'
# login prompts (agetty reads /etc/issue.d) until jupyter-setup runs again.
ISSUE = "etc/issue.d/jupyter-setup.issue"
# Once the user has an SSH key, passwords no longer open SSH (firstboot.ssh_passwords). sshd
# takes the first value it reads and reads sshd_config.d/ first, in order: 05 comes early.
SSH_KEYS_ONLY = "etc/ssh/sshd_config.d/05-orangepi-jupyter-keys-only.conf"


class SetupError(Exception):
    """Something the person at the console (or the preseed's author) has to fix."""


# Settings, written into the image by the builder from its configuration.


@dataclass(frozen=True)
class Settings:
    user: str = "jupyter"
    venv: str = "/opt/jupyter"
    port: int = 8888
    base_url: str = "/"
    board: str = "Orange Pi"
    # The board's serial consoles: device, baud, gadget (a USB gadget port: anyone with a
    # cable reaches it, so nothing secret is shown there).
    consoles: tuple[dict[str, Any], ...] = ()
    wizard_consoles: tuple[str, ...] = ()  # where the wizard runs (firstboot.consoles)
    root_password: str = "locked"         # locked | same (as the login user's)
    min_password_length: int = 8
    answer_timeout: float = 300.0         # seconds a question waits before the session ends
    unattended: str = "wait"              # wait | token
    unattended_after: float = 900.0       # seconds with nobody at a console (token mode)
    ssh_passwords: str = "off_with_key"   # off_with_key | keep: SSH password logins
    tls: bool = True                      # Jupyter serves HTTPS with the card's certificate

    @classmethod
    def load(cls, path: Path) -> Settings:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def baud(self, device: str) -> int | None:
        return next((int(c["baud"]) for c in self.consoles if c.get("device") == device), None)

    def gadget(self, device: str) -> bool:
        """Whether a console is one a stranger reaches: a USB gadget port (by the catalog,
        and by name for a card whose settings predate the mark)."""
        return device.startswith("ttyGS") or any(
            c.get("gadget") for c in self.consoles if c.get("device") == device)
