"""Each command's man page (man(7) roff), rendered from its own argparse parser, so that the
page cannot say other than --help does:

    python -m builder.manpage --write docs/man     (re)write the four pages
    python -m builder.manpage --check docs/man     exit 1 naming each page that is not current

NAME and DESCRIPTION come from the parser's description, SYNOPSIS and OPTIONS from its
arguments (an argument group is a subsection), EXAMPLES from its epilog, EXIT STATUS from the
exit codes the command's modules define. A page depends on nothing but the sources: not the
terminal's width, not the date (the header carries the package's version instead).

An epilog is written for a terminal and read here by its layout: paragraphs, then a line
`Examples:`, then for each example its explanation indented two spaces and its command lines
indented four or more (a line ending in ` \\` goes on on the next line). Anything else after
`Examples:` is refused, so a page never silently loses an example.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder import __version__

# The commands with a page, and the module whose parser() each one's command line is.
COMMANDS = {
    "build-image": "builder.cli",
    "try-image": "builder.tryimage",
    "flash-image": "builder.flash.cli",
    "jupyter-setup": "builder.firstboot.cli",
}
SECTION = "1"
EXAMPLES_HEADING = "Examples:"


@dataclass(frozen=True)
class Item:
    """One argument as the page shows it: `flags` empty for a positional."""

    flags: tuple[str, ...]
    metavar: str
    help: str


@dataclass(frozen=True)
class Group:
    title: str                  # "" for the parser's own positionals and options
    description: str
    items: tuple[Item, ...]


@dataclass(frozen=True)
class Example:
    explanation: str
    commands: tuple[str, ...]   # each as written, continuation lines and all


@dataclass(frozen=True)
class Command:
    """What a page is made of, read from a parser."""

    name: str
    description: str
    usage: tuple[tuple[Item, ...], ...]     # alternatives of a mutually exclusive group together
    groups: tuple[Group, ...]
    epilog: str


def read_parser(parser: argparse.ArgumentParser) -> Command:
    """The one place argparse's internals are read (_actions, _action_groups,
    _mutually_exclusive_groups): what --help shows, without the help formatter, whose output
    depends on the terminal."""
    shown = [a for a in parser._actions if a.help is not argparse.SUPPRESS]
    items = {id(a): _item(a, parser.prog) for a in shown}
    usage: list[tuple[Item, ...]] = []
    grouped: set[int] = set()
    # As argparse's usage: the options first, in their order, then the positionals.
    for action in [a for a in shown if a.option_strings] + [a for a in shown
                                                              if not a.option_strings]:
        if id(action) in grouped:
            continue
        exclusive = next((g for g in parser._mutually_exclusive_groups
                          if action in g._group_actions), None)
        members = [a for a in (exclusive._group_actions if exclusive else [action])
                   if id(a) in items]
        grouped |= {id(a) for a in members}
        usage.append(tuple(items[id(a)] for a in members))
    groups = []
    for index, group in enumerate(parser._action_groups):
        shown_here = tuple(items[id(a)] for a in group._group_actions if id(a) in items)
        if shown_here:
            # The first two are argparse's own ("positional arguments", "options").
            title = "" if index < 2 else group.title or ""
            groups.append(Group(title, group.description or "", shown_here))
    return Command(name=parser.prog, description=parser.description or "", usage=tuple(usage),
                   groups=tuple(groups), epilog=parser.epilog or "")


def _item(action: argparse.Action, prog: str) -> Item:
    return Item(flags=tuple(action.option_strings), metavar=_metavar(action),
                help=_expand(action, prog))


def _metavar(action: argparse.Action) -> str:
    """What follows the option in --help (`FILE`, `{xz,zstd}`, `[X ...]`), "" for a flag."""
    if action.nargs == 0:
        return ""
    if action.metavar is not None:
        name = (" ".join(action.metavar) if isinstance(action.metavar, tuple)
                else action.metavar)
    elif action.choices is not None:
        name = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        name = action.dest if not action.option_strings else action.dest.upper()
    if action.nargs is None:
        return name
    if action.nargs == argparse.OPTIONAL:
        return f"[{name}]"
    if action.nargs == argparse.ZERO_OR_MORE:
        return f"[{name} ...]"
    if action.nargs == argparse.ONE_OR_MORE:
        return f"{name} [{name} ...]"
    if isinstance(action.nargs, int):
        return " ".join([name] * action.nargs)
    return "..."


def _expand(action: argparse.Action, prog: str) -> str:
    """The help text with %(prog)s, %(default)s, ... filled in, as argparse fills them."""
    text = action.help or ""
    if "%" not in text:
        return text
    params = {k: v for k, v in dict(vars(action), prog=prog).items()
              if v is not argparse.SUPPRESS}
    params = {k: getattr(v, "__name__", v) for k, v in params.items()}
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return text % params


def examples(epilog: str) -> tuple[list[str], list[Example]]:
    """An epilog's paragraphs before `Examples:`, and its examples."""
    lines = epilog.splitlines()
    at = lines.index(EXAMPLES_HEADING) if EXAMPLES_HEADING in lines else len(lines)
    before = "\n".join(lines[:at])
    paragraphs = [" ".join(p.split()) for p in before.split("\n\n") if p.strip()]
    found: list[Example] = []
    explanation: list[str] = []
    commands: list[str] = []
    for raw in lines[at + 1:]:
        if commands and commands[-1].endswith(" \\"):
            commands[-1] += "\n" + raw
        elif raw.startswith("    "):
            if not explanation:
                raise ValueError(f"an example's command without an explanation before it: "
                                 f"{raw.strip()!r}")
            commands.append(raw)
        elif raw.startswith("  ") and raw[2:3].strip():
            if commands:            # the previous example is complete
                found.append(Example(" ".join(explanation), tuple(commands)))
                explanation, commands = [], []
            explanation.append(raw.strip())
        else:
            raise ValueError(f"after {EXAMPLES_HEADING!r}, a line indented neither two spaces "
                             f"(an explanation) nor four (a command): {raw!r}")
    if explanation and not commands:
        raise ValueError(f"an example without a command: {' '.join(explanation)!r}")
    if commands and commands[-1].endswith(" \\"):
        raise ValueError(f"the last example's command goes on after the epilog ends: "
                         f"{commands[-1].strip()!r}")
    if commands:
        found.append(Example(" ".join(explanation), tuple(commands)))
    return paragraphs, found


def command_words(command: str) -> str:
    """An example's command as one line: its continuation lines joined, indentation gone."""
    return " ".join(part.strip() for part in command.replace(" \\\n", "\n").splitlines())


# Exit codes: builder.entry's for the host's commands, with each command's own.
SIGNAL_CAUSES = {"SIGINT": "Ctrl-C", "SIGTERM": "kill, a cancelled CI job",
                 "SIGHUP": "the terminal closed"}


def exit_statuses(name: str) -> list[tuple[int, str]]:
    """(code, meaning) for the page's EXIT STATUS, from the constants the code returns."""
    # argparse's own, for every command: parser.error() exits 2.
    usage = "a usage error (an unknown option, a missing or malformed argument)"
    if name == "jupyter-setup":
        from builder.firstboot.session import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
        return [(EXIT_OK, "done"),
                (EXIT_FAILED, "it failed, or it was not run as root for a change; with "
                              "--check, the file has problems (each is printed)"),
                (2, usage),
                (EXIT_INTERRUPTED, "interrupted with Ctrl-C while asking; nothing was "
                                   "changed")]
    from builder.entry import EXIT_BROKEN_PIPE, EXIT_ERROR, EXIT_USAGE, SIGNALS
    codes: dict[int, list[str]] = {
        0: ["done"],
        EXIT_ERROR: ["it failed: one line on standard error says what is wrong and how to "
                     "fix it"],
        EXIT_USAGE: ["a usage error: the command line asks for what cannot be (an unknown "
                     "option, a bad value, options that exclude each other, a file it names "
                     "that is missing or not what the option wants), whichever check finds "
                     "it"],
        EXIT_BROKEN_PIPE: ["whoever read standard output went away (`| head`): it stops "
                           "quietly"]}
    if name == "try-image":
        from builder.smoke import EXIT_FAILED as SMOKE_FAILED
        codes.setdefault(SMOKE_FAILED, []).append(
            "with --smoke, a check failed (standard error names the phase and shows the "
            "serial console's last lines; the report has the rest)")
    if name == "flash-image":
        from builder.flash.cli import EXIT_MISMATCH
        codes.setdefault(EXIT_MISMATCH, []).append(
            "the card does not hold the image, read back after writing or with --verify-only "
            "(a card just written is then left without a partition table, so it does not "
            "boot)")
    for signum in sorted(SIGNALS):
        codes[128 + signum] = [f"interrupted by {signum.name} "
                               f"({SIGNAL_CAUSES.get(signum.name, 'a signal')}); what was "
                               f"started is cleaned up first, and a line says what"]
    return [(code, ", or ".join(meanings)) for code, meanings in sorted(codes.items())]


# roff.


def escape(text: str) -> str:
    """Text safe in a roff text line: backslashes as \\(rs, hyphens as minus signs \\- (so
    that an option copied from the page is one the shell passes), characters beyond ASCII as
    \\[uXXXX] (groff reads its input as Latin-1 unless told otherwise)."""
    out = text.replace("\\", "\\(rs").replace("-", "\\-")
    return "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in out)


def line(text: str) -> str:
    """A text line: one starting with a dot or an apostrophe would be read as a request."""
    return f"\\&{text}" if text[:1] in (".", "'") else text


def _bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


def _invocation(item: Item, nonbreaking: bool = False) -> str:
    """`--board ID` as --help shows it, bold and italic; the metavar stays with its option."""
    space = "\\ " if nonbreaking else " "
    if not item.flags:
        return _italic(item.metavar)
    if not item.metavar:
        return ", ".join(map(_bold, item.flags))
    return ", ".join(f"{_bold(flag)}{space}{_italic(item.metavar)}" for flag in item.flags)


def _synopsis(command: Command) -> list[str]:
    # .SY/.YS (groff's man extensions, known to mandoc too): continuation lines hang
    # under the first option, and no line breaks inside a word.
    lines = [f".SY {escape(command.name)}"]
    for alternatives in command.usage:
        if len(alternatives) == 1 and not alternatives[0].flags:
            lines.append(_invocation(alternatives[0]))
            continue
        # The first option string, as argparse's usage: -q, not -q, --quiet.
        shown = [_invocation(Item(a.flags[:1], a.metavar, a.help), nonbreaking=True)
                 for a in alternatives]
        lines.append(line("[" + "\\ |\\ ".join(shown) + "]"))
    return [*lines, ".YS"]


def _name_line(command: Command) -> str:
    """The description's first clause, for NAME (what whatis and apropos show)."""
    first = re.split(r"[.:](?:\s|$)", command.description, maxsplit=1)[0].strip()
    return f"{escape(command.name)} \\- {escape(first[:1].lower() + first[1:])}"


def render(command: Command) -> str:
    """The page, as roff."""
    title = escape(command.name.upper())
    out = [f'.\\" {command.name}({SECTION}): made by python -m builder.manpage from the '
           f"command's parser; do not edit.",
           f'.TH {title} {SECTION} "" "orangepi\\-jupyter {escape(__version__)}" '
           f'"User Commands"',
           ".SH NAME", _name_line(command),
           ".SH SYNOPSIS", *_synopsis(command)]
    paragraphs, found = examples(command.epilog)
    out += [".SH DESCRIPTION", line(escape(command.description))]
    for paragraph in paragraphs:
        out += [".PP", line(escape(paragraph))]
    out.append(".SH OPTIONS")
    for group in command.groups:
        if group.title:
            out += [".SS", line(escape(group.title[:1].upper() + group.title[1:]))]
        if group.description:
            out += [".PP", line(escape(group.description))]
        for item in group.items:
            out += [".TP", line(_invocation(item))]
            if item.help:
                out.append(line(escape(item.help)))
    if found:
        out.append(".SH EXAMPLES")
        for example in found:
            # Commands in bold at the section's indent, not indented further: a command with
            # an image's full name then still fits an 80-column terminal.
            out += [".PP", line(escape(example.explanation)), ".nf"]
            for command_text in example.commands:
                lines = command_text.splitlines()
                indent = len(lines[0]) - len(lines[0].lstrip())
                out += [line(_bold(raw[indent:])) for raw in lines]
            out.append(".fi")
    out.append(".SH EXIT STATUS")
    for code, meaning in exit_statuses(command.name):
        out += [".TP", f"\\fB{code}\\fR", line(escape(meaning))]
    others = [name for name in COMMANDS if name != command.name]
    out += [".SH SEE ALSO",
            ",\n".join(f".BR {escape(name)} ({SECTION})" for name in others),
            ".PP",
            line(escape("docs/README.md of orangepi-jupyter: the manual, with what each "
                        "command does in full."))]
    return "\n".join(out) + "\n"


def parser_of(name: str) -> argparse.ArgumentParser:
    """The command's parser, from its module's parser() as the command itself builds it."""
    made: Callable[[], argparse.ArgumentParser] = importlib.import_module(
        COMMANDS[name]).parser
    return made()


def pages() -> dict[str, str]:
    """File name: contents, for every command."""
    return {f"{name}.{SECTION}": render(read_parser(parser_of(name))) for name in COMMANDS}


def stale(directory: Path) -> list[str]:
    """The pages in `directory` that are missing or differ from what the parsers make now."""
    wanted = pages()
    found = []
    for filename, text in wanted.items():
        path = directory / filename
        try:
            current = path.read_text(encoding="utf-8") == text
        except FileNotFoundError:
            current = False
        if not current:
            found.append(filename)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m builder.manpage",
                                  description="Write or check the commands' man pages.")
    what = cli.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", metavar="DIR", type=Path, help="write the pages into DIR")
    what.add_argument("--check", metavar="DIR", type=Path,
                      help="exit 1 naming each page in DIR that is not current")
    args = cli.parse_args(argv)
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        for filename, text in pages().items():
            (args.write / filename).write_text(text, encoding="utf-8")
            print(args.write / filename)
        return 0
    behind = stale(args.check)
    for filename in behind:
        print(f"{args.check / filename}: not current; run python -m builder.manpage --write "
              f"{args.check}", file=sys.stderr)
    return 1 if behind else 0


if __name__ == "__main__":
    sys.exit(main())
