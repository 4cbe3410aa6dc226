"""Applying answers to the card: the System (files under a root directory, and the live
system when that root is "/"), each change (passwords, hostname, time zone, SSH keys, Wi-Fi,
Jupyter's credentials) written atomically, the stamp last, and starting Jupyter.

Every path is taken relative to the root, so tests apply answers to a temporary tree; live
actions (hostname, systemctl) happen only on the running card, never in a chroot.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder.files import sync_directory
from builder.firstboot import netconf, network, tls
from builder.firstboot.answers import (
    Answers,
    check_ssh_key,
    hash_jupyter_password,
    hash_login_password,
)
from builder.firstboot.card import (
    CLOCK_EPOCH,
    COOKIE_SECRET,
    CREDENTIALS,
    ISSUE,
    PRESEED,
    QR_ISSUE,
    SETTINGS,
    SSH_KEYS_ONLY,
    STAMP,
    TLS_CERT,
    TLS_GIVEN_CERT,
    TLS_GIVEN_KEY,
    TLS_KEY,
    TLS_OWN,
    URL_ISSUE,
    Settings,
    SetupError,
)

# What the unit of a step is called in progress lines; also the names fault injection uses.
STEP_NAMES = ("login-password", "root-password", "hostname", "timezone", "locale", "ssh-key",
              "network",
              "tls-certificate", "jupyter-credentials", "stamp", "remove-preseed",
              "start-jupyter")
# Tests only: `ORANGEPI_JUPYTER_KILL_AFTER=<step>` makes the wizard SIGKILL itself right
# after that step, the way a power cut would stop it.
KILL_AFTER = "ORANGEPI_JUPYTER_KILL_AFTER"


# The system being set up: files under a root, and the live system when root is "/".


def _booted_here() -> bool:
    """Whether this is a running system of its own, booted by systemd: never a chroot (the
    build, a test), whose hostname and init are the host's, or the build's PID namespace,
    where the first process is a script's and shares our root.

    systemd's own test (sd_booted) is /run/systemd/system; a chroot's /run is the build's
    empty tmpfs or the host's, so init's root must be ours too."""
    if not os.path.isdir("/run/systemd/system"):
        return False
    try:
        init, here = os.stat("/proc/1/root/."), os.stat("/")
    except OSError:
        return False
    return (init.st_dev, init.st_ino) == (here.st_dev, here.st_ino)


@dataclass
class System:
    root: Path
    settings: Settings
    jupyter_python: str
    # Live actions (hostname, systemctl, kernel log level) only on the running card, never
    # in a test's tree or in a chroot, where they would change the host.
    live: bool = False
    notes: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, root: Path, settings_path: Path | None = None,
             jupyter_python: str | None = None) -> System:
        settings = Settings.load(settings_path or root / SETTINGS)
        python = jupyter_python or str(root / settings.venv.lstrip("/") / "bin/python")
        live = root.resolve() == Path("/") and _booted_here()
        return cls(root, settings, python, live)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def done(self) -> bool:
        return self.path(STAMP).exists()

    def account(self, name: str) -> tuple[int, int, str]:
        for line in self.path("etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if len(fields) >= 7 and fields[0] == name:
                return int(fields[2]), int(fields[3]), fields[5]
        raise SetupError(f"there is no user {name} in this image")

    def run(self, *argv: str, stdin: str | None = None) -> None:
        try:
            result = subprocess.run(argv, input=stdin, text=True, capture_output=True,
                                    timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SetupError(f"{argv[0]}: {exc}") from None
        if result.returncode != 0:
            raise SetupError(f"{' '.join(argv[:2])} failed: {result.stderr.strip()}")

    def shadow_root(self) -> list[str]:
        """--root for the shadow tools (chpasswd, chage) when the card is not "/"."""
        root = self.root.resolve()
        return [] if root == Path("/") else ["--root", str(root)]

    def chpasswd(self, user: str, hashed: str) -> None:
        self.run("chpasswd", "--encrypted", *self.shadow_root(), stdin=f"{user}:{hashed}\n")

    def write(self, relative: str, data: str, mode: int = 0o644,
              owner: tuple[int, int] | None = None) -> None:
        write_atomically(self.path(relative), data.encode(), mode, owner)


def write_atomically(path: Path, data: bytes, mode: int,
                     owner: tuple[int, int] | None = None) -> None:
    """Write, fsync, then rename over the old file and fsync the directory: after a power
    cut the file is either the old one or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name, created exclusively: the user can write to some of these directories
    # (~/.ssh) and must not be able to plant a link or a FIFO there for us to write through.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if owner:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


# Applying answers.


@dataclass
class Outcome:
    token: str | None
    hostname: str
    fingerprint: str | None = None        # of Jupyter's TLS certificate (None: plain HTTP)
    temporary_login_password: str | None = None


def step_done(name: str) -> None:
    if os.environ.get(KILL_AFTER) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def apply(system: System, answers: Answers, say: Callable[[str], None], first_boot: bool,
          remove_preseed: bool = True, temporary_login: bool = False) -> Outcome:
    """Apply everything, the stamp last. On a first boot every answer must be there; later
    (jupyter-setup, a new preseed) what is not answered stays as it is. With
    `temporary_login` the login password must be changed at the first login, and it and the
    token are shown before each console's login prompt until jupyter-setup runs again."""
    s = system.settings
    user = s.user
    uid, gid, home = system.account(user)
    if answers.login_password is not None:
        answers.login_hash = hash_login_password(answers.login_password)
    if answers.jupyter_password is not None:
        say("hashing the Jupyter password (a few seconds)...")
        answers.jupyter_hash = hash_jupyter_password(answers.jupyter_password,
                                                     system.jupyter_python)
    old = read_credentials(system)
    jupyter_hash = answers.jupyter_hash or old.get("hashed_password")
    if first_boot and not (answers.login_hash and jupyter_hash):
        raise SetupError("the login and Jupyter passwords are both needed")
    token = old.get("token") or None
    if answers.token == "none":
        token = None
    elif answers.token == "generate" or (answers.token is None and first_boot):
        token = secrets.token_urlsafe(32)
    elif answers.token:
        token = answers.token

    if answers.login_hash:
        system.chpasswd(user, answers.login_hash)
        if temporary_login:
            system.run("chage", "--lastday", "0", *system.shadow_root(), user)
        say(f"login password of {user}: set")
    step_done("login-password")
    if answers.login_hash and s.root_password == "same":
        system.chpasswd("root", answers.login_hash)
        say("root password: the same as the login password")
    elif first_boot:
        system.chpasswd("root", "!*")
        say("root: locked (use sudo)")
    step_done("root-password")
    hostname = read_hostname(system)
    if answers.hostname:
        hostname = set_hostname(system, answers.hostname)
        say(f"hostname: {hostname}")
    step_done("hostname")
    if answers.timezone:
        set_timezone(system, answers.timezone)
        say(f"time zone: {answers.timezone}")
    step_done("timezone")
    if answers.locale:
        say(netconf.set_locale(system, answers.locale, say))
    step_done("locale")
    keys = list(answers.ssh_keys)
    for url in answers.ssh_key_urls:
        found, said = fetch_ssh_keys(url)
        keys += found
        say(said)
    if keys:
        added = add_ssh_keys(system, keys, (uid, gid), home)
        say(f"SSH keys for {user}: {added} added")
        if s.ssh_passwords == "off_with_key":
            say(ssh_keys_only(system))
    step_done("ssh-key")
    for line in netconf.set_network(system, wifi_ssid=answers.wifi_ssid,
                                    wifi_key=answers.wifi_key,
                                    wifi_country=answers.wifi_country,
                                    address=answers.address, gateway=answers.gateway,
                                    dns=answers.dns):
        say(line)
    step_done("network")
    # After the hostname, which the certificate names; before the stamp, so that a card
    # marked done has one (and jupyter.service checks it again at every start anyway).
    fingerprint = certificate(system, hostname, say, (uid, gid))
    step_done("tls-certificate")
    credentials: dict[str, str] = {"hashed_password": str(jupyter_hash)}
    if token:
        credentials["token"] = token
    # Jupyter's login cookie is signed with the cookie secret and the password hash only: a
    # new token alone would leave every session opened with the old one signed in. A new
    # secret (what Jupyter itself would make: 32 random bytes, base64) ends them all.
    renewed = credentials != old or not system.path(COOKIE_SECRET).exists()
    if renewed:
        system.write(COOKIE_SECRET, base64.encodebytes(secrets.token_bytes(32)).decode(),
                     0o600, (uid, gid))
    system.write(CREDENTIALS, json.dumps(credentials, indent=1), 0o600, (uid, gid))
    say("Jupyter password and token: saved")
    if renewed and not first_boot:
        say("Jupyter: every browser signed in before is signed out (new cookie secret)")
    # Made up on the card with nobody there: readable by root only (agetty shows it before
    # the login prompt on the board's own consoles), gone when jupyter-setup runs again.
    if temporary_login and answers.login_password:
        system.write(ISSUE, f"Jupyter token: {token}\nOne-time login password of {user}: "
                            f"{answers.login_password} (change it at the first login, then "
                            f"run sudo jupyter-setup)\n\n", 0o600)
    elif system.path(ISSUE).exists():
        system.path(ISSUE).unlink()
    step_done("jupyter-credentials")
    system.write(STAMP, time.strftime("%Y-%m-%dT%H:%M:%S%z\n"), 0o644)
    step_done("stamp")
    preseed = system.path(PRESEED)
    if remove_preseed and preseed.exists():
        preseed.unlink()
        sync_directory(preseed.parent)
        say(f"/{PRESEED}: applied and removed (it held secrets)")
    step_done("remove-preseed")
    return Outcome(token, hostname, fingerprint)


# Jupyter's TLS certificate (tls.py has what it is and why its window is what it is).


def certificate(system: System, hostname: str, say: Callable[[str], None],
                owner: tuple[int, int], renew: str | None = None) -> str | None:
    """Make sure Jupyter has a certificate and key that serve: a given one (TLS_GIVEN_*,
    from flash-image) is taken first; the card's own is made when there is none, when it
    does not match its key or name this host, when it nears its end, or when `renew` says
    why. A given one is kept as it is (with a warning when it would have been renewed).
    The console banner is rewritten either way. Returns the fingerprint; None when
    jupyter.tls is off."""
    if not system.settings.tls:
        url_banner(system, hostname, None)
        return None
    try:
        import cryptography  # noqa: F401 - Debian's python3-cryptography, in packages.apt
    except ImportError:
        raise SetupError("python3-cryptography is missing, so Jupyter gets no TLS "
                         "certificate: apt install python3-cryptography (or build with "
                         "jupyter.tls: false)") from None
    now = dt.datetime.now(dt.UTC)
    take_given_certificate(system, say, owner, now)
    broken: str | None = None       # it cannot serve: always made anew
    stale: str | None = None        # the card's own would be renewed
    try:
        cert_pem, key_pem = system.path(TLS_CERT).read_bytes(), system.path(TLS_KEY).read_bytes()
        current = tls.read(cert_pem)
        if tls.matches(cert_pem, key_pem):
            stale = tls.renewal_reason(current, hostname, now)
        else:
            broken = "its key does not match it"
    except FileNotFoundError:
        broken = "there is none yet"
    except (OSError, tls.CertificateError) as exc:
        broken = f"the one there cannot be read ({exc})"
    if broken is None and renew is None and (stale is None or system.path(TLS_OWN).exists()):
        if stale:
            say(f"TLS: your own certificate is kept although {stale}: renew it "
                f"(jupyter-setup --new-certificate makes the card's own instead)")
        url_banner(system, hostname, current.fingerprint)
        return current.fingerprint
    reason = broken or renew or stale
    found = network.wait_for_addresses(system.live)
    cert_pem, key_pem = tls.make(hostname, found, now, clock_floor(system))
    _install_certificate(system, cert_pem, key_pem, owner)
    system.path(TLS_OWN).unlink(missing_ok=True)
    made = tls.pem_fingerprint(cert_pem)
    say(f"TLS certificate: this card's own, made ({reason}); it names {hostname}.local"
        f"{', ' + ', '.join(found) if found else ''}")
    url_banner(system, hostname, made)
    return made


def take_given_certificate(system: System, say: Callable[[str], None],
                           owner: tuple[int, int], now: dt.datetime) -> None:
    """The certificate and key flash-image put beside the preseed: checked again, installed
    as Jupyter's and marked as the user's own, then taken off /boot (the key is a secret).
    One that does not serve is shown and dropped; the card then makes its own."""
    cert_path, key_path = system.path(TLS_GIVEN_CERT), system.path(TLS_GIVEN_KEY)
    if not (cert_path.exists() or key_path.exists()):
        return
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        given = tls.check_pair(cert_pem, key_pem, now)
    except FileNotFoundError as exc:
        say(f"/{TLS_GIVEN_CERT}, /{TLS_GIVEN_KEY}: not used, {Path(str(exc.filename)).name} "
            f"is missing (both are needed); the card makes its own certificate")
    except (OSError, tls.CertificateError) as exc:
        say(f"/{TLS_GIVEN_CERT}: not used ({exc}); the card makes its own certificate")
    else:
        _install_certificate(system, cert_pem, key_pem, owner)
        system.write(TLS_OWN, "The certificate here is the user's own (flash-image "
                              "--tls-cert): the card never replaces it.\n")
        say(f"TLS certificate: your own, from /{TLS_GIVEN_CERT} (it names "
            f"{', '.join(given.dns_names + given.addresses) or 'no host'})")
    for path in (cert_path, key_path):
        path.unlink(missing_ok=True)
    sync_directory(cert_path.parent)


def _install_certificate(system: System, cert_pem: bytes, key_pem: bytes,
                         owner: tuple[int, int]) -> None:
    """Key first, then the certificate: cut off between the two, they do not match, and
    the next check (every start of Jupyter) makes a new pair."""
    system.path(TLS_KEY).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_atomically(system.path(TLS_KEY), key_pem, 0o600, owner)
    write_atomically(system.path(TLS_CERT), cert_pem, 0o644)


def clock_floor(system: System) -> dt.datetime | None:
    """The earliest the real date can be: the image's build, when systemd's clock epoch
    file (which the build touches) says so."""
    try:
        return dt.datetime.fromtimestamp(system.path(CLOCK_EPOCH).stat().st_mtime,
                                         dt.UTC)
    except OSError:
        return None


def url_banner(system: System, hostname: str, fingerprint: str | None) -> None:
    """Where Jupyter is and the certificate's fingerprint, before every console's login
    prompt: not secret, and what a person compares with the browser's warning. agetty
    fills in \\4 with the board's IPv4 address when it shows the prompt. The screen's
    getty also shows the address as a QR code: the .local name, which stays right when the
    address changes."""
    tls_on = fingerprint is not None
    hosts = [f"{hostname}.local"] if system.path("usr/sbin/avahi-daemon").exists() else []
    urls = [network.jupyter_url(system.settings, host, tls_on) for host in [*hosts, "\\4"]]
    lines = [f"Jupyter: {'  or  '.join(urls)}"]
    if fingerprint:
        lines.append(f"Certificate SHA-256 fingerprint: {fingerprint}")
    system.write(URL_ISSUE, "\n".join(lines) + "\n\n", 0o644)
    drawn = network.qr_code(urls[0]) if hosts else None
    if drawn:
        system.write(QR_ISSUE, drawn + "\n\n", 0o644)
    else:
        system.path(QR_ISSUE).unlink(missing_ok=True)


def read_credentials(system: System) -> dict[str, str]:
    try:
        data = json.loads(system.path(CREDENTIALS).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_hostname(system: System) -> str:
    try:
        return system.path("etc/hostname").read_text().strip() or "localhost"
    except OSError:
        return "localhost"


def set_hostname(system: System, name: str) -> str:
    system.write("etc/hostname", name + "\n")
    hosts_path = system.path("etc/hosts")
    lines = hosts_path.read_text().splitlines() if hosts_path.exists() else \
        ["127.0.0.1\tlocalhost"]
    lines = [line for line in lines if not line.startswith("127.0.1.1")]
    lines.append(f"127.0.1.1\t{name}")
    system.write("etc/hosts", "\n".join(lines) + "\n")
    if system.live:
        system.run("hostname", name)
        # mDNS announces the new name only after a restart.
        subprocess.run(["systemctl", "try-restart", "avahi-daemon.service"],
                       capture_output=True, timeout=60, check=False)
    return name


def set_timezone(system: System, zone: str) -> None:
    system.write("etc/timezone", zone + "\n")
    link = system.path("etc/localtime")
    tmp = link.with_name(".localtime.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(f"/usr/share/zoneinfo/{zone}")
    os.replace(tmp, link)
    sync_directory(link.parent)


def add_ssh_keys(system: System, keys: Sequence[str], owner: tuple[int, int],
                 home: str) -> int:
    ssh = system.path(home.lstrip("/")) / ".ssh"
    authorized = ssh / "authorized_keys"
    # The home directory belongs to the user: a link there must not lead root's chown or
    # write elsewhere (~/.ssh -> /etc).
    for path in (ssh, authorized):
        if path.is_symlink():
            raise SetupError(f"{path} is a symbolic link: not following it (remove it, then "
                             f"run sudo jupyter-setup again)")
    ssh.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(ssh, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchown(fd, *owner)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    existing = authorized.read_text().splitlines() if authorized.exists() else []
    new = [key for key in keys if key not in existing]
    write_atomically(authorized, "".join(f"{line}\n" for line in [*existing, *new]).encode(),
                     0o600, owner)
    return len(new)


def fetch_ssh_keys(url: str, wait: float = 60) -> tuple[list[str], str]:
    """The SSH public keys published at `url` (https://github.com/NAME.keys: one per line),
    tried for up to `wait` seconds, since at first boot the network may still be coming up;
    and what to say. Lines that are not keys are skipped; never fails the setup."""
    deadline = time.monotonic() + wait
    problem = ""
    while True:
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "jupyter-setup"})
            with urllib.request.urlopen(request, timeout=15) as response:
                text = response.read(1 << 16).decode("utf-8", errors="replace")
            break
        except urllib.error.HTTPError as exc:
            # The server answered: waiting for the network would not change its answer.
            problem, deadline = f"HTTP {exc.code} {exc.reason}", 0
        except (OSError, ValueError) as exc:
            problem = str(getattr(exc, "reason", exc))
        if time.monotonic() + 5 > deadline:
            return [], (f"SSH keys from {url}: NOT fetched ({problem}); add one later with "
                        f"sudo jupyter-setup (ssh_key)")
        time.sleep(5)
    keys = []
    for line in text.splitlines():
        try:
            keys.append(check_ssh_key(line))
        except ValueError:
            continue
    if not keys:
        return [], f"SSH keys from {url}: none there (it holds no SSH public key line)"
    return keys, f"SSH keys from {url}: {len(keys)} fetched"


def ssh_keys_only(system: System) -> str:
    """With a key to log in with, a password guessed or seen over a shoulder no longer opens
    SSH: password and keyboard-interactive logins off (root never logs in over SSH anyway)."""
    system.write(SSH_KEYS_ONLY, "# orangepi-jupyter: the user has an SSH key, so SSH takes "
                                "keys only (firstboot.ssh_passwords).\n"
                                "PasswordAuthentication no\nKbdInteractiveAuthentication no\n",
                 0o644)
    if system.live:
        # At first boot before the SSH server starts, later while it runs: either way the
        # next login sees it.
        subprocess.run(["systemctl", "try-reload-or-restart", "ssh.service"],
                       capture_output=True, timeout=60, check=False)
    return "SSH: keys only from now on, passwords no longer log in over SSH"


def start_jupyter(system: System, boot: bool) -> str:
    if not system.live:
        return "Jupyter: starts at the next boot (not started here: not a running card)"
    # At boot jupyter.service is ordered after this wizard: queue the start, do not wait
    # for it (that would wait for ourselves).
    argv = (["systemctl", "start", "--no-block", "jupyter.service"] if boot
            else ["systemctl", "restart", "jupyter.service"])
    system.run(*argv)
    return "Jupyter: starting (about a minute on this board)"

