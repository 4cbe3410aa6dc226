"""The board catalog against Armbian's real index snapshot and the facts boards depend on."""

from __future__ import annotations

import json

import pytest
from conftest import SNAPSHOT, error_line, run_cli

from builder.boards import load_catalog
from builder.errors import BuildError

SUPPORT = {"conf": "standard", "csc": "community", "wip": "wip", "eos": "eos", "tvb": "tvbox"}


@pytest.fixture(scope="module")
def snapshot_boards() -> dict[str, str]:
    if not SNAPSHOT.exists():
        pytest.skip(f"Armbian index snapshot not found at {SNAPSHOT} (shared/ beside the repo)")
    assets = json.loads(SNAPSHOT.read_text())["assets"]
    return {a["board_slug"]: a["board_support"] for a in assets
            if a.get("board_vendor") == "xunlong"}


def test_catalog_has_every_orange_pi_board_in_the_index(snapshot_boards: dict[str, str]) -> None:
    catalog = load_catalog()
    assert set(catalog.ids()) == set(snapshot_boards)
    for board in catalog.boards:
        assert board.support == SUPPORT[snapshot_boards[board.id]], board.id


def test_catalog_facts_hang_together() -> None:
    for board in load_catalog().boards:
        assert board.consoles and board.console.baud in (115200, 1500000), board.id
        if board.family.startswith(("rockchip", "rk3")):
            assert board.console.device == "ttyS2" and board.console.baud == 1500000
            assert board.root_offset_mib == 16 and board.uboot_offset_kib == 32
        if board.family.startswith("sun") and board.arch != "riscv64":
            assert board.console.device == "ttyS0" and board.uboot_offset_kib == 8
        if board.family == "rockchip-rk3588":
            assert board.partition_table == "gpt"
        if board.soc.endswith(("H3", "H2+")):
            assert board.arch == "armhf"
        # The bootloader lives before the first partition: a customisation must never reach it.
        if board.uboot_offset_kib is not None:
            assert board.uboot_offset_kib < board.root_offset_mib * 1024


def test_usb_gadget_consoles_are_marked_and_kept_from_the_wizard_by_default() -> None:
    """A stranger with a USB cable reaches ttyGS0: the catalog marks it, and the wizard owns
    only the board's own UART and screen unless firstboot.consoles says otherwise."""
    catalog = load_catalog()
    for board in catalog.boards:
        for console in board.consoles:
            assert console.gadget == console.device.startswith("ttyGS"), board.id
    r1, _ = catalog.lookup("orangepi-r1")
    assert [(c.device, c.gadget) for c in r1.consoles] == [("ttyS0", False), ("ttyGS0", True)]
    assert r1.wizard_consoles(["local"]) == ("ttyS0",)         # no screen on an R1
    assert r1.wizard_consoles(["local", "gadget"]) == ("ttyS0", "ttyGS0")
    assert r1.wizard_consoles(["ttyGS0"]) == ("ttyGS0",)
    with pytest.raises(ValueError, match=r"tty1 is not a console of the Orange Pi R1 \(its "
                                         r"consoles: ttyS0, ttyGS0; or the words local, gadget\)"):
        r1.wizard_consoles(["tty1"])
    pc, _ = catalog.lookup("orangepipcplus")
    assert pc.wizard_consoles(["local"]) == ("ttyS0", "tty1")
    with pytest.raises(ValueError, match="names no console of this board"):
        pc.wizard_consoles(["gadget"])


def test_a_wrong_console_setting_is_refused_before_anything_is_fetched() -> None:
    result = run_cli("--board", "orangepizero", "--dry-run", "--set",
                     "firstboot.consoles=[local, ttyS5]")
    assert result.returncode != 0
    assert error_line(result, code=2) == ("build-image: error: firstboot.consoles: ttyS5 is not a "
                                  "console of the Orange Pi Zero (its consoles: ttyS0, tty1, "
                                  "ttyGS0; or the words local, gadget)")


def test_orangepi_alias_is_a_capable_standard_board() -> None:
    board, alias = load_catalog().lookup("orangepi")
    assert (board.id, alias) == ("orangepi5", "orangepi")
    assert board.arch == "arm64" and board.support == "standard" and board.ram_mib >= 4096


def test_unknown_board_suggests_close_ids() -> None:
    with pytest.raises(BuildError) as error:
        load_catalog().lookup("orangepi55")
    message = str(error.value)
    assert message.startswith("unknown board 'orangepi55': did you mean orangepi5")
    assert "--list-boards" in message


def test_list_boards_prints_the_table() -> None:
    result = run_cli("--list-boards")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["BOARD", "NAME", "SOC"]
    for board in load_catalog().boards:
        assert any(line.startswith(board.id + " ") for line in lines), board.id
    assert "alias: orangepi = orangepi5" in lines
    pc = next(line for line in lines if line.startswith("orangepipc "))
    assert "armhf" in pc and "ttyS0 115200" in pc and "4 MiB" in pc


def test_unknown_board_on_the_command_line() -> None:
    line = error_line(run_cli("--board", "orangepi-zero", "--dry-run"), code=2)
    assert "unknown board 'orangepi-zero'" in line and "orangepizero" in line
