"""Armbian's first-login presets (/root/.not_logged_in_yet, as Armbian Imager writes them):
read as bash would assign them, never run; mapped to the wizard's answers, with what does
not apply said; and taken at first boot with the setup drive, in the order the README gives
(the image's preseed, the presets, the drive's file), the file removed."""

from __future__ import annotations

import functools
import http.server
import subprocess
import threading
import time
from pathlib import Path

import pytest
from firstboot_card import JUPYTER, LOGIN, Card, finished
from test_setup_drive import filled, make_disk, partitions, put, take

from builder.firstboot.answers import parse_preseed
from builder.firstboot.armbian_preset import PRESET_FILE, parse
from builder.firstboot.armbian_preset import take as take_presets
from builder.firstboot.card import PRESEED, Settings


def imager_quote(value: str) -> str:
    """Armbian Imager v2's shell_quote: double quotes, with \\ " $ ` escaped."""
    escaped = "".join("\\" + ch if ch in '\\"$`' else ch for ch in value)
    return f'"{escaped}"'


# Values as Armbian Imager, Armbian's docs and its preset-firstrun extension write them.
LINES = {
    "PRESET_USER_PASSWORD": imager_quote('a"b$c`d\\e f#g'),
    "PRESET_NET_WIFI_SSID": "'Lab \"WLAN\" $5'",
    "PRESET_NET_WIFI_KEY": "$'tab\\there\\'s'",
    "PRESET_LOCALE": "en_US.UTF-8",
    "PRESET_TIMEZONE": "Etc/UTC   # a comment after the value",
    "PRESET_NET_STATIC_DNS": '"8.8.8.8, 1.1.1.1"',
    "PRESET_USER_SHELL": "ba\\sh",
    "PRESET_NET_STATIC_MASK": "255.255.255.0",
    "SPLICED": "\"a\"'b'c",
}


def bash_values(path: Path, names: list[str]) -> dict[str, str]:
    """What bash itself assigns when it sources the file (as Armbian's first login does)."""
    script = 'source "$1"; shift; for v in "$@"; do printf "%s\\0%s\\0" "$v" "${!v}"; done'
    out = subprocess.run(["bash", "-c", script, "-", str(path), *names], capture_output=True,
                         check=True, env={"PATH": "/usr/bin:/bin"}).stdout.decode()
    fields = out.split("\0")[:-1]
    return dict(zip(fields[::2], fields[1::2], strict=True))


def test_values_are_read_as_bash_assigns_them(tmp_path: Path) -> None:
    path = tmp_path / "not_logged_in_yet"
    path.write_text("# Armbian Imager\n\n" + "".join(f"{k}={v}\n" for k, v in LINES.items())
                    + "export EXPORTED=yes\n")
    values, problems = parse(path.read_text())
    assert problems == []
    assert values == bash_values(path, [*LINES, "EXPORTED"])
    assert values["PRESET_USER_PASSWORD"] == 'a"b$c`d\\e f#g'
    # Windows line ends and a BOM, which Armbian strips too, change nothing.
    crlf, _ = parse("\ufeff" + path.read_text().replace("\n", "\r\n"))
    assert crlf == values


@pytest.mark.parametrize("line", [
    "PRESET_USER_PASSWORD=$(touch {sentinel})",
    'PRESET_USER_PASSWORD="`touch {sentinel}`"',
    'PRESET_USER_PASSWORD="$HOME"',
    "PRESET_USER_PASSWORD=x touch {sentinel}",
    "PRESET_USER_PASSWORD=x; touch {sentinel}",
    "touch {sentinel}",
    "PRESET_USER_PASSWORD='unclosed",
])
def test_a_line_that_would_run_something_is_said_and_skipped(tmp_path: Path, line: str) -> None:
    sentinel = tmp_path / "ran"
    values, problems = parse(f"PRESET_TIMEZONE=Europe/Berlin\n{line.format(sentinel=sentinel)}\n")
    assert values == {"PRESET_TIMEZONE": "Europe/Berlin"}
    assert len(problems) == 1 and problems[0].startswith("line 2: ")
    assert "not read (the card never runs this file)" in problems[0]
    assert not sentinel.exists()


def imager_file(**changes: str) -> str:
    """A whole profile as Armbian Imager v2 renders it (its keys, in its order)."""
    keys = {"PRESET_NET_CHANGE_DEFAULTS": "1", "PRESET_NET_ETHERNET_ENABLED": "0",
            "PRESET_NET_WIFI_ENABLED": "1", "PRESET_NET_WIFI_SSID": "Lab WLAN",
            "PRESET_NET_WIFI_KEY": "correct horse", "PRESET_NET_WIFI_COUNTRYCODE": "de",
            "PRESET_NET_USE_STATIC": "1", "PRESET_NET_STATIC_IP": "192.168.1.50",
            "PRESET_NET_STATIC_MASK": "255.255.255.0", "PRESET_NET_STATIC_GATEWAY":
            "192.168.1.1", "PRESET_NET_STATIC_DNS": "8.8.8.8, 1.1.1.1",
            "PRESET_LOCALE": "C.UTF-8", "PRESET_TIMEZONE": "Etc/UTC",
            "SET_LANG_BASED_ON_LOCATION": "n", "PRESET_ROOT_PASSWORD": "root-pass-1",
            "PRESET_USER_NAME": "jupyter", "PRESET_USER_PASSWORD": LOGIN,
            "PRESET_USER_SHELL": "bash", "PRESET_DEFAULT_REALNAME": "Lab"}
    keys.update(changes)
    return "".join(f"{k}={imager_quote(v)}\n" for k, v in keys.items() if v)


def test_an_imager_profile_becomes_the_wizards_answers() -> None:
    values, problems = parse(imager_file())
    taken = take_presets(values, "jupyter", root_same=False)
    answers, invalid = parse_preseed(taken.preseed(jupyter_given=False), Path("/"), Settings())
    assert problems == [] and invalid == []
    assert answers.login_password == LOGIN == answers.jupyter_password
    assert (answers.wifi_ssid, answers.wifi_key, answers.wifi_country) == \
        ("Lab WLAN", "correct horse", "DE")
    assert (answers.address, answers.gateway, answers.dns) == \
        ("192.168.1.50/24", "192.168.1.1", ["8.8.8.8", "1.1.1.1"])
    assert (answers.timezone, answers.locale) == ("Etc/UTC", "C.UTF-8")
    assert taken.said == ["PRESET_ROOT_PASSWORD ignored: root stays locked; jupyter uses sudo "
                          "with the login password",
                          "PRESET_DEFAULT_REALNAME ignored: jupyter keeps its name"]
    # With a Jupyter password from elsewhere, the user password is the login's only.
    answers, _ = parse_preseed(taken.preseed(jupyter_given=True), Path("/"), Settings())
    assert answers.login_password == LOGIN and answers.jupyter_password is None


def test_what_makes_no_sense_here_is_said_and_the_rest_applied() -> None:
    values, _ = parse(imager_file(
        PRESET_USER_NAME="bob", PRESET_ROOT_KEY="https://example.org/root.keys",
        PRESET_CONFIGURATION="https://example.org/preset.txt", PRESET_USER_SHELL="zsh",
        SET_LANG_BASED_ON_LOCATION="y", PRESET_NET_CHANGE_DEFAULTS="0",
        PRESET_USER_KEY="https://github.com/bob.keys", PRESET_FAVOURITE_COLOUR="blue"))
    taken = take_presets(values, "jupyter", root_same=True)
    said = "\n".join(taken.said)
    for expected in ("PRESET_USER_NAME=bob ignored: this card's user is jupyter",
                     "PRESET_ROOT_PASSWORD ignored: root gets the login password",
                     "PRESET_ROOT_KEY ignored", "PRESET_CONFIGURATION ignored",
                     "PRESET_USER_SHELL=zsh ignored", "SET_LANG_BASED_ON_LOCATION ignored",
                     "PRESET_NET_* ignored: PRESET_NET_CHANGE_DEFAULTS is not 1",
                     "PRESET_FAVOURITE_COLOUR ignored: not an Armbian preset"):
        assert expected in said, (expected, said)
    answers, invalid = parse_preseed(taken.preseed(False), Path("/"), Settings())
    assert invalid == [] and answers.login_password == LOGIN
    assert answers.ssh_key_urls == ["https://github.com/bob.keys"]
    assert answers.wifi_ssid is None and answers.address is None


@pytest.mark.root
def test_presets_and_the_drive_answer_the_wizard_in_order(card: Card, tmp_path: Path) -> None:
    """The image's preseed (a hostname, a time zone), Armbian's presets over it (the login
    password, a time zone), the drive's file over both (the Jupyter password): each key from
    the last that gives it; both sources gone, and the wizard needs nobody."""
    card.preseed("hostname = from-image\ntimezone = Asia/Tokyo\n")
    preset = card.root / PRESET_FILE
    preset.parent.mkdir(exist_ok=True)
    preset.write_text(imager_file(PRESET_NET_CHANGE_DEFAULTS="", PRESET_TIMEZONE="Etc/UTC",
                                  PRESET_USER_PASSWORD="imager-login-1",
                                  PRESET_ROOT_PASSWORD="", PRESET_DEFAULT_REALNAME=""))
    disk = make_disk(tmp_path / "card.img")
    text = filled(jupyter="drive-jupyter-1").replace("login_password = ", "#login_password = ")
    put(disk, "jupyter-firstboot.conf", text.replace("timezone = Europe/Berlin\r\n", "")
        .encode(), tmp_path)
    output = take(card, disk)
    assert "Armbian presets (/root/.not_logged_in_yet): login_password, timezone, locale " \
           "taken into /boot/jupyter-firstboot.conf" in output, output
    assert "/root/.not_logged_in_yet: taken and removed" in output
    assert "user password is Jupyter's password too" not in output
    assert not preset.exists() and partitions(disk) == [1]
    output = finished(card.boot())
    assert "Setup is complete" in output
    assert card.login_accepts("imager-login-1")
    from test_firstboot import verifies
    assert verifies(card.credentials()["hashed_password"], "drive-jupyter-1")
    assert (card.root / "etc/hostname").read_text() == "from-image\n"
    assert (card.root / "etc/timezone").read_text() == "Etc/UTC\n"
    assert not (card.root / PRESEED).exists()


@pytest.mark.root
def test_presets_alone_give_jupyter_the_login_password(card: Card, tmp_path: Path) -> None:
    """No setup drive (deleted, or an image without one): the presets are still taken, and
    the one password Armbian Imager asks for opens Jupyter too, as the consoles say."""
    preset = card.root / PRESET_FILE
    preset.parent.mkdir(exist_ok=True)
    preset.write_text(imager_file(PRESET_NET_CHANGE_DEFAULTS="", PRESET_USER_NAME="bob"))
    disk = tmp_path / "plain.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["sfdisk", "--quiet", str(disk)], input=b"start=2048\n", check=True)
    output = take(card, disk)
    assert "setup drive found" not in output
    assert "the user password is Jupyter's password too" in output
    assert "PRESET_USER_NAME=bob ignored" in output
    assert not preset.exists()
    output = finished(card.boot())
    assert "PRESET_USER_NAME=bob ignored" in output, "the banner repeats what was ignored"
    assert card.login_accepts(LOGIN)
    from test_firstboot import verifies
    assert verifies(card.credentials()["hashed_password"], LOGIN)
    assert LOGIN != JUPYTER


def test_keys_at_a_url_are_fetched_and_checked(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """PRESET_USER_KEY is where the keys are published (GitHub's NAME.keys): fetched from a
    real HTTP server on loopback, the lines that are keys kept; an HTTP error is said at once,
    and setup goes on."""
    from test_firstboot import ssh_public_key

    from builder.firstboot.system import fetch_ssh_keys
    # A proxy the host's environment names is not for loopback (the card honours one).
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    keys = [ssh_public_key(), ssh_public_key()]
    (tmp_path / "me.keys").write_text(f"{keys[0]}\n<html>not a key</html>\n{keys[1]}\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        server.timeout = 5
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                  daemon=True)
        thread.start()
        try:
            base = f"http://127.0.0.1:{server.server_address[1]}"
            found, said = fetch_ssh_keys(f"{base}/me.keys", wait=30)
            assert found == [" ".join(k.split()) for k in keys]
            assert said.endswith(": 2 fetched")
            start = time.monotonic()
            none, said = fetch_ssh_keys(f"{base}/missing.keys")
            assert none == [] and "NOT fetched (HTTP 404" in said
            assert "sudo jupyter-setup" in said
            assert time.monotonic() - start < 10, "an answer from the server is not waited out"
        finally:
            server.shutdown()
            thread.join(timeout=10)
