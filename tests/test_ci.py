"""ci/: the GitHub workflow, the container, and the small scripts they call."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO

from builder import cli, tryimage
from builder.boards import load_catalog
from builder.cache import APP, Cache
from builder.errors import BuildError
from builder.output import COMPRESSORS, SBOM_SUFFIX, Outputs
from builder.qemu import machine_for

WORKFLOW = REPO / "ci" / "github" / "build-image.yml"
IN_CONTAINER = REPO / "ci" / "in-container"
EMULABLE = REPO / "ci" / "emulable"
DOCKERFILE = REPO / "ci" / "Dockerfile"
SHELL_SCRIPTS = ("ci/emulable", "ci/in-container", "ci/register-binfmt", "ci/setup-host")
ENABLE = "mkdir -p .github/workflows && cp ci/github/build-image.yml .github/workflows/"
TOOLS = {"build-image": cli.parser, "try-image": tryimage.parser}


# The workflow, read as GitHub reads it.


@pytest.fixture(scope="module")
def workflow() -> dict[Any, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(data, dict)
    return data


def triggers(workflow: dict[Any, Any]) -> dict[str, Any]:
    # YAML 1.1 (PyYAML) reads the key `on` as the boolean true; GitHub reads it as "on".
    result = workflow.get("on", workflow.get(True))
    assert isinstance(result, dict), "the workflow has no `on:` triggers"
    return result


def all_steps(workflow: dict[Any, Any]) -> Iterator[dict[str, Any]]:
    for job in workflow["jobs"].values():
        yield from job.get("steps", [])


def step_running(steps: list[dict[str, Any]], text: str) -> tuple[int, dict[str, Any]]:
    found = [(i, s) for i, s in enumerate(steps) if text in s.get("run", "")]
    assert len(found) == 1, f"want exactly one step running {text!r}, found {len(found)}"
    return found[0]


def step_using(steps: list[dict[str, Any]], action: str) -> list[tuple[int, dict[str, Any]]]:
    return [(i, s) for i, s in enumerate(steps) if s.get("uses", "").split("@")[0] == action]


def invocations(script: str, tool: str) -> list[list[str]]:
    """The arguments of each call of `tool` in a run: script, up to a shell operator."""
    calls = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
        for i, token in enumerate(tokens):
            if Path(token).name == tool:
                args = []
                for arg in tokens[i + 1:]:
                    if arg and set(arg) <= set("&|;<>()"):
                        break
                    args.append(arg)
                calls.append(args)
    return calls


def tool_calls(workflow: dict[Any, Any], tool: str) -> list[list[str]]:
    return [args for step in all_steps(workflow) for args in invocations(step.get("run", ""),
                                                                         tool)]


def test_workflow_says_how_to_enable_it_at_the_top() -> None:
    header = WORKFLOW.read_text().split("\nname:", 1)[0]
    assert f"# To enable: {ENABLE}" in header.splitlines()


def test_triggers_are_a_dispatch_with_boards_and_smoke_and_version_tags(
        workflow: dict[Any, Any]) -> None:
    on = triggers(workflow)
    assert set(on) == {"workflow_dispatch", "push"}
    inputs = on["workflow_dispatch"]["inputs"]
    assert inputs["boards"]["type"] == "string"
    assert inputs["smoke"] == {**inputs["smoke"], "type": "boolean", "default": True}
    assert on["push"] == {"tags": ["v*"]}


def test_default_boards_are_one_list_of_real_boards_that_qemu_boots(
        workflow: dict[Any, Any]) -> None:
    default = triggers(workflow)["workflow_dispatch"]["inputs"]["boards"]["default"]
    # A tag push has no inputs: the workflow falls back to DEFAULT_BOARDS, which must agree.
    assert workflow["env"]["DEFAULT_BOARDS"] == default
    catalog = load_catalog()
    for name in default.split():
        board, alias = catalog.lookup(name)
        assert alias is None, f"{name}: use the board id, it names the artifacts"
        # The defaults are what releases are made of: each must get its smoke boot.
        machine_for(board, None)


def matrix_step(workflow: dict[Any, Any]) -> dict[str, Any]:
    job = workflow["jobs"]["boards"]
    [step] = [s for s in job["steps"] if s.get("id") == "matrix"]
    return step


def run_matrix_step(workflow: dict[Any, Any], boards: str, tmp_path: Path
                    ) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    script = tmp_path / "step.sh"
    script.write_text(matrix_step(workflow)["run"])
    output = tmp_path / "github-output"
    output.write_text("")
    # GitHub runs a `run:` step with `bash -e {0}`.
    result = subprocess.run(["bash", "-e", str(script)], capture_output=True, text=True,
                            env={**os.environ, "BOARDS": boards, "SMOKE": "true",
                                 "GITHUB_OUTPUT": str(output)})
    values = dict(line.split("=", 1) for line in output.read_text().splitlines())
    return result, values


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed (the runner has it)")
def test_matrix_step_turns_boards_with_extra_spaces_into_a_json_list(
        workflow: dict[Any, Any], tmp_path: Path) -> None:
    result, values = run_matrix_step(workflow, "  orangepi5 \t orangepipcplus\n orangepi5 ",
                                     tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(values["boards"]) == ["orangepi5", "orangepipcplus"]
    assert values["smoke"] == "true"


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed (the runner has it)")
@pytest.mark.parametrize("boards", ["   ", "orangepi5;reboot", "OrangePi5"])
def test_matrix_step_refuses_no_boards_and_odd_names(workflow: dict[Any, Any], tmp_path: Path,
                                                     boards: str) -> None:
    result, values = run_matrix_step(workflow, boards, tmp_path)
    assert result.returncode != 0
    assert "::error::" in result.stdout
    assert "boards" not in values


def test_the_input_reaches_the_matrix_step_only_through_its_environment(
        workflow: dict[Any, Any]) -> None:
    step = matrix_step(workflow)
    assert "${{" not in step["run"]
    assert "inputs.boards" in step["env"]["BOARDS"]
    assert "env.DEFAULT_BOARDS" in step["env"]["BOARDS"]


def test_build_job_runs_one_leg_per_board_and_does_not_stop_the_others(
        workflow: dict[Any, Any]) -> None:
    jobs = workflow["jobs"]
    build = jobs["build"]
    assert build["needs"] == "boards"
    strategy = build["strategy"]
    assert strategy["fail-fast"] is False
    assert strategy["matrix"] == {"board": "${{ fromJSON(needs.boards.outputs.matrix) }}"}
    assert jobs["boards"]["outputs"]["matrix"] == "${{ steps.matrix.outputs.boards }}"
    assert build["runs-on"] == "ubuntu-24.04"
    assert build["env"]["BOARD"] == "${{ matrix.board }}"


def test_build_job_steps_come_in_order(workflow: dict[Any, Any]) -> None:
    steps = workflow["jobs"]["build"]["steps"]
    [(checkout, _)] = step_using(steps, "actions/checkout")
    free, step = step_running(steps, "/usr/share/dotnet")
    assert step["run"].startswith("sudo rm -rf ")
    for path in ("/usr/share/dotnet", "/usr/local/lib/android", "/opt/ghc"):
        assert f" {path} " in step["run"]
    setup, step = step_running(steps, "ci/setup-host")
    assert step["run"].strip() == "sudo ./ci/setup-host"
    [(cache, _)] = step_using(steps, "actions/cache")
    build, step = step_running(steps, "build-image")
    assert step["run"].startswith("sudo .venv/bin/build-image ")
    uploads = [i for i, _ in step_using(steps, "actions/upload-artifact")]
    smoke, _ = step_running(steps, "try-image")
    assert checkout < free < setup < build
    assert cache < build < uploads[0] < smoke < uploads[1]


def test_build_caches_only_the_downloads_of_the_cache_dir_it_passes(
        workflow: dict[Any, Any]) -> None:
    build = workflow["jobs"]["build"]
    [(_, step)] = step_using(build["steps"], "actions/cache")
    [args] = tool_calls(workflow, "build-image")
    parsed = cli.parser().parse_args(args)
    assert parsed.board == "$BOARD"
    assert parsed.output
    assert parsed.cache_dir == "$CACHE_DIR"
    downloads = Cache(Path("/cache")).downloads.relative_to("/cache")
    assert step["with"]["path"] == f"${{{{ env.CACHE_DIR }}}}/{downloads}"
    assert build["env"]["CACHE_DIR"].startswith("${{ github.workspace }}/")
    key, restore = step["with"]["key"], step["with"]["restore-keys"]
    assert "${{ matrix.board }}" in restore
    assert key.startswith(restore) and key != restore


@pytest.mark.parametrize("compression", COMPRESSORS)
def test_image_artifact_holds_the_image_its_sha256_bmap_and_manifest(
        workflow: dict[Any, Any], compression: str) -> None:
    steps = workflow["jobs"]["build"]["steps"]
    [(_, step)] = [(i, s) for i, s in step_using(steps, "actions/upload-artifact")
                   if s["with"]["name"].startswith("image-")]
    assert step["uses"] == "actions/upload-artifact@v4"
    assert "${{ matrix.board }}" in step["with"]["name"]
    assert step["with"]["if-no-files-found"] == "error"
    patterns = step["with"]["path"].split()
    out = Outputs(Path("out"), "orangepi-jupyter-orangepi5-trixie-20261126", compression)
    wanted = [out.final(s) for s in (out.image_suffix, out.image_suffix + ".sha256",
                                     ".img.bmap", ".manifest.json", SBOM_SUFFIX)]
    for path in wanted:
        assert any(fnmatch.fnmatch(str(path), p) for p in patterns), f"{path} not uploaded"
    assert not any(fnmatch.fnmatch(str(out.final(".build.log")), p) for p in patterns)


def test_smoke_boots_emulable_boards_without_a_browser_and_keeps_its_report(
        workflow: dict[Any, Any]) -> None:
    steps = workflow["jobs"]["build"]["steps"]
    [(_, emulable)] = [(i, s) for i, s in enumerate(steps) if s.get("id") == "emulable"]
    assert "./ci/emulable \"$BOARD\"" in emulable["run"]
    assert "needs.boards.outputs.smoke" in emulable["if"]
    _, smoke = step_running(steps, "try-image")
    assert smoke["id"] == "smoke"
    assert smoke["if"] == "steps.emulable.outputs.machine != ''"
    [args] = tool_calls(workflow, "try-image")
    parsed = tryimage.parser().parse_args(args)
    assert parsed.smoke and parsed.no_browser
    [(_, report)] = [(i, s) for i, s in step_using(steps, "actions/upload-artifact")
                     if s["with"]["name"].startswith("try-image-report-")]
    assert "always()" in report["if"]
    assert Path(report["with"]["path"]) == parsed.report


def test_release_job_attaches_every_image_on_a_tag_and_alone_may_write(
        workflow: dict[Any, Any]) -> None:
    jobs = workflow["jobs"]
    release = jobs["release"]
    assert release["needs"] == "build"
    assert "refs/tags/v" in release["if"]
    assert release["permissions"] == {"contents": "write"}
    assert workflow["permissions"] == {"contents": "read"}
    for name, job in jobs.items():
        if name != "release":
            assert "permissions" not in job, f"job {name} asks for permissions"
    [(download_at, download)] = step_using(release["steps"], "actions/download-artifact")
    [(publish_at, publish)] = step_using(release["steps"], "softprops/action-gh-release")
    assert download_at < publish_at
    assert publish["uses"] == "softprops/action-gh-release@v2"
    pattern = download["with"]["pattern"]
    assert fnmatch.fnmatch("image-orangepi5", pattern)
    assert not fnmatch.fnmatch("try-image-report-orangepi5", pattern)
    assert download["with"]["merge-multiple"] is True
    assert publish["with"]["files"] == f"{download['with']['path']}/*"


def test_every_action_is_pinned_to_a_major_version(workflow: dict[Any, Any]) -> None:
    used = [s["uses"] for s in all_steps(workflow) if "uses" in s]
    assert used
    for action in used:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", action), action


def test_local_scripts_the_workflow_runs_exist_and_are_executable(
        workflow: dict[Any, Any]) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    text = "\n".join(s.get("run", "") for s in all_steps(workflow))
    local = set(re.findall(r"(?<![\w./-])(?:\./)?(ci/[\w./-]+)", text))
    venv = set(re.findall(r"\.venv/bin/([\w.-]+)", text))
    assert {"ci/setup-host", "ci/emulable"} <= local
    assert {"build-image", "try-image"} <= venv
    for path in local:
        assert (REPO / path).is_file(), f"{path} does not exist"
        assert os.access(REPO / path, os.X_OK), f"{path} is not executable"
    for tool in venv:
        assert tool in scripts, f".venv/bin/{tool} is not a console script of pyproject.toml"


@pytest.mark.parametrize("tool", TOOLS)
def test_every_flag_the_workflow_passes_is_one_the_tool_has(workflow: dict[Any, Any],
                                                            tool: str) -> None:
    calls = tool_calls(workflow, tool)
    assert calls, f"the workflow never runs {tool}"
    parser = TOOLS[tool]()
    # Exact names: argparse would also take a prefix (--cache for --cache-dir).
    known = {option for action in parser._actions for option in action.option_strings}
    for args in calls:
        for arg in args:
            if arg.startswith("-"):
                assert arg.split("=", 1)[0] in known, f"{tool} has no {arg}"
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{tool} {shlex.join(args)}: argparse refuses it")


# ci/emulable, run for real.


def emulable(board: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EMULABLE), board], capture_output=True, text=True)


@pytest.mark.parametrize(("board", "machine"), [("orangepipcplus", "orangepi-pc"),
                                                ("orangepizeroplus2-h5", "virt"),
                                                ("orangepi", "virt")])
def test_emulable_prints_the_machine_of_a_board_qemu_boots(board: str, machine: str) -> None:
    result = emulable(board)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{machine}\n"
    assert machine_for(load_catalog().lookup(board)[0], None).name == machine


def test_emulable_refuses_a_board_qemu_cannot_boot_and_says_why() -> None:
    refused = []
    for board in load_catalog().boards:
        try:
            machine_for(board, None)
        except BuildError:
            refused.append(board.id)
    assert refused, "every board is emulable now: pick another refusal test"
    result = emulable(refused[0])
    assert result.returncode == 1
    assert result.stdout == ""
    assert refused[0] in result.stderr and "test it on the board" in result.stderr


@pytest.mark.parametrize("args", [["no-such-board"], [], ["--help"], ["orangepi5", "x"]])
def test_emulable_tells_a_wrong_name_or_call_from_a_refusal(args: list[str]) -> None:
    result = subprocess.run([str(EMULABLE), *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip()


# The shell scripts.


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_script_parses_and_is_executable(script: str) -> None:
    path = REPO / script
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert os.access(path, os.X_OK)
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_setup_host_refuses_an_unknown_option_before_doing_anything() -> None:
    result = subprocess.run([str(REPO / "ci" / "setup-host"), "--nope"], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "usage: ci/setup-host [--dev] [--no-binfmt]" in result.stderr


@pytest.mark.root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is missing")
def test_register_binfmt_works_where_binfmt_misc_is_not_mounted() -> None:
    # A fresh /proc, as a container has: binfmt_misc is not mounted there.
    script = ("test ! -e /proc/sys/fs/binfmt_misc/status && ci/register-binfmt && "
              "cat /proc/sys/fs/binfmt_misc/qemu-aarch64 /proc/sys/fs/binfmt_misc/qemu-arm")
    result = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "bash",
                             "-c", script], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    entries = result.stdout.split("enabled\n")
    assert len(entries) == 3
    assert all("flags:" in e and "F" in e.split("flags:")[1].split()[0] for e in entries[1:])


def docker_run_line() -> str:
    lines = [line for line in IN_CONTAINER.read_text().splitlines()
             if line.startswith("docker run ")]
    assert len(lines) == 1, "ci/in-container must run the container with exactly one line"
    return lines[0]


def test_docker_run_line_has_what_a_build_needs() -> None:
    line = docker_run_line()
    args = shlex.split(line)
    assert args[:2] == ["docker", "run"]
    assert "--privileged" in args
    mounts = [args[i + 1] for i, a in enumerate(args) if a == "-v"]
    assert "/dev:/dev" in mounts
    # The cache in a named volume, where build-image looks by default (root's home).
    assert f"orangepi-jupyter-cache:/root/.cache/{APP}" in mounts
    assert "$PWD:$PWD" in mounts
    assert args[args.index("-w") + 1] == "$PWD"
    assert args[-2:] == ["orangepi-jupyter-builder", "$@"]
    assert 'image=orangepi-jupyter-builder\n' in IN_CONTAINER.read_text()


def test_in_container_help_shows_the_docker_run_line() -> None:
    line = docker_run_line()
    assert f"#   {line}\n" in IN_CONTAINER.read_text()
    result = subprocess.run([str(IN_CONTAINER), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert f"\n  {line}\n" in result.stdout
    assert "set -euo pipefail" not in result.stdout
    bare = subprocess.run([str(IN_CONTAINER)], capture_output=True, text=True)
    assert bare.returncode == 2
    assert line in bare.stdout


def test_manual_shows_the_docker_run_line() -> None:
    line = docker_run_line()
    building = REPO / "docs" / "building.md"
    assert f"\n    {line}\n" in building.read_text(), f"docs/building.md does not show: {line}"


FAKE_DOCKER = """#!/bin/sh
printf '%s\\n' "$@" > "$DOCKER_LOG.$1"
case "$1" in
    info) [ -n "$DOCKER_ARCH" ] || exit 1; echo "$DOCKER_ARCH" ;;
    run) exit 3 ;;
esac
"""


def run_in_container(tmp_path: Path, *args: str, arch: str = "x86_64",
                     with_docker: bool = True) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("dirname", "sed", "cut"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    if with_docker:
        (bin_dir / "docker").write_text(FAKE_DOCKER)
        (bin_dir / "docker").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    bash = shutil.which("bash")
    assert bash is not None
    return subprocess.run([bash, str(IN_CONTAINER), *args], cwd=work, capture_output=True,
                          text=True, env={"PATH": str(bin_dir), "DOCKER_ARCH": arch,
                                          "DOCKER_LOG": str(tmp_path / "docker")})


def test_in_container_builds_the_image_and_runs_the_line_with_the_arguments(
        tmp_path: Path) -> None:
    result = run_in_container(tmp_path, "--board", "orangepi", "--preseed", "my setup.conf")
    # The fake docker run exits 3: build-image's status is the script's.
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    work = str(tmp_path / "work")
    build = (tmp_path / "docker.build").read_text().splitlines()
    assert build == ["build", "--tag", "orangepi-jupyter-builder", "--file",
                     str(REPO / "ci" / "Dockerfile"), f"{REPO}/ci/.."]
    run = (tmp_path / "docker.run").read_text().splitlines()
    expected = [a.replace("$PWD", work) for a in shlex.split(docker_run_line())[1:-1]]
    assert run == [*expected, "--board", "orangepi", "--preseed", "my setup.conf"]
    assert "warning" not in result.stderr


def test_in_container_warns_on_a_docker_that_is_not_x86_64(tmp_path: Path) -> None:
    result = run_in_container(tmp_path, "--board", "orangepi", arch="aarch64")
    assert result.returncode == 3
    assert "warning: Docker runs aarch64 containers here" in result.stderr


def test_in_container_says_what_to_do_without_docker(tmp_path: Path) -> None:
    result = run_in_container(tmp_path, "--board", "orangepi", with_docker=False)
    assert result.returncode == 1
    assert "docker not found: install Docker Desktop" in result.stderr
    assert not (tmp_path / "docker.run").exists()


def test_in_container_says_what_to_do_when_docker_does_not_answer(tmp_path: Path) -> None:
    result = run_in_container(tmp_path, "--board", "orangepi", arch="")
    assert result.returncode == 1
    assert "Docker does not answer (docker info failed): start Docker Desktop" in result.stderr
    assert not (tmp_path / "docker.build").exists()


# The container image.


def test_dockerfile_sets_up_the_host_and_runs_build_image_after_binfmt() -> None:
    text = DOCKERFILE.read_text()
    instructions = [line for line in text.replace("\\\n", " ").splitlines()
                    if line and not line.startswith("#")]
    assert re.fullmatch(r"FROM debian:(bookworm|trixie)", instructions[0])
    workdir = next(line.split()[1] for line in instructions if line.startswith("WORKDIR "))
    assert any(line.startswith("RUN ") and "./ci/setup-host --no-binfmt" in line
               for line in instructions)
    [entrypoint] = [json.loads(line.removeprefix("ENTRYPOINT "))
                    for line in instructions if line.startswith("ENTRYPOINT ")]
    command = entrypoint[2]
    register, build = command.split(" && exec ")
    assert register == f"{workdir}/ci/register-binfmt"
    assert os.access(REPO / "ci" / "register-binfmt", os.X_OK)
    assert build == f'{workdir}/.venv/bin/build-image "$@"'
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "build-image" in scripts
    ignored = (REPO / "ci" / "Dockerfile.dockerignore").read_text().splitlines()
    assert {".venv", "out", ".git"} <= set(ignored)


def docker_engine() -> str | None:
    """Why the Docker tests cannot run here, or None when an engine answers."""
    if shutil.which("docker") is None:
        return "docker is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        return "no Docker engine answers (docker info failed): start the daemon to run this"
    return None


@pytest.mark.slow
def test_dockerfile_builds_and_in_container_runs_build_image() -> None:
    reason = docker_engine()
    if reason:
        pytest.skip(reason)
    result = subprocess.run([str(IN_CONTAINER), "--list-boards"], cwd=REPO,
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "orangepi5" in result.stdout
    assert "alias: orangepi = orangepi5" in result.stdout


# ci/link-commands: `sudo build-image` from anywhere, as the manual writes the commands.

LINK_COMMANDS = REPO / "ci" / "link-commands"
COMMANDS = ("build-image", "try-image", "flash-image")


def test_the_commands_are_linked_where_sudo_finds_them_and_others_files_are_kept(
        tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    done = subprocess.run([str(LINK_COMMANDS), str(bin_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in COMMANDS:
        assert os.readlink(bin_dir / name) == str(REPO / ".venv" / "bin" / name)
        # `man build-image` finds the page: share/man/man1 beside the bin directory.
        page = tmp_path / "share" / "man" / "man1" / f"{name}.1"
        assert os.readlink(page) == str(REPO / "docs" / "man" / f"{name}.1")
        assert "\n.TH " in page.read_text()
    # An older clone's link is moved here; a file or a link of someone else's is kept.
    (bin_dir / "build-image").unlink()
    (bin_dir / "build-image").symlink_to("/srv/old-clone/.venv/bin/build-image")
    (bin_dir / "try-image").unlink()
    (bin_dir / "try-image").write_text("#!/bin/sh\necho mine\n")
    (bin_dir / "flash-image").unlink()
    (bin_dir / "flash-image").symlink_to("/opt/vendor/flash-image")
    again = subprocess.run([str(LINK_COMMANDS), str(bin_dir)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert os.readlink(bin_dir / "build-image") == str(REPO / ".venv" / "bin" / "build-image")
    assert "pointed at /srv/old-clone/.venv/bin/build-image" in again.stdout
    assert (bin_dir / "try-image").read_text() == "#!/bin/sh\necho mine\n"
    assert os.readlink(bin_dir / "flash-image") == "/opt/vendor/flash-image"
    assert f"{bin_dir}/try-image exists and is not a link: left as it is" in again.stderr
    assert f"{bin_dir}/flash-image links to /opt/vendor/flash-image" in again.stderr
    # A third run changes nothing and says nothing about what is already right.
    third = subprocess.run([str(LINK_COMMANDS), str(bin_dir)], capture_output=True, text=True)
    assert third.returncode == 0 and third.stdout == ""
    # Pages of an older clone are moved here too.
    page = tmp_path / "share" / "man" / "man1" / "flash-image.1"
    page.unlink()
    page.symlink_to("/srv/old-clone/docs/man/flash-image.1")
    fourth = subprocess.run([str(LINK_COMMANDS), str(bin_dir)], capture_output=True, text=True)
    assert fourth.returncode == 0 and os.readlink(page) == str(REPO / "docs/man/flash-image.1")


def test_setup_host_links_the_commands_unless_told_not_to() -> None:
    text = (REPO / "ci" / "setup-host").read_text()
    assert "./ci/link-commands" in text and "--no-links) links=0" in text
    # This machine was set up by ci/setup-host (as .ci/run does): sudo finds the checkout's
    # build-image by its bare name.
    linked = Path("/usr/local/bin/build-image")
    if not linked.is_symlink() or Path(os.readlink(linked)).parent.parent.parent != REPO:
        pytest.skip("this checkout's ci/setup-host did not link /usr/local/bin/build-image "
                    "(another checkout did, or --no-links)")
    found = subprocess.run(["sudo", "-n", "build-image", "--version"], capture_output=True,
                           text=True)
    assert found.returncode == 0 and found.stdout.startswith("build-image "), found.stderr
