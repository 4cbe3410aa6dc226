"""Every command example of README.md and docs/*.md still works.

The examples are the lines of code blocks that call build-image, try-image, flash-image,
jupyter-setup, ci/setup-host or ci/in-container. Those that can run here, without root, the
network or a device, are run: build-image's --list-boards, --help, dry runs against the
snapshot of Armbian's index (so a board, release or branch the index lacks fails), the
preseed examples through the card's own checks, setup-host's options through its --list.
The others are parsed with their command's own argparse parser, so an option that was
removed or renamed fails; PARSE_ONLY names each of them and why it is not run. A failure
names the document and the line."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SNAPSHOT, cli_env

from builder import cli, manual, tryimage
from builder.firstboot import cli as firstboot_cli
from builder.firstboot.answers import parse_preseed
from builder.firstboot.card import Settings
from builder.flash import cli as flash_cli

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOOLS = ("build-image", "try-image", "flash-image", "jupyter-setup", "setup-host",
         "in-container")
# No example may reach the network: what a dry run would fetch (Armbian's .sha) goes to a
# port where nothing listens, and fails at once.
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "no_proxy": "", "NO_PROXY": ""}

# Examples that are only parsed, not run: a pattern found in the example's arguments, or a
# whole command, and why. Each pattern must still match an example (see the last test).
PARSE_ONLY_COMMANDS = {
    "try-image": "boots QEMU for minutes and needs a built image",
    "flash-image": "writes a card: needs root, a built image and a device",
    "in-container": "runs Docker; its arguments are build-image's, parsed with its parser",
    "jupyter-setup": "runs on the card",
}
PARSE_ONLY_BUILDS = {
    "--base ./my.img.xz": "names an image file of the reader's own and a digest placeholder",
    "--customize site/customize.d": "needs the reader's site/ directories",
}
@dataclass(frozen=True)
class Example:
    document: Path
    line: int
    text: str
    tool: str               # one of TOOLS
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.document.relative_to(REPO)}:{self.line}: {self.text}"


def code_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of every code line: in a ``` block, or indented by four spaces
    outside one. A line ending in a backslash is joined with the next one. A ```text block
    is a picture (README's diagram), not code."""
    fenced = picture = False
    pending: tuple[int, str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            picture = fenced and line.strip() == "```text"
            continue
        if picture or not (fenced or line.startswith("    ")):
            continue
        if pending:
            number, line = pending[0], pending[1] + " " + line.strip()
            pending = None
        if line.endswith("\\"):
            pending = (number, line[:-1])
            continue
        yield number, line.strip()


def split_commands(line: str) -> Iterator[list[str]]:
    """The simple commands of a shell line, without comments: tokens up to && ; | ( )."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    command: list[str] = []
    for token in lexer:
        if token and set(token) <= set("&|;()<>"):
            if command:
                yield command
            command = []
        else:
            command.append(token)
    if command:
        yield command


def examples_in(document: Path) -> Iterator[Example]:
    for number, line in code_lines(document.read_text(encoding="utf-8")):
        if not any(tool in line for tool in TOOLS):
            continue
        try:
            commands = list(split_commands(line))
        except ValueError as exc:
            raise AssertionError(f"{document.relative_to(REPO)}:{number}: {line}: "
                                 f"not a shell line ({exc})") from None
        for command in commands:
            if command[:1] == ["sudo"]:
                command = command[1:]
            if command and Path(command[0]).name in TOOLS:
                yield Example(document, number, line, Path(command[0]).name,
                              tuple(command[1:]))


EXAMPLES = [example for document in DOCUMENTS for example in examples_in(document)]


def ids(examples: list[Example]) -> list[str]:
    return [f"{e.document.relative_to(REPO)}:{e.line}:{e.tool}" for e in examples]


def of(tool: str) -> list[Example]:
    return [e for e in EXAMPLES if e.tool == tool]


def parse_only_reason(example: Example) -> str | None:
    if example.tool in PARSE_ONLY_COMMANDS:
        return PARSE_ONLY_COMMANDS[example.tool]
    joined = " ".join(example.args)
    return next((why for pattern, why in PARSE_ONLY_BUILDS.items() if pattern in joined), None)


def fenced_blocks(language: str) -> list[tuple[Path, int, str]]:
    """(document, line, text) of each ```LANGUAGE block."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for match in re.finditer(rf"^```{language}\n(.*?)^```", text, re.M | re.S):
            found.append((document, text[:match.start()].count("\n") + 1, match[1]))
    return found


PRESEEDS = fenced_blocks("ini")


def site_yaml() -> str:
    """configuration.md's example of a --config file (site.yaml)."""
    found = [text for _, _, text in fenced_blocks("yaml") if text.startswith("# site.yaml")]
    assert len(found) == 1, "docs/configuration.md must hold one ```yaml block '# site.yaml...'"
    return found[0]


def parser_of(main: Callable[[list[str]], int]) -> argparse.ArgumentParser:
    """The parser a main() builds for itself (jupyter-setup has no parser() of its own)."""
    class Built(Exception):
        pass

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise Built(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture      # type: ignore[assignment]
    try:
        main([])
    except Built as built:
        return built.args[0]         # type: ignore[no-any-return]
    finally:
        argparse.ArgumentParser.parse_args = original   # type: ignore[method-assign]
    raise AssertionError("main() built no parser")


PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "build-image": cli.parser,
    "in-container": cli.parser,
    "try-image": tryimage.parser,
    "flash-image": flash_cli.parser,
    "jupyter-setup": lambda: parser_of(firstboot_cli.main),
}


def parse(example: Example) -> argparse.Namespace:
    parser = PARSERS[example.tool]()
    parser.exit_on_error = False

    def refuse(message: str) -> None:
        raise AssertionError(f"{example}\n  {example.tool} refuses it: {message}")

    parser.error = refuse            # type: ignore[method-assign]
    try:
        return parser.parse_args(list(example.args))
    except argparse.ArgumentError as exc:
        raise AssertionError(f"{example}\n  {example.tool} refuses it: {exc}") from None


def params(examples: list[Example]) -> list[object]:
    return [pytest.param(e, id=i) for e, i in zip(examples, ids(examples), strict=True)]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Where examples run: the files they name, as the docs show them."""
    (tmp_path / "firstboot.conf").write_text(PRESEEDS[0][2], encoding="utf-8")
    (tmp_path / "site.yaml").write_text(site_yaml(), encoding="utf-8")
    return tmp_path


def run_build_image(example: Example, workdir: Path, *extra: str
                    ) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "builder", *example.args, *extra]
    return subprocess.run(argv, cwd=workdir, env=cli_env(**OFFLINE), capture_output=True,
                          text=True, timeout=120)


def test_the_docs_have_examples_of_every_command() -> None:
    assert {e.tool for e in EXAMPLES} == set(TOOLS), EXAMPLES
    assert PRESEEDS, "no ```ini preseed example in the docs"


@pytest.mark.parametrize("example", params(of("build-image")))
def test_build_image_example_works(example: Example, workdir: Path) -> None:
    parse(example)
    args = example.args
    if parse_only_reason(example):
        return
    if "--list-boards" in args:
        result = run_build_image(example, workdir)
        assert result.returncode == 0, f"{example}\n{result.stderr}"
        if "--markdown" in args:
            assert result.stdout.rstrip("\n") == manual.boards_markdown(), example
        else:
            assert "orangepi5" in result.stdout, f"{example}\n{result.stdout}"
    elif "--help" in args or "--version" in args:
        result = run_build_image(example, workdir)
        assert result.returncode == 0, f"{example}\n{result.stderr}"
        assert "build-image" in result.stdout, example
    elif "--check-preseed" in args:
        result = run_build_image(example, workdir)
        name = args[args.index("--check-preseed") + 1]
        assert result.returncode == 0 and result.stdout.startswith(f"{name}: ok ("), \
            f"{example}\n{result.stdout}{result.stderr}"
    elif "--cache-prune" in args:
        result = run_build_image(example, workdir, "--cache-dir", str(workdir / "cache"))
        assert result.returncode == 0, f"{example}\n{result.stderr}"
        assert "freed" in result.stdout, f"{example}\n{result.stdout}"
    elif "--board" in args or "--config" in args:
        # A build, a dry run or a fetch: its dry run against the index snapshot, which finds
        # the board's image (or says what the index has instead).
        if not SNAPSHOT.exists():
            pytest.skip(f"Armbian index snapshot not found at {SNAPSHOT} (shared/ beside the "
                        f"repo)")
        dry = Example(example.document, example.line, example.text, example.tool,
                      tuple(a for a in args if a not in ("--fetch-only", "--dry-run")))
        result = run_build_image(dry, workdir, "--dry-run", "--armbian-index", str(SNAPSHOT),
                                 "--cache-dir", str(workdir / "cache"),
                                 "--set", "download.retries=0")
        assert result.returncode == 0, f"{example}\n{result.stderr}"
        assert "Plan (dry run" in result.stdout, f"{example}\n{result.stdout}"
        board = args[args.index("--board") + 1] if "--board" in args else \
            yaml.safe_load(site_yaml())["board"]
        board = {"orangepi": "orangepi5"}.get(board, board)
        assert f"board       {board}:" in result.stdout, f"{example}\n{result.stdout}"
    else:
        pytest.fail(f"{example}\n  not run and not in PARSE_ONLY_BUILDS: say how to check it")


@pytest.mark.parametrize("example", params([e for e in EXAMPLES
                                            if e.tool in PARSE_ONLY_COMMANDS]))
def test_example_parses_with_its_commands_parser(example: Example) -> None:
    """Parse-only: see PARSE_ONLY_COMMANDS for why each tool is not run here."""
    args = parse(example)
    if example.tool in ("try-image", "flash-image") and not str(args.image).isupper():
        # A named image is one a build writes: out/<product>-<board>-<release>-<date>.img.xz
        assert re.fullmatch(r"out/[^/]+\.img\.xz", str(args.image)), \
            f"{example}\n  builds write out/NAME.img.xz, not {args.image}"


@pytest.mark.parametrize("example", params(of("setup-host")))
def test_setup_host_example_has_only_options_it_knows(example: Example) -> None:
    # --list parses every option, then prints the packages and does nothing.
    result = subprocess.run([str(REPO / "ci" / "setup-host"), "--list", *example.args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{example}\n{result.stderr}"
    assert "qemu-user-static" in result.stdout.split(), example


@pytest.mark.parametrize(("document", "line", "text"), PRESEEDS,
                         ids=[f"{d.relative_to(REPO)}:{n}" for d, n, _ in PRESEEDS])
def test_preseed_example_passes_the_cards_checks(document: Path, line: int, text: str) -> None:
    _, problems = parse_preseed(text, Path("/"), Settings())
    assert problems == [], f"{document.relative_to(REPO)}:{line}: {problems}"


@pytest.mark.parametrize(("document", "line", "text"), PRESEEDS,
                         ids=[f"{d.relative_to(REPO)}:{n}" for d, n, _ in PRESEEDS])
def test_preseed_example_passes_check_preseed(document: Path, line: int, text: str,
                                              tmp_path: Path) -> None:
    good = tmp_path / "firstboot.conf"
    good.write_text(text, encoding="utf-8")
    argv = [sys.executable, "-m", "builder", "--check-preseed", good.name]
    result = subprocess.run(argv, cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("firstboot.conf: ok ("), \
        f"{document.relative_to(REPO)}:{line}: {result.stdout}{result.stderr}"
    # And the check can fail: the example with its ssh_key cut short, as the README's once was.
    bad = re.sub(r"(?m)^ssh_key = (\S+) \S+", r"ssh_key = \1 AAAAC3Nz...", text)
    assert bad != text
    good.write_text(bad, encoding="utf-8")
    result = subprocess.run(argv, cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "ssh_key" in result.stderr, result


@pytest.mark.parametrize(("old", "new"), [
    ("sudo build-image --board orangepi5 --branch vendor",
     "sudo build-image --board orangepi5 --release noble --branch vendor"),
    ("try-image out/orangepi-jupyter-orangepipcplus-trixie-20261126.img.xz",
     "try-image out/orangepi-jupyter-orangepipcplus-trixie-20261126.img.zst"),
    ("sudo build-image --board orangepipcplus --customize",
     "sudo build-image --board orangepipcplus --customise"),
])
def test_a_broken_example_fails_with_its_document_and_line(old: str, new: str,
                                                           tmp_path: Path) -> None:
    """The checks above fail on what the issue found wrong: a release the index does not
    have, an image name no build writes, a misspelt option."""
    source = next(d for d in DOCUMENTS if old in d.read_text(encoding="utf-8"))
    broken = tmp_path / source.name
    broken.write_text(source.read_text(encoding="utf-8").replace(old, new, 1), encoding="utf-8")
    example = next(e for e in examples_in(broken) if e.text.startswith(new))
    example = Example(source, example.line, example.text, example.tool, example.args)
    (tmp_path / "firstboot.conf").write_text(PRESEEDS[0][2], encoding="utf-8")
    (tmp_path / "site.yaml").write_text(site_yaml(), encoding="utf-8")
    check = (test_example_parses_with_its_commands_parser if example.tool == "try-image"
             else lambda e: test_build_image_example_works(e, tmp_path))
    if example.tool == "build-image" and not SNAPSHOT.exists() and "noble" in new:
        pytest.skip(f"Armbian index snapshot not found at {SNAPSHOT}")
    with pytest.raises(AssertionError, match=re.escape(f"{source.relative_to(REPO)}:")):
        check(example)


def test_every_parse_only_pattern_still_matches_an_example() -> None:
    for pattern in PARSE_ONLY_BUILDS:
        assert any(pattern in " ".join(e.args) for e in of("build-image")), \
            f"PARSE_ONLY_BUILDS[{pattern!r}] matches no example any more: remove it"


def test_no_example_calls_a_tool_through_the_venv_but_where_the_docs_say_so() -> None:
    """One way to call the tools: `sudo build-image`, found in /usr/local/bin (getting-started
    says once that .venv/bin/build-image is the same program)."""
    allowed = {"getting-started.md", "troubleshooting.md"}
    found = [str(e) for e in EXAMPLES
             if ".venv/bin/" in e.text.split(e.tool)[0] and e.document.name not in allowed]
    assert found == []
