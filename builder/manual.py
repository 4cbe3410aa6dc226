"""The manual's generated parts, kept in step with the code they describe.

docs/*.md hold blocks between `<!-- generated: NAME -->` and `<!-- /generated -->`:

- `settings`: every key of builder/defaults.yaml, its default, and its meaning, which is the
  comment directly above the key there (and one after its value on the same line);
- `boards`: the board catalog, exactly as `build-image --list-boards --markdown` prints it.

`python -m builder.manual --check` names each block that differs from what this module makes
now (exit 1); `--write` rewrites those blocks in place. Everything else in docs/ is prose.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from builder.config import leaves

DEFAULTS = Path(__file__).resolve().with_name("defaults.yaml")
DOCS = Path(__file__).resolve().parent.parent / "docs"
BEGIN = re.compile(r"<!-- generated: ([a-z-]+) -->")
END = "<!-- /generated -->"
# A key of a YAML mapping at the start of a line: `  port: 8888  # comment`.
KEY_LINE = re.compile(r"( *)([A-Za-z_][A-Za-z0-9_]*):(.*)")


@dataclass(frozen=True)
class Setting:
    key: str            # dotted path, e.g. jupyter.port
    default: Any
    meaning: str


def key_comments(text: str) -> dict[str, str]:
    """Each key of a YAML text (mappings written in block style, as defaults.yaml is) with
    the comment lines directly above it, joined, and the comment after its value on the same
    line. A blank line, or anything that is not a comment or a key (a list item), ends the
    comment above."""
    found: dict[str, str] = {}
    parents: list[tuple[int, str]] = []      # (indent, key) of the mappings we are in
    above: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = KEY_LINE.fullmatch(line)
        if not match:
            above = []
            continue
        indent, key, rest = len(match[1]), match[2], match[3]
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = ".".join([k for _, k in parents] + [key])
        parents.append((indent, key))
        after = re.search(r"\s#\s*(.*)$", rest)
        words = [*above, after[1]] if after else above
        found[path] = " ".join(word for word in words if word)
        above = []
    return found


def settings(text: str) -> tuple[list[Setting], dict[str, str]]:
    """The settings of a defaults.yaml text, in its order, and the comment above each
    section. A key without a comment is an error: every setting says what it is for."""
    data = yaml.safe_load(text)
    comments = key_comments(text)
    result = []
    missing = []
    for key, value in leaves(data).items():
        if key not in comments:
            raise ValueError(f"defaults.yaml: {key}: not found as a 'key:' line")
        if not comments[key]:
            missing.append(key)
        result.append(Setting(key, value, comments[key]))
    if missing:
        raise ValueError(f"defaults.yaml: no comment above {', '.join(missing)}: say what "
                         f"each setting is for in the comment lines directly above it")
    sections = {key: comments[key] for key, value in data.items() if isinstance(value, dict)}
    return result, sections


def cell(text: str) -> str:
    """Text for a Markdown table cell: `|` escaped everywhere (also in code), and `<` outside
    code (as \\<), so that <hostname> is shown rather than taken for HTML."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(part if i % 2 else part.replace("<", "\\<") for i, part in enumerate(parts))


def show_default(value: Any) -> str:
    if value is None or value == []:
        return "none"
    if isinstance(value, list):
        return ", ".join(f"`{item}`" for item in value)
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def settings_markdown(text: str) -> str:
    """The configuration reference: a table per section of defaults.yaml (top-level keys
    that are not sections first), each key with its default and meaning."""
    found, sections = settings(text)
    groups: dict[str, list[Setting]] = {}
    for setting in found:
        section = setting.key.partition(".")[0] if "." in setting.key else ""
        groups.setdefault(section, []).append(setting)
    out: list[str] = []
    for section, members in groups.items():
        if section:
            out += [f"### {section}", ""]
            if sections.get(section):
                out += [cell(sections[section]), ""]
        out += ["| key | default | meaning |", "|---|---|---|"]
        out += [f"| `{s.key}` | {cell(show_default(s.default))} | {cell(s.meaning)} |"
                for s in members]
        out.append("")
    return "\n".join(out).rstrip("\n")


def boards_markdown() -> str:
    """What `build-image --list-boards --markdown` prints: made by the same function."""
    from builder.cli import boards_markdown as made_by_the_cli
    return made_by_the_cli()


GENERATORS: dict[str, Callable[[], str]] = {
    "settings": lambda: settings_markdown(DEFAULTS.read_text(encoding="utf-8")),
    "boards": boards_markdown,
}


def blocks(text: str) -> list[tuple[str, int, int]]:
    """(name, start, end) of each generated block: text[start:end] is what lies between the
    line of its begin marker and the line of its end marker."""
    found = []
    position = 0
    while (begin := BEGIN.search(text, position)) is not None:
        end = text.find(END, begin.end())
        following = BEGIN.search(text, begin.end())
        if end < 0 or (following is not None and following.start() < end):
            raise ValueError(f"<!-- generated: {begin[1]} --> has no {END} after it")
        found.append((begin[1], begin.end(), end))
        position = end + len(END)
    if END in text[position:]:
        raise ValueError(f"{END} without a <!-- generated: NAME --> before it")
    return found


def refreshed(text: str, made: dict[str, str]) -> tuple[str, list[str]]:
    """The text with each generated block replaced by what `made` holds for it, and the
    names of the blocks that changed."""
    changed = []
    pieces = []
    position = 0
    for name, start, end in blocks(text):
        if name not in made:
            raise ValueError(f"<!-- generated: {name} -->: no such block (known: "
                             f"{', '.join(sorted(made))})")
        new = f"\n{made[name]}\n"
        if text[start:end] != new:
            changed.append(name)
        pieces += [text[position:start], new]
        position = end
    pieces.append(text[position:])
    return "".join(pieces), changed


def stale(docs: Path, made: dict[str, str]) -> list[str]:
    """`FILE: BLOCK` for each generated block of docs/*.md that differs from `made`."""
    return [f"{path}: {name}" for path in sorted(docs.glob("*.md"))
            for name in refreshed(path.read_text(encoding="utf-8"), made)[1]]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m builder.manual",
        description="The manual's generated blocks (<!-- generated: NAME --> ... "
                    f"{END}): the settings reference and the board table.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--check", action="store_true",
                      help="name each block that is out of date, exit 1 if any")
    what.add_argument("--write", action="store_true", help="rewrite the blocks that differ")
    p.add_argument("--docs", type=Path, default=DOCS, metavar="DIR",
                   help=f"the manual's directory (default {DOCS})")
    args = p.parse_args(argv)
    try:
        made = {name: make() for name, make in GENERATORS.items()}
        if args.check:
            found = stale(args.docs, made)
            for line in found:
                print(f"{line}: out of date (python -m builder.manual --write)", file=sys.stderr)
            return 1 if found else 0
        for path in sorted(args.docs.glob("*.md")):
            text, changed = refreshed(path.read_text(encoding="utf-8"), made)
            if changed:
                path.write_text(text, encoding="utf-8")
                print(f"{path}: {', '.join(changed)} rewritten")
        return 0
    except (OSError, ValueError) as exc:
        print(f"builder.manual: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
