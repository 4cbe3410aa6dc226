"""Jupyter's TLS certificate on the card (builder/firstboot/tls.py and its step in
system.py), as tests/test_firstboot.py drives the wizard: the card's zipapp on a
pseudo-terminal against a temporary card. Made at first boot and shown by its fingerprint;
kept, renewed or made anew before every start of Jupyter (--ensure-certificate); a user's own
from /boot taken and never replaced; a hostname change gives a new one; a clock that is behind
does not make one that expires early. Jupyter serving it: tests/test_appliance.py; try-image
checking it on a booted card: tests/test_smoke.py."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import stat
import subprocess

import pytest
from firstboot_card import JUPYTER, LOGIN, UID, Card, finished

from builder.firstboot import tls
from builder.firstboot.card import (
    CLOCK_EPOCH,
    QR_ISSUE,
    TLS_CERT,
    TLS_GIVEN_CERT,
    TLS_GIVEN_KEY,
    TLS_KEY,
    TLS_OWN,
    URL_ISSUE,
)
from builder.firstboot.network import addresses

PRESEED = f"login_password = '{LOGIN}'\njupyter_password = '{JUPYTER}'\n"
NOW = dt.datetime.now(dt.UTC)
SHOWN = re.compile(r"Certificate SHA-256 fingerprint: (" + tls.FINGERPRINT.pattern + ")")


def served(card: Card) -> tls.Certificate:
    """The certificate Jupyter would serve, after checking its key is its own and the modes
    Jupyter needs: the key the Jupyter user's alone, the certificate readable."""
    cert, key = card.root / TLS_CERT, card.root / TLS_KEY
    assert tls.matches(cert.read_bytes(), key.read_bytes())
    info = key.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == UID
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    return tls.read(cert.read_bytes())


def shown(output: str) -> list[str]:
    return SHOWN.findall(output)


def ensure(card: Card, *args: str) -> str:
    return finished(card.wizard("--ensure-certificate", *args))


@pytest.mark.root
def test_first_boot_makes_the_cards_own_certificate_and_shows_it(card: Card) -> None:
    (card.root / "usr/sbin").mkdir(parents=True)
    (card.root / "usr/sbin/avahi-daemon").write_text("")
    card.preseed(PRESEED + "hostname = lab-7\n")
    output = finished(card.boot())
    cert = served(card)
    assert cert.dns_names == ("lab-7.local", "lab-7")
    assert shown(output) == [cert.fingerprint], output
    assert "https://lab-7.local:8888/lab" in output and "http://" not in output
    assert "Go on only" in output, "the console says what the fingerprint is for"
    # A day of slack for a browser's clock behind the card's; no longer than 825 days in
    # all, or Safari refuses it even when trusted.
    assert NOW - dt.timedelta(days=1, minutes=5) <= cert.not_before <= NOW - dt.timedelta(hours=23)
    assert cert.not_after - cert.not_before <= dt.timedelta(days=825)
    assert not (card.root / TLS_OWN).exists()
    # Before every console's login prompt: where to go and what to compare, nothing secret.
    banner = (card.root / URL_ISSUE).read_text()
    assert banner.splitlines() == [
        "Jupyter: https://lab-7.local:8888/lab  or  https://\\4:8888/lab",
        f"Certificate SHA-256 fingerprint: {cert.fingerprint}", ""]
    assert stat.S_IMODE((card.root / URL_ISSUE).stat().st_mode) == 0o644
    # The screen's login prompt also gets the .local address as a QR code.
    drawn = subprocess.run(["qrencode", "-t", "UTF8", "-m", "2", "-o", "-",
                            "https://lab-7.local:8888/lab"], capture_output=True, text=True)
    assert (card.root / QR_ISSUE).read_text() == drawn.stdout.rstrip("\n") + "\n\n"
    status = finished(card.wizard("--status"))
    assert shown(status) == [cert.fingerprint] and "https://lab-7.local:8888/lab" in status


@pytest.mark.root
def test_every_start_keeps_a_good_certificate_and_remakes_a_broken_one(card: Card) -> None:
    card.preseed(PRESEED)
    finished(card.boot())
    first = served(card)
    assert shown(ensure(card)) == [first.fingerprint], "a good one is kept as it is"
    # Killed between the key and the certificate: they no longer match.
    _, other_key = tls.make("orangepipcplus", [], NOW)
    (card.root / TLS_KEY).write_bytes(other_key)
    output = ensure(card)
    assert "its key does not match it" in output
    second = served(card)
    assert second.fingerprint != first.fingerprint and shown(output) == [second.fingerprint]
    assert (card.root / URL_ISSUE).read_text().count(second.fingerprint) == 1
    (card.root / TLS_CERT).unlink()
    assert "there is none yet" in ensure(card)
    third = served(card)
    (card.root / TLS_CERT).write_text("-----BEGIN CERTIFICATE-----\nbroken\n"
                                      "-----END CERTIFICATE-----\n")
    assert "cannot be read" in ensure(card)
    assert served(card).fingerprint not in (third.fingerprint, second.fingerprint)


@pytest.mark.root
def test_an_ending_certificate_is_renewed_but_one_early_by_the_cards_clock_is_kept(
        card: Card) -> None:
    card.preseed(PRESEED)
    finished(card.boot())
    # Made by a card whose clock was 810 days behind: 14 days left, under the 30 of renewal.
    old_cert, old_key = tls.make("orangepipcplus", [], NOW - dt.timedelta(days=810))
    (card.root / TLS_KEY).write_bytes(old_key)
    (card.root / TLS_CERT).write_bytes(old_cert)
    output = ensure(card)
    assert f"it ends on {tls.read(old_cert).not_after:%Y-%m-%d}" in output
    renewed = served(card)
    assert renewed.not_after > NOW + dt.timedelta(days=800)
    # Made when the clock was right, read now by a card whose clock is behind (no RTC, no
    # network yet): not valid yet by that clock, but it is the clock that is wrong. A new one
    # at every boot without network would change the fingerprint every time.
    ahead_cert, ahead_key = tls.make("orangepipcplus", [], NOW + dt.timedelta(days=90))
    (card.root / TLS_KEY).write_bytes(ahead_key)
    (card.root / TLS_CERT).write_bytes(ahead_cert)
    assert shown(ensure(card)) == [tls.pem_fingerprint(ahead_cert)]


@pytest.mark.root
def test_a_clock_behind_the_build_dates_the_certificate_from_the_build(card: Card) -> None:
    """A board without RTC and without network at first boot: its clock may be behind the
    real date. Dated from its clock, the certificate would end early in the real world;
    dated from the image's build (systemd's clock epoch, which the build touches), it
    starts a day before that and lasts its full length."""
    built = NOW + dt.timedelta(days=400)        # the card's clock is 400 days behind
    epoch = card.root / CLOCK_EPOCH
    epoch.parent.mkdir(parents=True)
    epoch.touch()
    os.utime(epoch, (built.timestamp(), built.timestamp()))
    card.preseed(PRESEED)
    finished(card.boot())
    cert = served(card)
    assert abs(cert.not_before - (built - dt.timedelta(days=1))) < dt.timedelta(seconds=5)
    assert cert.not_after - cert.not_before == dt.timedelta(days=tls.VALIDITY_DAYS)


@pytest.mark.root
def test_a_new_hostname_gives_a_new_certificate_naming_it(card: Card) -> None:
    card.preseed(PRESEED)
    finished(card.boot())
    first = served(card)
    new = card.root.parent / "new.conf"
    new.write_text("timezone = Europe/Paris\n")
    assert shown(finished(card.wizard("--preseed", str(new)))) == [first.fingerprint], \
        "answers that do not touch the name keep the certificate"
    new.write_text("hostname = greenhouse\n")
    output = finished(card.wizard("--preseed", str(new)))
    second = served(card)
    assert second.dns_names == ("greenhouse.local", "greenhouse")
    assert "it does not name greenhouse.local" in output
    assert shown(output) == [second.fingerprint] != [first.fingerprint]
    assert second.fingerprint in (card.root / URL_ISSUE).read_text()
    output = finished(card.wizard("--new-certificate"))
    assert "made (asked for)" in output and served(card).fingerprint != second.fingerprint


@pytest.mark.root
def test_a_users_own_certificate_is_taken_from_boot_and_never_replaced(card: Card) -> None:
    cert_pem, key_pem = tls.make("jupyter.example.org", ["192.0.2.7"], NOW)
    (card.root / TLS_GIVEN_CERT).write_bytes(cert_pem)
    (card.root / TLS_GIVEN_KEY).write_bytes(key_pem)
    card.preseed(PRESEED)
    output = finished(card.boot())
    assert "TLS certificate: your own" in output
    assert (card.root / TLS_CERT).read_bytes() == cert_pem and served(card)
    assert (card.root / TLS_OWN).exists()
    assert not (card.root / TLS_GIVEN_KEY).exists(), "the key does not stay on /boot"
    assert not (card.root / TLS_GIVEN_CERT).exists()
    assert shown(output) == [tls.pem_fingerprint(cert_pem)]
    # It names neither this host nor the next one: kept, and said.
    new = card.root.parent / "new.conf"
    new.write_text("hostname = greenhouse\n")
    output = finished(card.wizard("--preseed", str(new)))
    assert "your own certificate is kept although it does not name greenhouse.local" in output
    assert (card.root / TLS_CERT).read_bytes() == cert_pem
    assert shown(ensure(card)) == [tls.pem_fingerprint(cert_pem)]


@pytest.mark.root
@pytest.mark.parametrize("fault", ["mismatch", "only-key", "expired"])
def test_a_given_certificate_that_cannot_serve_is_said_and_dropped(card: Card,
                                                                     fault: str) -> None:
    cert_pem, key_pem = tls.make("lab", [], NOW - dt.timedelta(days=1000 if fault == "expired"
                                                                 else 0))
    if fault == "mismatch":
        key_pem = tls.make("lab", [], NOW)[1]
    if fault != "only-key":
        (card.root / TLS_GIVEN_CERT).write_bytes(cert_pem)
    (card.root / TLS_GIVEN_KEY).write_bytes(key_pem)
    card.preseed(PRESEED)
    output = finished(card.boot())
    reason = {"mismatch": "the key is not the certificate's", "only-key":
              "jupyter-tls.crt is missing", "expired": "the certificate expired on"}[fault]
    assert reason in output and "the card makes its own certificate" in output, output
    assert not (card.root / TLS_GIVEN_KEY).exists() and not (card.root / TLS_OWN).exists()
    assert served(card).dns_names == ("orangepipcplus.local", "orangepipcplus")


@pytest.mark.root
def test_plain_http_when_tls_is_off(card: Card) -> None:
    card.settings(tls=False)
    card.preseed(PRESEED)
    output = finished(card.boot())
    assert not (card.root / TLS_CERT).exists() and "fingerprint" not in output
    assert (card.root / URL_ISSUE).read_text() == "Jupyter: http://\\4:8888/lab\n\n"
    assert not (card.root / QR_ISSUE).exists(), "no name that stays right to draw"
    assert ensure(card) == ""


@pytest.mark.root
@pytest.mark.parametrize("column, drawn", [(2, True), (3, False), (None, False)])
def test_a_qr_code_only_where_the_terminal_draws_utf8(card: Card, column: int | None,
                                                      drawn: bool) -> None:
    """The terminal is asked where its cursor is after a two-byte character: one column on
    is UTF-8 (half blocks drawn), two is a Latin-1 terminal, no answer is a line where
    nobody can tell (try-image's own console); only the first gets the QR code."""
    if drawn and shutil.which("qrencode") is None:
        pytest.fail("qrencode is missing: ci/setup-host installs it (apt-get install qrencode)")
    if drawn and not addresses():
        pytest.skip("this machine has no network address, so there is no URL to draw")
    card.preseed(PRESEED)
    finished(card.boot())
    child = card.wizard("--status")
    child.expect_exact("\x1b[6n")
    before = str(child.before)
    if column is not None:
        os.write(child.child_fd, f"\x1b[12;{column}R".encode())
    output = finished(child)
    assert ("\u2580" in output or "\u2584" in output) is drawn, output
    assert shown(before), "the fingerprint is there either way"
    if not drawn:
        assert "\x1b[12;" not in output, "an answer is not echoed"
