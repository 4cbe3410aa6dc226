"""Where to open Jupyter once setup is done: the board's network addresses, its mDNS name,
the certificate's fingerprint to compare with the browser's, a QR code of the address, and
the result text every console shows (the token only where setup ran)."""

from __future__ import annotations

from builder.firstboot.network import jupyter_url, qr_code, wait_for_addresses
from builder.firstboot.system import Outcome, System


def urls(system: System, hostname: str, token: str | None, tls: bool) -> list[str]:
    query = f"?token={token}" if token else ""
    hosts = wait_for_addresses(system.live)
    if system.path("usr/sbin/avahi-daemon").exists():
        hosts.append(f"{hostname}.local")
    return [jupyter_url(system.settings, host, tls) + query for host in hosts]


def fingerprint_lines(fingerprint: str | None) -> list[str]:
    if fingerprint is None:
        return []
    return ["The browser warns once that it does not know this card's certificate. Go on only",
            "if the certificate it shows has this SHA-256 fingerprint:",
            f"Certificate SHA-256 fingerprint: {fingerprint}"]


def result_text(system: System, outcome: Outcome, found: list[str], with_token: bool,
                qr: bool = False) -> str:
    """What the consoles show when setup is done. `qr`: this console shows UTF-8, so the
    first address (an IP address: phones do not all resolve .local names) also comes as a
    QR code, without the token: a QR code is seen from further away than text."""
    s = system.settings
    query = f"?token={outcome.token}" if outcome.token else ""
    shown = [url if with_token else url.removesuffix(query) for url in found]
    lines = ["", "Setup is complete.", ""]
    if shown:
        lines += ["Open Jupyter in a browser on the same network:"] + [f"    {u}" for u in shown]
    else:
        lines += ["No network address yet: connect the board to the network, then run",
                  "`jupyter-setup --status` to see where Jupyter is."]
    lines += ["", *fingerprint_lines(outcome.fingerprint)]
    drawn = qr_code(found[0].removesuffix(query)) if qr and found else None
    if drawn:
        lines += ["", drawn, ""]
    elif outcome.fingerprint:
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
