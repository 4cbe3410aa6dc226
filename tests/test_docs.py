"""The manual against the code it describes: its generated blocks (the settings reference from
builder/defaults.yaml, the board table from the catalog) must be what builder/manual.py makes
now, its links must lead somewhere, and README stays a front page that shows the test command
CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_env, run_cli

from builder import cli, config, manual

README = REPO / "README.md"
DOCS = REPO / "docs"
DOCUMENTS = [README, *sorted(DOCS.glob("*.md"))]
DEFAULTS_TEXT = manual.DEFAULTS.read_text(encoding="utf-8")


def made() -> dict[str, str]:
    return {name: make() for name, make in manual.GENERATORS.items()}


def block(text: str, name: str) -> str:
    found = [text[start:end] for n, start, end in manual.blocks(text) if n == name]
    assert len(found) == 1, f"want one generated block {name!r}, found {len(found)}"
    return found[0]


def test_generated_blocks_are_what_the_generator_makes() -> None:
    assert manual.stale(DOCS, made()) == [], (
        "docs/ is out of step with the code: run .venv/bin/python -m builder.manual --write")


def test_each_generated_block_is_in_the_manual_once() -> None:
    names = [name for path in DOCS.glob("*.md")
             for name, _, _ in manual.blocks(path.read_text(encoding="utf-8"))]
    assert sorted(names) == sorted(manual.GENERATORS)


def test_board_table_is_what_list_boards_markdown_prints() -> None:
    result = run_cli("--list-boards", "--markdown")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == manual.boards_markdown()
    boards = (DOCS / "boards.md").read_text(encoding="utf-8")
    assert block(boards, "boards") == f"\n{result.stdout.rstrip()}\n"


def test_settings_reference_has_every_key_with_its_default() -> None:
    reference = block((DOCS / "configuration.md").read_text(encoding="utf-8"), "settings")
    rows = {m[1]: m[2] for m in re.finditer(r"^\| `([a-z0-9_.]+)` \| (.*?) \| ", reference,
                                           re.M)}
    flat = config.leaves(yaml.safe_load(DEFAULTS_TEXT))
    assert list(rows) == list(flat)
    assert rows["jupyter.port"] == "`8888`"
    assert rows["apt.proxy"] == "none"
    assert rows["packages.apt_recommends"] == "`false`"
    assert rows["packages.pip"] == "`jupyterlab`, `notebook>=7,<8`, `ipykernel`, `ipywidgets`"


def stale_after(old: str, new: str) -> list[str]:
    """Which generated blocks of docs/ a defaults.yaml with `old` replaced by `new` makes
    stale."""
    assert DEFAULTS_TEXT.count(old) == 1, old
    changed = {**made(), "settings": manual.settings_markdown(DEFAULTS_TEXT.replace(old, new))}
    return [line.rpartition(": ")[2] for line in manual.stale(DOCS, changed)]


@pytest.mark.parametrize(("old", "new"), [
    # A default that changed.
    ("  port: 8888\n", "  port: 9999\n"),
    ("  release: trixie\n", "  release: forky\n"),
    ("  apt_recommends: false\n", "  apt_recommends: true\n"),
    # One item of a list default.
    ("    - notebook>=7,<8\n", ""),
    # A key renamed, and one added with what it is for.
    ("  free_space: 256MiB\n", "  free_spac: 256MiB\n"),
    ("  proxy: null\n", "  proxy: null\n  # Where apt's cache lives.\n  cache: null\n"),
    # What a key is for: its comment, and one after its value.
    ("  # The port Jupyter listens on.\n", "  # The port Jupyter serves on.\n"),
    ("# seconds without data before", "# seconds of silence before"),
])
def test_check_finds_a_change_of_defaults_yaml(old: str, new: str) -> None:
    assert stale_after(old, new) == ["settings"]


@pytest.mark.parametrize(("old", "new", "found"), [
    # A key without a comment saying what it is for.
    ("  # The port Jupyter listens on.\n", "", "no comment above jupyter.port"),
    # A blank line cuts a key off its comment.
    ("  # The port Jupyter listens on.\n  port:", "  # The port Jupyter listens on.\n\n  port:",
     "no comment above jupyter.port"),
    ("  proxy: null\n", "  proxy: null\n  cache: null\n", "no comment above apt.cache"),
])
def test_every_setting_must_say_what_it_is_for(old: str, new: str, found: str) -> None:
    with pytest.raises(ValueError, match=found):
        manual.settings_markdown(DEFAULTS_TEXT.replace(old, new))


def test_key_comments_reads_nesting_lists_and_comments_after_values() -> None:
    text = ("# the file's header\n\n"
            "# above a\na: 1\n"
            "s:\n  # above s.b,\n  # two lines\n  b:\n    - x\n    # inside the list\n    - y\n"
            "  c: 2   # after c's value\n  d: 3\n"
            "t:\n  # above t.b\n  b: '#not a comment'\n")
    assert manual.key_comments(text) == {
        "a": "above a", "s": "", "s.b": "above s.b, two lines", "s.c": "after c's value",
        "s.d": "", "t": "", "t.b": "above t.b"}


def test_cells_escape_pipes_and_angle_brackets_outside_code() -> None:
    assert manual.cell("xz | zstd, <name>, `a|b <c>`") == r"xz \| zstd, \<name>, `a\|b <c>`"


@pytest.mark.parametrize(("text", "found"), [
    ("<!-- generated: settings -->\nno end\n", "has no <!-- /generated -->"),
    ("<!-- generated: settings -->\n<!-- generated: boards -->\n<!-- /generated -->\n",
     "settings --> has no"),
    ("text\n<!-- /generated -->\n", "without a <!-- generated"),
    ("<!-- generated: nosuch -->\n<!-- /generated -->\n", "no such block"),
])
def test_markers_must_pair_and_name_a_block(text: str, found: str) -> None:
    with pytest.raises(ValueError, match=found):
        manual.refreshed(text, made())


def run_manual(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder.manual", *args], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=120)


def test_check_names_each_stale_block_and_write_mends_it(tmp_path: Path) -> None:
    for path in DOCS.glob("*.md"):
        (tmp_path / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    assert run_manual("--check", "--docs", str(tmp_path)).returncode == 0
    configuration = tmp_path / "configuration.md"
    text = configuration.read_text(encoding="utf-8")
    configuration.write_text(text.replace("| `jupyter.port` | `8888` |",
                                          "| `jupyter.port` | `9999` |"), encoding="utf-8")
    boards = tmp_path / "boards.md"
    boards.write_text(boards.read_text(encoding="utf-8").replace("| `orangepi5` |", "| x |"),
                      encoding="utf-8")
    result = run_manual("--check", "--docs", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{boards}: boards: out of date (python -m builder.manual --write)",
        f"{configuration}: settings: out of date (python -m builder.manual --write)"]
    result = run_manual("--write", "--docs", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert configuration.read_text(encoding="utf-8") == text
    assert run_manual("--check", "--docs", str(tmp_path)).returncode == 0


def test_readme_shows_the_test_command_ci_runs() -> None:
    """.ci/run runs README's test command; README must show that very line."""
    run = (REPO / ".ci" / "run").read_text().splitlines()
    command = run[run.index("# README test command:") + 1]
    assert command == "sudo ./ci/setup-host --dev && sudo .venv/bin/pytest"
    assert f"\n    {command}\n" in README.read_text(encoding="utf-8")


def test_readme_shows_the_build_command() -> None:
    assert "\n    sudo ./ci/setup-host && sudo build-image --board orangepi\n" in \
        README.read_text(encoding="utf-8")


def test_readme_is_a_front_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines: move detail into docs/"


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        name, n = slug(heading), 1
        while name in found:
            name, n = f"{slug(heading)}-{n}", n + 1
        found.add(name)
    return found


def test_slug_is_githubs() -> None:
    assert slug("Building: ci/setup-host") == "building-cisetup-host"
    assert slug("try-image --smoke") == "try-image---smoke"


def test_every_link_leads_to_a_file_and_heading_that_exist() -> None:
    broken = []
    for document in DOCUMENTS:
        text = re.sub(r"(?ms)^```.*?^```", "", document.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (document.parent / file).resolve() if file else document
            if not path.exists():
                broken.append(f"{document.relative_to(REPO)}: {target}: no such file")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{document.relative_to(REPO)}: {target}: no such heading")
    assert broken == []


def test_the_contents_list_every_chapter() -> None:
    contents = (DOCS / "README.md").read_text(encoding="utf-8")
    chapters = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert set(re.findall(r"\]\(([a-z-]+\.md)\)", contents)) == chapters
    readme = README.read_text(encoding="utf-8")
    assert set(re.findall(r"\]\(docs/([a-z-]+\.md)\)", readme)) >= chapters


def test_each_settings_flag_is_named_in_its_keys_meaning() -> None:
    """configuration.md says the flags that set a key are named in its row."""
    found, _ = manual.settings(DEFAULTS_TEXT)
    meaning = {setting.key: setting.meaning for setting in found}
    missing = [f"{key}: --{attr.replace('_', '-')}"
               for attr, key in {**cli.FLAG_KEYS, **cli.LIST_FLAGS}.items()
               if f"--{attr.replace('_', '-')}" not in meaning[key]]
    assert missing == [], "say in defaults.yaml's comment which flag sets each of these"
