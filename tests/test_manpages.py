"""The man pages in docs/man: what builder/manpage.py makes from the parsers now, rendered by
man (or groff) without a warning; and every example at the end of a command's --help parses
with that command's own parser and names what exists (boards, image files as builds name
them), with sudo where the command needs root."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from builder import __version__, debian, manpage, qemu
from builder.boards import load_catalog
from builder.entry import HelpFormatter
from builder.errors import BuildError
from builder.output import COMPRESSORS

MAN_DIR = REPO / "docs" / "man"
COMMANDS = list(manpage.COMMANDS)
# What a page may hold: the requests and escapes render() writes, nothing else.
REQUESTS = {'.\\"', ".TH", ".SH", ".SS", ".PP", ".TP", ".nf", ".fi", ".SY", ".YS", ".BR"}
ESCAPES = re.compile(r"\\(\(rs|-|&|f[BIR]| |\[u[0-9A-F]{4,5}\])")


def renderer() -> list[str] | None:
    """How this machine renders a page with every warning on, or None without man or groff."""
    if shutil.which("man"):
        return ["man", "--warnings", "-l"]
    if shutil.which("groff"):
        return ["groff", "-man", "-ww", "-Tutf8"]
    return None


def render(page: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MANPAGER": "cat",
           "PAGER": "cat"}
    command = renderer()
    assert command is not None
    return subprocess.run([*command, str(page)], capture_output=True, text=True, env=env,
                          timeout=60)


def structural_problems(text: str) -> list[str]:
    """What render() never writes: an unknown request, a line a roff would read as a request
    by its apostrophe, a bare hyphen or backslash in the text."""
    problems = []
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.startswith('.\\"'):
            continue
        if raw.startswith("'"):
            problems.append(f"line {number} starts with an apostrophe: {raw!r}")
        if raw.startswith(".") and raw.split(" ", 1)[0] not in REQUESTS:
            problems.append(f"line {number}: unknown request {raw.split(' ', 1)[0]!r}")
        bare = ESCAPES.sub("", raw)
        if "\\" in bare or "-" in bare:
            problems.append(f"line {number}: an unescaped backslash or hyphen: {raw!r}")
        if any(ord(c) > 127 for c in raw):
            problems.append(f"line {number}: a character beyond ASCII: {raw!r}")
    return problems


# The committed pages are what the generator makes.


def test_the_committed_pages_are_current() -> None:
    assert manpage.stale(MAN_DIR) == [], "run: python -m builder.manpage --write docs/man"
    assert sorted(p.name for p in MAN_DIR.iterdir()) == sorted(f"{c}.1" for c in COMMANDS)


def test_the_check_command_passes_on_the_committed_pages() -> None:
    """As CI or a person runs it: the module's own entry point, in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-m", "builder.manpage", "--check", str(MAN_DIR)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (0, "")


def _add_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eject", action="store_true", help="eject the card afterwards")


def _change_help(p: argparse.ArgumentParser) -> None:
    yes = next(a for a in p._actions if "--yes" in a.option_strings)
    yes.help = "do not ask"


def _change_example(p: argparse.ArgumentParser) -> None:
    p.epilog = (p.epilog or "").replace("/dev/sdb --verify-only", "/dev/sdc --verify-only")


@pytest.mark.parametrize("change", [_add_option, _change_help, _change_example])
def test_the_check_fails_when_a_parser_changes(change: Callable[[argparse.ArgumentParser], None],
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A changed option, help text or example makes flash-image's committed page stale, and
    only that page; --write brings it up to date."""
    from builder.flash import cli
    original = cli.parser

    def changed() -> argparse.ArgumentParser:
        p = original()
        change(p)
        return p

    pages = tmp_path / "man"
    shutil.copytree(MAN_DIR, pages)
    monkeypatch.setattr(cli, "parser", changed)
    assert manpage.main(["--check", str(pages)]) == 1
    said = capsys.readouterr().err
    assert said == (f"{pages}/flash-image.1: not current; run python -m builder.manpage "
                    f"--write {pages}\n")
    assert manpage.main(["--write", str(pages)]) == 0
    assert manpage.main(["--check", str(pages)]) == 0
    assert (pages / "flash-image.1").read_text() != (MAN_DIR / "flash-image.1").read_text()


def test_the_check_names_a_page_edited_or_missing(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    pages = tmp_path / "man"
    shutil.copytree(MAN_DIR, pages)
    (pages / "try-image.1").unlink()
    edited = pages / "build-image.1"
    edited.write_text(edited.read_text().replace("\\-\\-dry\\-run", "\\-\\-dryrun"))
    assert manpage.main(["--check", str(pages)]) == 1
    named = [line.split(":")[0] for line in capsys.readouterr().err.splitlines()]
    assert named == [str(pages / "build-image.1"), str(pages / "try-image.1")]


def test_a_page_depends_on_neither_the_terminal_nor_the_date(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    narrow = manpage.pages()
    monkeypatch.setenv("COLUMNS", "200")
    assert manpage.pages() == narrow
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert __version__ == version
    for text in narrow.values():
        header = next(line for line in text.splitlines() if line.startswith(".TH "))
        assert f'"orangepi\\-jupyter {version}"' in header
        assert not re.search(r"\d{4}-\d{2}-\d{2}|20\d\d", header)


# Rendered: every page, and a check that the check itself sees a bad page.


@pytest.mark.parametrize("command", COMMANDS)
def test_a_page_renders_without_warnings(command: str) -> None:
    page = MAN_DIR / f"{command}.1"
    text = page.read_text()
    assert structural_problems(text) == []
    if renderer() is None:
        pytest.skip("neither man nor groff here: only the structure was checked")
    result = render(page)
    assert (result.returncode, result.stderr) == (0, "")
    shown = re.sub(r".\x08", "", result.stdout)       # bold and underline by overstriking
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXAMPLES", "EXIT STATUS",
                    "SEE ALSO"):
        assert re.search(rf"^{section}$", shown, re.MULTILINE), section
    parser = manpage.parser_of(command)
    for action in parser._actions:
        for flag in action.option_strings:
            # Hidden options (systemd's, on jupyter-setup) stay out of the page.
            assert (flag in shown) == (action.help is not argparse.SUPPRESS), flag
    # The hyphens are minus signs (a hyphen becomes U+2010 in UTF-8): an option copied from
    # the page is one the shell passes. Only a word broken at a line's end keeps one.
    assert not re.search("\u2010(?!$)", shown, re.MULTILINE)


def test_the_render_check_sees_warnings(tmp_path: Path) -> None:
    """The check above can fail: an unknown request and a bad font are reported."""
    if renderer() is None:
        pytest.skip("neither man nor groff here")
    bad = tmp_path / "bad.1"
    bad.write_text('.TH BAD 1 "" "x" "y"\n.SH NAME\n.XYZ unknown\nbad \\fQfont\\fR\n')
    assert render(bad).stderr != ""
    assert structural_problems(bad.read_text()) != []


def test_escaping_survives_roff(tmp_path: Path) -> None:
    """Text that roff would take as requests, escapes or hyphens comes out as written."""
    p = argparse.ArgumentParser(prog="odd-tool", description="'Quoted at the start. Then more.",
                                formatter_class=HelpFormatter)
    p.add_argument("--path", metavar="C:\\DIR",
                   help=".hidden files, a back\\slash, 100%% sure, caf\u00e9 -x --y")
    p.add_argument("--level", choices=("a", "b"), help="%(choices)s from %(prog)s")
    text = manpage.render(manpage.read_parser(p))
    assert structural_problems(text) == []
    assert "\\&.hidden" in text and "\\(rs" in text and "\\[u00E9]" in text
    assert "a, b from odd\\-tool" in text
    if renderer() is None:
        pytest.skip("neither man nor groff here")
    page = tmp_path / "odd-tool.1"
    page.write_text(text)
    result = render(page)
    assert (result.returncode, result.stderr) == (0, "")
    flat = " ".join(re.sub(r".\x08", "", result.stdout).split())
    assert ".hidden files, a back\\slash, 100% sure, caf\u00e9 -x --y" in flat
    assert "--path C:\\DIR" in flat
    assert "odd-tool - 'Quoted at the start SYNOPSIS" in flat


# The examples: each parses with its own parser and is one a person can run.


def all_examples() -> list[tuple[str, str]]:
    found = []
    for command in COMMANDS:
        _, examples = manpage.examples(manpage.parser_of(command).epilog or "")
        found += [(command, text) for example in examples for text in example.commands]
    return found


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_ends_its_help_with_examples(command: str) -> None:
    epilog = manpage.parser_of(command).epilog or ""
    _, examples = manpage.examples(epilog)
    assert 3 <= len(examples) <= 6
    assert all(example.explanation and example.commands for example in examples)
    # Every line that runs the command is one of the examples' (none read as explanation).
    runs = [line for line in epilog.splitlines()
            if re.match(rf"\s+(sudo )?{command}( |$)", line)]
    assert len(runs) == sum(len(example.commands) for example in examples)
    # As written on an 80-column terminal, which argparse's own lines fit too.
    assert max(map(len, epilog.splitlines())) <= 78


@pytest.mark.parametrize("command", COMMANDS)
def test_help_keeps_the_examples_as_written(command: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The help formatter keeps the examples' lines on a narrow terminal, and still wraps
    the description to it."""
    monkeypatch.setenv("COLUMNS", "40")
    parser = manpage.parser_of(command)
    shown = parser.format_help()
    for line in (parser.epilog or "").splitlines():
        assert line in shown.splitlines()
    description = parser.description or ""
    assert description not in shown
    assert " ".join(description.split()) == " ".join(
        shown.split("\n\n")[1].split()), "the description, wrapped"


DEFAULTS = yaml.safe_load((REPO / "builder" / "defaults.yaml").read_text())
# The file a build writes with the default settings: <dir>/<product>-<board>-<release>-<date>
# and the default compression's suffix.
BUILT = re.compile(
    rf"{re.escape(DEFAULTS['output']['dir'])}/{re.escape(DEFAULTS['output']['product'])}-"
    rf"(?P<board>[a-z0-9-]+)-{re.escape(DEFAULTS['base']['release'])}-\d{{8}}"
    rf"{re.escape('.img' + COMPRESSORS[DEFAULTS['image']['compression']][0])}")


def needs_root(command: str, args: argparse.Namespace) -> bool:
    """Whether the example's command needs sudo (README says which do)."""
    if command == "build-image":
        return not (args.dry_run or args.list_boards or args.fetch_only)
    if command == "jupyter-setup":
        return not (args.status or args.check)
    return command == "flash-image"


@pytest.mark.parametrize(("command", "text"), all_examples(),
                         ids=[f"{c}-{i}" for i, (c, _) in enumerate(all_examples())])
def test_an_example_parses_and_names_what_exists(command: str, text: str) -> None:
    words = shlex.split(manpage.command_words(text), comments=True)
    sudo = words[0] == "sudo"
    words = words[1:] if sudo else words
    assert words[0] == command
    parser = manpage.parser_of(command)
    try:
        args = parser.parse_args(words[1:])
    except SystemExit as exc:
        pytest.fail(f"{text.strip()!r} does not parse (exit {exc.code})")
    assert sudo == needs_root(command, args), "sudo where the command needs root, only there"
    catalog = load_catalog()
    if command == "build-image" and args.board:
        board, alias = catalog.lookup(args.board)
        assert alias is None
        if args.base == "debian":
            assert board.id in debian.BOARDS
    if command in ("try-image", "flash-image"):
        built = BUILT.fullmatch(args.image if isinstance(args.image, str) else
                                str(args.image))
        assert built, f"{args.image}: not a name build-image gives its image"
        board, _ = catalog.lookup(built["board"])
        if command == "try-image":
            qemu.machine_for(board, None)        # raises for a board try-image cannot boot
    if command == "flash-image":
        assert str(args.device).startswith("/dev/")


def test_the_name_check_refuses_a_board_that_does_not_exist() -> None:
    """The example check above can fail: no such board, a board try-image cannot boot."""
    catalog = load_catalog()
    with pytest.raises(BuildError):
        catalog.lookup("orangepi99")
    board, _ = catalog.lookup("orangepirv2")
    with pytest.raises(BuildError):
        qemu.machine_for(board, None)
    assert not BUILT.fullmatch("out/orangepi-jupyter-orangepipc-trixie-20261126.img.zst")


POSITIONALS = {"try-image": ["x.img.xz"], "flash-image": ["x.img.xz", "/dev/sdx"]}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_usage_error_exits_2_as_the_pages_say(command: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        manpage.parser_of(command).parse_args([*POSITIONALS.get(command, []),
                                               "--no-such-option"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    page = (MAN_DIR / f"{command}.1").read_text()
    assert ".TP\n\\fB2\\fR\na usage error" in page
