"""build-image as a command: the plan of --dry-run, and bad input on the command line."""

from __future__ import annotations

import datetime
import fcntl
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    BUILD_IMAGE,
    NOBODY,
    REPO,
    TRY_IMAGE,
    FakeArmbian,
    cli_env,
    error_line,
    require_nobody_can_run,
    run_cli,
)

from builder.boards import load_catalog


def test_dry_run_prints_the_plan(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    armbian.publish("orangepi5", version="26.2.1", seed=5)  # older: must not be chosen
    result = run_cli("--board", "orangepi", "--dry-run", *armbian.args, "--cache-dir",
                     cache_dir)
    assert result.returncode == 0, result.stderr
    combined = (result.stderr + result.stdout).splitlines()
    assert combined[0] == "board 'orangepi' is an alias for orangepi5 (Orange Pi 5)"
    plan = result.stdout
    assert "Plan (dry run: nothing is downloaded or changed)" in plan
    assert "orangepi5: Orange Pi 5, Rockchip RK3588S, arm64, family rockchip-rk3588" in plan
    assert "ttyS2 at 1500000 baud" in plan
    assert "Armbian 26.5.1 trixie current minimal" in plan
    assert f"{armbian.mirror.url}{pub.path}" in plan
    assert f"sha256      {pub.sha256} (from {armbian.mirror.url}{pub.path}.sha)" in plan
    assert "not cached: will download" in plan
    assert "verify      signature: a good OpenPGP signature by a trusted key is required" in plan
    assert (f"signature   {armbian.mirror.url}{pub.path}.asc, checked against Armbian's key "
            f"8CFA83D13EB2181EEF5843E41EB30FAF236099FE and {armbian.gpg.armored_keyring}"
            in plan)
    assert "1. check-host" in plan and "3. fetch-base-image" in plan
    # Only the index and the checksum were read; the image itself was not downloaded.
    assert armbian.mirror.hits(pub.path) == []
    assert {r.path for r in armbian.mirror.requests} == {"/armbian-images.json",
                                                          pub.path + ".sha"}
    assert not (cache_dir / "images").exists()


def test_dry_run_after_a_fetch_says_cached(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    args = ("--board", "orangepi5", *armbian.args, "--cache-dir", cache_dir)
    assert run_cli(*args, "--fetch-only").returncode == 0
    result = run_cli(*args, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"cached: {cache_dir}/images/{pub.sha256}.img (no download)" in result.stdout


@pytest.fixture
def world_readable_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="build-image-nobody-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


@pytest.mark.root
def test_dry_run_and_fetch_only_work_without_root(armbian: FakeArmbian,
                                                  world_readable_tmp: Path) -> None:
    """Run as the unprivileged user nobody: planning and fetching need no root."""
    require_nobody_can_run()
    pub = armbian.publish("orangepi5")
    cache = world_readable_tmp / "cache"
    # The test's key where nobody can read it.
    key = world_readable_tmp / "test-key.asc"
    key.write_bytes(armbian.gpg.armored_keyring.read_bytes())
    key.chmod(0o644)
    args = ("--board", "orangepi", "--armbian-index", armbian.index_url, "--gpg-keyring", key,
            "--cache-dir", cache)
    plan = run_cli(*args, "--dry-run", user=NOBODY)
    assert plan.returncode == 0, plan.stderr
    assert pub.sha256 in plan.stdout
    fetched = run_cli(*args, "--fetch-only", user=NOBODY)
    assert fetched.returncode == 0, fetched.stderr
    path = Path(fetched.stdout.splitlines()[-1])
    assert path.read_bytes() == pub.raw and path.stat().st_uid == NOBODY


def test_no_image_for_the_filters(armbian: FakeArmbian) -> None:
    armbian.publish("orangepi5")
    line = error_line(run_cli("--board", "orangepi", "--dry-run", "--release", "bookworm",
                              "--armbian-index", armbian.index_url), code=2)
    assert line.endswith("no Armbian image for orangepi5 with release bookworm, branch current, "
                         "variant minimal; the index has: --release trixie --branch current "
                         "--variant minimal")


def test_dry_run_changes_nothing_in_the_cache(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    args = ("--board", "orangepi5", *armbian.args, "--cache-dir", cache_dir)
    assert run_cli(*args, "--fetch-only").returncode == 0
    image = cache_dir / "images" / f"{pub.sha256}.img"
    with open(image, "r+b") as f:
        f.write(b"tampered")
    files = sorted(p for p in cache_dir.rglob("*"))
    result = run_cli(*args, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "not cached: will download" in result.stdout
    assert sorted(p for p in cache_dir.rglob("*")) == files and image.exists()


def test_relative_cache_dir_prints_an_absolute_path(armbian: FakeArmbian,
                                                    tmp_path: Path) -> None:
    pub = armbian.publish("orangepi5")
    result = subprocess.run([*BUILD_IMAGE, "--board", "orangepi5", "--fetch-only",
                             *armbian.args, "--cache-dir", "rel-cache"],
                            cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == \
        f"{tmp_path}/rel-cache/images/{pub.sha256}.img"


def test_url_with_a_query_string(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    result = run_cli("--board", "orangepi5", "--fetch-only", "--cache-dir", cache_dir, "--base",
                     f"{armbian.mirror.url}{pub.path}?download=1", "--base-sha256", pub.sha256,
                     *armbian.gpg.args)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.splitlines()[-1]).read_bytes() == pub.raw
    # The signature of x.img.xz?download=1 is x.img.xz.asc?download=1.
    assert [r.status for r in armbian.mirror.hits(pub.path + ".asc")] == [200]


def test_debian_base_for_a_board_without_debian_uboot() -> None:
    line = error_line(run_cli("--board", "orangepi5", "--base", "debian", "--dry-run"))
    assert "--base debian is offered for boards Debian ships U-Boot for" in line
    assert "orangepipcplus" in line


def test_debian_base_plan(cache_dir: Path) -> None:
    result = run_cli("--board", "orangepizeroplus2-h5", "--base", "debian", "--dry-run",
                     "--cache-dir", cache_dir)
    assert result.returncode == 0, result.stderr
    assert "Debian trixie for Orange Pi Zero Plus 2 (U-Boot orangepi_zero_plus2)" in result.stdout
    assert "not cached: will build it" in result.stdout


def test_no_board() -> None:
    assert "no board given: pass --board ID" in error_line(run_cli("--dry-run"), code=2)


def test_dry_run_and_fetch_only_together() -> None:
    line = error_line(run_cli("--board", "orangepi5", "--dry-run", "--fetch-only"), code=2)
    assert "exclude each other" in line


def test_invalid_yaml_on_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("jupyter:\n  port: [1\n")
    line = error_line(run_cli("--board", "orangepi5", "--dry-run", "--config", path), code=2)
    assert f"config file {path} is not valid YAML at line" in line


def test_unknown_key_on_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("jupyter:\n  token: abc\n")
    line = error_line(run_cli("--board", "orangepi5", "--dry-run", "--config", path), code=2)
    assert line == f"build-image: error: {path}: jupyter.token: unknown key " \
                   "(known: user, ip, port, base_url, groups, cull_idle_minutes, memory_max, tls)"


def test_bad_value_is_reported_before_any_network(armbian: FakeArmbian) -> None:
    armbian.publish("orangepi5")
    line = error_line(run_cli("--board", "orangepi5", "--fetch-only", "--armbian-index",
                              armbian.index_url, "--set", "jupyter.port=abc"), code=2)
    assert line == "build-image: error: --set jupyter.port: 'abc' is not a port number (1-65535)"
    assert armbian.mirror.requests == []


def test_base_that_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    line = error_line(run_cli("--board", "orangepipc", "--dry-run", "--base", path), code=2)
    assert "is not an .img, .img.xz, .img.gz or .img.zst file" in line


def test_missing_local_base(tmp_path: Path) -> None:
    line = error_line(run_cli("--board", "orangepipc", "--dry-run", "--base",
                              tmp_path / "gone.img.xz"), code=2)
    assert "gone.img.xz not found" in line


def test_sigterm_is_a_clean_stop(armbian: FakeArmbian, cache_dir: Path) -> None:
    pub = armbian.publish("orangepi5")
    armbian.mirror.throttle(pub.path, 128 * 1024)
    proc = subprocess.Popen([*BUILD_IMAGE, "--board", "orangepi5", "--fetch-only",
                             *armbian.args, "--cache-dir", str(cache_dir)],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while armbian.mirror.bytes_served(pub.path) < 100_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in err and "Traceback" not in err


def run_in_terminal(*args: str | os.PathLike[str]) -> str:
    """Run build-image on a pseudo-terminal that reports 0 x 0 like a bare serial console."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    proc = subprocess.Popen([*BUILD_IMAGE, *map(os.fspath, args)], cwd=REPO, env=cli_env(),
                            stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    output = bytearray()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the program closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert proc.wait(timeout=30) == 0, output.decode(errors="replace")
    return output.decode(errors="replace")


def test_progress_bars_on_a_terminal_and_plain_lines_in_a_log(armbian: FakeArmbian,
                                                              cache_dir: Path,
                                                              tmp_path: Path) -> None:
    armbian.publish("orangepi5")
    args = ("--board", "orangepi5", "--fetch-only", *armbian.args, "--cache-dir", cache_dir)
    screen = run_in_terminal(*args)
    assert "downloading Armbian_26.5.1" in screen and "100%|" in screen
    assert "decompressing Armbian_26.5.1" in screen
    logged = run_cli(*args[:-1], tmp_path / "other-cache")
    assert logged.returncode == 0
    assert "downloading Armbian_26.5.1" in logged.stderr
    assert "\r" not in logged.stderr and "%|" not in logged.stderr
    quiet = run_cli(*args[:-1], tmp_path / "third-cache", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout.strip().endswith(".img")


# --preseed: checked by the wizard's own parser before anything is downloaded.


def preseed_plan(tmp_path: Path, text: str | None, *extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "jupyter-firstboot.conf"
    if text is not None:
        path.write_text(text)
    return run_cli("--board", "orangepipcplus", "--base", "debian", "--dry-run",
                   "--cache-dir", tmp_path / "cache", "--preseed", path, *extra)


def test_bad_preseed_stops_the_build_with_every_problem(tmp_path: Path) -> None:
    result = preseed_plan(tmp_path, "hostname = -x-\njupyter_token = short\n")
    path = tmp_path / "jupyter-firstboot.conf"
    # Every problem at once, one per line under the error: one run to fix them all.
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-3:] == [
        f"build-image: error: --preseed {path}: 2 problems: fix the file (the manual's "
        f"\"First boot\" chapter lists the keys)",
        "  line 1: 'hostname': '-x-' is not a host name (letters, digits and '-', at most 63, "
        "not starting or ending with '-')",
        "  line 2: 'jupyter_token': must be 'generate', 'none', or 16-256 letters, digits, '-' "
        "and '_'"], result.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.img"))
    one = preseed_plan(tmp_path, "hostname = lab\njupyter_token = short\n")
    assert one.returncode == 2
    assert one.stderr.splitlines()[-1] == (
        f"build-image: error: --preseed {path}: line 2: 'jupyter_token': must be 'generate', "
        f"'none', or 16-256 letters, digits, '-' and '_': fix the file (the manual's \"First "
        f"boot\" chapter lists the keys)")


def test_missing_preseed(tmp_path: Path) -> None:
    result = preseed_plan(tmp_path, None)
    assert "jupyter-firstboot.conf: No such file or directory: give the path of an existing " \
        "file" in error_line(result, code=2)


def test_plain_passwords_in_a_preseed_are_warned_about(tmp_path: Path) -> None:
    plain = preseed_plan(tmp_path, "login_password = a long password\n")
    assert plain.returncode == 0, plain.stderr
    assert "holds plain passwords: every card flashed from this image carries them" in \
        plain.stderr
    hashed = preseed_plan(tmp_path, "jupyter_token = generate\nhostname = lab\n")
    assert hashed.returncode == 0 and "plain passwords" not in hashed.stderr


def test_preseed_needs_the_builtin_wizard(tmp_path: Path) -> None:
    result = preseed_plan(tmp_path, "hostname = lab\n", "--set", "customize.builtin=false")
    assert "the first-boot wizard is part of the built-in customize.d" in \
        error_line(result, code=2)


# --check-preseed: the host's way to check a preseed file before a build or a flash.


def test_check_preseed_says_ok_or_every_problem(tmp_path: Path) -> None:
    good = tmp_path / "lab.conf"
    good.write_text("timezone = Europe/Paris\nhostname = lab-07\n"
                    "jupyter_password = \"correct horse battery\"\n")
    checked = run_cli("--check-preseed", good)
    assert checked.returncode == 0, checked.stderr
    # The keys, in the wizard's order, and never a value: the file may hold passwords.
    assert checked.stdout == f"{good}: ok (jupyter_password, hostname, timezone)\n"
    assert "correct horse" not in checked.stdout + checked.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text("hostname = -x-\nfoo = 1\njupyter_password = tiny7\n")
    checked = run_cli("--check-preseed", bad)
    assert checked.returncode == 1 and checked.stdout == ""
    lines = checked.stderr.splitlines()
    assert lines[0] == (f"build-image: error: --check-preseed {bad}: 3 problems: fix the file "
                        f"(the manual's \"First boot\" chapter lists the keys)")
    assert [line.split(":")[0] for line in lines[1:]] == ["  line 1", "  line 2", "  line 3"]
    assert "tiny7" not in checked.stderr          # a password is never repeated
    missing = run_cli("--check-preseed", tmp_path / "nothing.conf")
    assert "nothing.conf: no such file: give the preseed file's path" in \
        error_line(missing, code=2)


def test_the_shortest_password_comes_from_the_configuration(tmp_path: Path) -> None:
    preseed = tmp_path / "lab.conf"
    preseed.write_text("login_password = twelve chars\n")
    assert run_cli("--check-preseed", preseed).returncode == 0
    strict = run_cli("--check-preseed", preseed, "--set", "firstboot.min_password_length=16")
    assert strict.returncode == 1 and "shorter than 16 characters" in strict.stderr, strict.stderr


# Exit codes: 2 for what the command line asks, 1 for a failure, 141 for a reader gone.


@pytest.mark.parametrize("argv", [
    [*BUILD_IMAGE, "--list-boards"],
    [*BUILD_IMAGE, "--help"],
    [*TRY_IMAGE, "--help"],
    [sys.executable, "-m", "builder.flash", "--help"],
], ids=["build-image-list", "build-image-help", "try-image-help", "flash-image-help"])
def test_a_reader_that_goes_away_ends_the_command_quietly(argv: list[str]) -> None:
    """`build-image --list-boards | head -1`: a pipe whose reader is gone before the command
    writes (the worst case of head ending early)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(argv, stdout=write_end, stderr=subprocess.PIPE, text=True,
                              cwd=REPO, env=cli_env(), timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["--board", "orangepi5", "--dry-run", "--fetch-only"], 2, "exclude each other"),
    (["--bogus-flag"], 2, "unrecognized arguments: --bogus-flag"),
    (["--dry-run"], 2, "no board given"),
    (["--board", "nosuch", "--dry-run"], 2, "unknown board 'nosuch'"),
    (["--board", "orangepi5", "--dry-run", "--set", "jupyter.port=abc"], 2,
     "'abc' is not a port number"),
    (["--board", "orangepi5", "--dry-run", "--set", "nosuch.key=1"], 2, "unknown key"),
    (["--board", "orangepi5", "--dry-run", "--offline", "--armbian-index",
      "http://127.0.0.1:9/armbian-images.json"], 1, "error"),
])
def test_usage_errors_exit_2_and_failures_1(tmp_path: Path, argv: list[str], code: int,
                                            message: str) -> None:
    """Whichever check finds a usage error (argparse, the settings, the board), the exit
    status is the same; a run that could not do its work (here: offline, with nothing in the
    cache) is 1."""
    proc = run_cli(*argv, "--cache-dir", tmp_path / "cache")
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr.splitlines()[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_key_given_twice_in_a_config_file_stops_the_build(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("jupyter:\n  port: 9000\n\n  port: 8888\n")
    line = error_line(run_cli("--board", "orangepi5", "--dry-run", "--config", path), code=2)
    assert line == (f"build-image: error: config file {path}: line 4: 'port' is given twice at "
                    f"one level (first at line 2; the last would win silently): keep one")


def test_a_preseed_named_in_a_config_file_is_found_beside_it(tmp_path: Path) -> None:
    """build-image runs in another directory (run_cli: the checkout) than the config's."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "answers.conf").write_text("hostname = lab\n")
    (conf / "site.yaml").write_text("firstboot:\n  preseed: answers.conf\n")
    result = run_cli("--board", "orangepipcplus", "--base", "debian", "--dry-run",
                     "--cache-dir", tmp_path / "cache", "--config", conf / "site.yaml")
    assert result.returncode == 0, result.stderr
    (conf / "answers.conf").unlink()
    line = error_line(run_cli("--board", "orangepipcplus", "--base", "debian", "--dry-run",
                              "--cache-dir", tmp_path / "cache", "--config",
                              conf / "site.yaml"), code=2)
    assert line == (f"build-image: error: {conf}/site.yaml: firstboot.preseed: 'answers.conf': "
                    f"{conf}/answers.conf does not exist (a relative path in a config file is "
                    f"taken from the file's directory): fix the path to name a file")


# The dry run's plan: what the build would make, from what, with which settings.


def test_the_plan_shows_settings_outputs_preseed_and_room(armbian: FakeArmbian, cache_dir: Path,
                                                          tmp_path: Path) -> None:
    armbian.publish("orangepi5")
    preseed = tmp_path / "lab.conf"
    preseed.write_text('hostname = lab-07\njupyter_password = "correct horse battery"\n')
    site = tmp_path / "site.yaml"
    site.write_text("jupyter:\n  cull_idle_minutes: 30\n")
    out = tmp_path / "images"
    common = ("--board", "orangepi5", "--dry-run", *armbian.args, "--cache-dir", cache_dir)
    result = run_cli(*common, "--output", out, "--compress", "zstd", "--set",
                     "jupyter.port=9000", "--preseed", preseed, "--config", site)
    assert result.returncode == 0, result.stderr
    plan = result.stdout
    # Each setting that differs from defaults.yaml, and where it was given.
    assert "jupyter.port = 9000  (--set)" in plan
    assert "image.compression = zstd  (--compress)" in plan
    assert f"output.dir = {out}  (--output)" in plan
    assert f"jupyter.cull_idle_minutes = 30  ({site})" in plan
    assert "jupyter.user" not in plan                    # as in defaults.yaml: not listed
    # The preseed by its keys only.
    assert f"  preseed     {preseed}: jupyter_password, hostname (values not shown" in plan
    assert "correct horse" not in plan + result.stderr
    today = datetime.date.today().strftime("%Y%m%d")
    assert f"  output      {out}/orangepi-jupyter-orangepi5-trixie-{today}.img.zst\n" in plan
    assert ".img.zst.sha256, .img.bmap, .manifest.json, .sbom.cdx.json, .build.log" in plan
    assert re.search(r"  compressed  zstd, level \d+, on every core", plan)
    assert re.search(rf"  disk space  build: about [\d.]+ GiB in {cache_dir}, [\d.]+ \w+ free",
                     plan)
    assert re.search(r"  download    [\d.]+ \w+ \(\.img\.xz as published, compressed\)", plan)
    assert "step cache: not looked up: its keys start from the base image's contents" in plan
    assert not out.exists()                      # a dry run makes nothing
    # Without those options the plan says so: it is not the same plan whatever is asked.
    plain = run_cli(*common)
    assert plain.returncode == 0, plain.stderr
    assert "jupyter.port" not in plain.stdout and ".img.xz\n" in plain.stdout
    assert "  preseed     none in the image" in plain.stdout


def test_a_dry_run_refuses_what_a_build_would_refuse(armbian: FakeArmbian, cache_dir: Path,
                                                     tmp_path: Path) -> None:
    armbian.publish("orangepi5")
    common = ("--dry-run", *armbian.args, "--cache-dir", cache_dir)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    line = error_line(run_cli("--board", "orangepi5", *common, "--output", a_file / "out"),
                      code=2)
    assert line.endswith(f"--output {a_file}/out: {a_file} is not a directory: give a "
                         f"directory for the image and its files")
    riscv = next(board.id for board in load_catalog().boards if board.arch == "riscv64")
    line = error_line(run_cli("--board", riscv, *common), code=2)
    assert f"{riscv} is riscv64: this builder makes images for arm64 and armhf boards only" \
        in line
    # Room is checked against the disks once the plan is shown.
    big = run_cli("--board", "orangepi5", *common, "--set", "image.headroom=900000GiB")
    assert big.returncode == 1, big.stderr
    assert "NOT ENOUGH, free some or use --cache-dir" in big.stdout
    assert big.stderr.splitlines()[-1].startswith(
        f"build-image: error: not enough space for the build in {cache_dir}: it needs about")
