"""The Orange Pi board catalog (boards.yaml): what the builder knows about each board."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

from builder.errors import BuildError

SUPPORT_LEVELS = ("standard", "community", "wip", "eos", "tvbox")
ARCHES = ("armhf", "arm64", "riscv64")


@dataclass(frozen=True)
class Console:
    device: str
    baud: int


@dataclass(frozen=True)
class Board:
    id: str
    name: str
    soc: str
    arch: str
    family: str
    support: str
    consoles: tuple[Console, ...]
    display: bool
    ram_mib: int
    partition_table: str
    root_offset_mib: int
    uboot_offset_kib: int | None

    @property
    def console(self) -> Console:
        """The main debug UART: where the first-boot wizard runs."""
        return self.consoles[0]


@dataclass(frozen=True)
class Catalog:
    boards: tuple[Board, ...]
    aliases: dict[str, str]

    def ids(self) -> list[str]:
        return [b.id for b in self.boards]

    def lookup(self, name: str) -> tuple[Board, str | None]:
        """The board for an id or alias, and the alias when one was used."""
        target = self.aliases.get(name)
        wanted = target or name
        for board in self.boards:
            if board.id == wanted:
                return board, (name if target else None)
        close = difflib.get_close_matches(name, self.ids() + list(self.aliases), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise BuildError(
            f"unknown board {name!r}: {hint}(`build-image --list-boards` shows every board)"
        )


_FIELDS = (
    "id", "name", "soc", "arch", "family", "support", "consoles", "display", "ram_mib",
    "partition_table", "root_offset_mib", "uboot_offset_kib",
)


def _parse_board(raw: dict[str, Any]) -> Board:
    ident = raw.get("id", "?")
    if set(raw) != set(_FIELDS):
        extra = sorted(set(raw) - set(_FIELDS))
        missing = sorted(set(_FIELDS) - set(raw))
        raise ValueError(f"board {ident}: unknown keys {extra}, missing keys {missing}")
    if raw["arch"] not in ARCHES:
        raise ValueError(f"board {ident}: arch {raw['arch']!r} is not one of {ARCHES}")
    if raw["support"] not in SUPPORT_LEVELS:
        raise ValueError(
            f"board {ident}: support {raw['support']!r} is not one of {SUPPORT_LEVELS}")
    if raw["partition_table"] not in ("msdos", "gpt"):
        raise ValueError(f"board {ident}: partition_table must be msdos or gpt")
    consoles = tuple(Console(str(c["device"]), int(c["baud"])) for c in raw["consoles"])
    if not consoles:
        raise ValueError(f"board {ident}: needs at least one serial console")
    return Board(
        id=str(raw["id"]),
        name=str(raw["name"]),
        soc=str(raw["soc"]),
        arch=str(raw["arch"]),
        family=str(raw["family"]),
        support=str(raw["support"]),
        consoles=consoles,
        display=bool(raw["display"]),
        ram_mib=int(raw["ram_mib"]),
        partition_table=str(raw["partition_table"]),
        root_offset_mib=int(raw["root_offset_mib"]),
        uboot_offset_kib=None if raw["uboot_offset_kib"] is None else int(raw["uboot_offset_kib"]),
    )


@cache
def load_catalog() -> Catalog:
    text = resources.files("builder").joinpath("boards.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    boards = tuple(_parse_board(raw) for raw in data["boards"])
    aliases = {str(k): str(v) for k, v in (data.get("aliases") or {}).items()}
    ids = [b.id for b in boards]
    if len(set(ids)) != len(ids):
        raise ValueError("boards.yaml: duplicate board ids")
    for alias, target in aliases.items():
        if target not in ids or alias in ids:
            raise ValueError(
                f"boards.yaml: alias {alias} -> {target} is not a board, or shadows one")
    return Catalog(boards=boards, aliases=aliases)


def format_table(catalog: Catalog) -> str:
    """The catalog as a fixed-width table for --list-boards."""
    header = ("BOARD", "NAME", "SOC", "ARCH", "FAMILY", "SERIAL CONSOLE", "TABLE", "ROOT AT",
              "U-BOOT AT", "SUPPORT")
    rows = [header]
    for b in catalog.boards:
        rows.append((
            b.id,
            b.name,
            b.soc,
            b.arch,
            b.family,
            ", ".join(f"{c.device} {c.baud}" for c in b.consoles),
            b.partition_table,
            f"{b.root_offset_mib} MiB",
            "-" if b.uboot_offset_kib is None else f"{b.uboot_offset_kib} KiB",
            b.support,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    for alias, target in sorted(catalog.aliases.items()):
        lines.append(f"alias: {alias} = {target}")
    return "\n".join(lines)
