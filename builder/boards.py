"""The Orange Pi board catalog (boards.yaml): what the builder knows about each board."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
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
    # A USB gadget serial port (g_serial, ttyGS*): whoever plugs a cable into the board's USB
    # port reaches it, so it is not trusted with secrets the way the board's own UART is.
    gadget: bool = False


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

    def wizard_consoles(self, wanted: Sequence[str]) -> tuple[str, ...]:
        """The consoles the first-boot wizard owns, from firstboot.consoles: `local` (the
        board's own UARTs, and tty1 when it has a screen), `gadget` (its USB gadget serial
        ports), or device names. ValueError names what is not this board's."""
        local = [c.device for c in self.consoles if not c.gadget]
        local += ["tty1"] if self.display else []
        gadget = [c.device for c in self.consoles if c.gadget]
        chosen: list[str] = []
        for word in wanted:
            if word in ("local", "gadget"):
                chosen += local if word == "local" else gadget
            elif word in local + gadget:
                chosen.append(word)
            else:
                raise ValueError(f"{word} is not a console of the {self.name} (its consoles: "
                                 f"{', '.join(local + gadget)}; or the words local, gadget)")
        if not chosen:
            raise ValueError("names no console of this board: the wizard needs one (local, "
                             "the default, is the board's UART and screen)")
        return tuple(dict.fromkeys(chosen))


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
    consoles = tuple(Console(str(c["device"]), int(c["baud"]), bool(c.get("gadget", False)))
                     for c in raw["consoles"])
    if not consoles:
        raise ValueError(f"board {ident}: needs at least one serial console")
    for console in consoles:
        if console.device.startswith("ttyGS") != console.gadget:
            raise ValueError(f"board {ident}: {console.device} must be marked gadget: true "
                             f"exactly when it is a USB gadget console (ttyGS*)")
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


# The columns --list-boards can show, by heading: the plain table has them all, the Markdown
# one (the board table in docs/boards.md) those a newcomer picks a board by.
_COLUMNS: dict[str, Callable[[Board], str]] = {
    "board": lambda b: b.id,
    "name": lambda b: b.name,
    "SoC": lambda b: b.soc,
    "arch": lambda b: b.arch,
    "family": lambda b: b.family,
    "serial console": lambda b: ", ".join(f"{c.device} {c.baud}" for c in b.consoles),
    "table": lambda b: b.partition_table,
    "root at": lambda b: f"{b.root_offset_mib} MiB",
    "U-Boot at": lambda b: "-" if b.uboot_offset_kib is None else f"{b.uboot_offset_kib} KiB",
    "support": lambda b: b.support,
}
MARKDOWN_COLUMNS = ("board", "name", "SoC", "arch", "serial console", "support")


def _rows(catalog: Catalog, columns: Sequence[str],
          extra: Mapping[str, Callable[[Board], str]]) -> list[tuple[str, ...]]:
    """The heading row, then one row per board."""
    cells = {**{name: _COLUMNS[name] for name in columns}, **extra}
    return [tuple(cells), *(tuple(cell(b) for cell in cells.values()) for b in catalog.boards)]


def format_table(catalog: Catalog) -> str:
    """The catalog as a fixed-width table for --list-boards."""
    rows = _rows(catalog, tuple(_COLUMNS), {})
    rows[0] = tuple(heading.upper() for heading in rows[0])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    for alias, target in sorted(catalog.aliases.items()):
        lines.append(f"alias: {alias} = {target}")
    return "\n".join(lines)


def format_markdown(catalog: Catalog,
                    extra: Mapping[str, Callable[[Board], str]] | None = None) -> str:
    """The catalog as a Markdown table (--list-boards --markdown), which docs/boards.md carries
    verbatim. `extra` adds columns the catalog cannot fill itself (how try-image boots a
    board is known to qemu.py, which imports this module)."""
    rows = _rows(catalog, MARKDOWN_COLUMNS, extra or {})
    # The board id is what --board takes: code, so it can be copied as it is.
    rows[1:] = [(f"`{row[0]}`", *row[1:]) for row in rows[1:]]
    lines = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
             for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    lines.append("")
    lines += [f"`--board {alias}` is `{target}`." for alias, target in
              sorted(catalog.aliases.items())]
    return "\n".join(lines)
