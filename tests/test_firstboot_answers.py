"""The preseed format and the checks of each answer (builder/firstboot/answers.py) on their
own, as the host uses them to check a `--preseed` file: no card, no root."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_firstboot import JUPYTER, LOGIN, ssh_public_key

from builder.firstboot.answers import (
    _crypt,
    check_jupyter_hash,
    check_login_hash,
    check_ssh_key,
    hash_login_password,
    parse_preseed,
)
from builder.firstboot.card import Settings


def test_preseed_parser_keeps_what_is_valid(tmp_path: Path) -> None:
    answers, problems = parse_preseed(
        "  # comment\n\nLOGIN_PASSWORD =  ' spaces kept '  \njupyter_password=a#b=c!d...\n"
        "hostname = Board1\nssh_key = " + ssh_public_key() + "\nssh_key = ssh-rsa AAAA\n"
        "jupyter_token = short\nwifi_key = 1234567\nhostname = twice\n",
        Path("/"), Settings())
    assert answers.login_password == " spaces kept "
    assert answers.jupyter_password == "a#b=c!d..."
    assert answers.hostname == "board1"
    assert len(answers.ssh_keys) == 1
    text = "\n".join(problems)
    assert "line 7: 'ssh_key': 'ssh-rsa AAAA' is not an SSH public key line" in text
    assert "line 8: 'jupyter_token': must be 'generate', 'none', or 16-256" in text
    assert "line 9: 'wifi_key': must be 8-63 printable" in text
    assert "1234567" not in text, "a secret value is never repeated back"
    assert "line 10: 'hostname': given twice" in text
    assert "wifi_key is given without wifi_ssid" in text


def test_login_hashes_are_checked_by_libcrypt() -> None:
    hashed = hash_login_password(LOGIN)
    assert check_login_hash(hashed) == hashed
    assert _crypt(LOGIN.encode(), hashed.encode()).decode() == hashed
    for bad in ("$y$nothing", "plain-password", "$6$", "*"):
        with pytest.raises(ValueError, match="is not a whole crypt"):
            check_login_hash(bad)


def test_ssh_key_with_the_wrong_type_in_front_is_refused() -> None:
    key = ssh_public_key()
    assert check_ssh_key(key) == key
    with pytest.raises(ValueError):
        check_ssh_key(key.replace("ssh-ed25519", "ssh-rsa", 1))
    with pytest.raises(ValueError):
        check_ssh_key(key[:40])


def test_preseed_encodings_and_comments() -> None:
    bom = "\ufeffhostname = lab\n".encode()
    answers, problems = parse_preseed(bom, Path("/"), Settings())
    assert answers.hostname == "lab" and problems == []
    latin1 = "login_password = gr\xfc\xdfe-aus-k\xf6ln\nhostname = ok\n".encode("latin-1")
    answers, problems = parse_preseed(latin1, Path("/"), Settings())
    assert problems == ["line 1: not UTF-8 text (save the file as UTF-8)"]
    assert answers.login_password is None and answers.hostname == "ok"
    answers, problems = parse_preseed(
        "login_password = a long login password   # my comment\n"
        "jupyter_password = 'a password #with a hash'\n= only-a-secret\n", Path("/"),
        Settings())
    assert answers.login_password is None, "a comment is never taken into a password"
    assert answers.jupyter_password == "a password #with a hash"
    assert "line 1: 'login_password': a comment after a value is not allowed" in problems[0]
    assert problems[1] == "line 3: not 'key = value'" and "only-a-secret" not in problems[1]
    _, problems = parse_preseed("timezone = leapseconds\ntimezone2 = x\n", Path("/"),
                                Settings())
    assert "is not a known time zone" in problems[0]


def test_truncated_hashes_are_refused() -> None:
    from jupyter_server.auth import passwd
    whole = hash_login_password(LOGIN)
    for cut in (whole[:whole.rindex("$") + 1], whole[:-5], "$6$x$y", "$y$j9T$"):
        with pytest.raises(ValueError, match="is not a whole crypt"):
            check_login_hash(cut)
    jupyter = passwd(JUPYTER)
    assert check_jupyter_hash(jupyter) == jupyter
    with pytest.raises(ValueError):
        check_jupyter_hash(jupyter[:jupyter.rindex("$") + 4])


def test_a_value_with_a_break_the_drive_reader_splits_at_is_refused() -> None:
    """The setup drive's file is read with str.splitlines (a lone CR ends a line there), so
    every other break splitlines knows is refused inside a value, not read as two lines."""
    splits = {chr(c) for c in range(0x110000)
              if chr(c) not in "\n\r" and len(f"a{chr(c)}b".splitlines()) > 1}
    assert splits == {"\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"}
    for char in sorted(splits):
        for line in (f"wifi_ssid = Lab{char}Net", f"login_password = a long{char}password"):
            answers, problems = parse_preseed(f"{line}\nhostname = lab\n", Path("/"),
                                              Settings())
            assert problems == [f"line 1: '{line.split(' =')[0]}': holds a line break or page "
                                f"break inside the value (e.g. U+2028, form feed): remove it"]
            assert "password" not in problems[0].split(":", 2)[2]   # the value is not shown
            assert answers.hostname == "lab" and answers.wifi_ssid is None
