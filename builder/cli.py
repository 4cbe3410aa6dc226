"""`build-image`: the command line (errors and signals become exit codes in builder.entry)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from builder import log
from builder.boards import Board, format_markdown, format_table, load_catalog
from builder.cache import Cache, default_cache_dir
from builder.config import BASE_VERIFY_LEVELS, Config, load_config
from builder.download import Http
from builder.entry import (
    HelpFormatter,
    add_common_options,
    checking_usage,
    quiet_on_closed_pipe,
    run_reporting,
)
from builder.errors import BuildError, UsageError
from builder.firstboot.answers import KEYS, preseed_keys
from builder.firstboot.card import Settings
from builder.ledger import clean_stale
from builder.mount import is_root
from builder.pipeline import Context, Options, run_build, stage_cache_of
from builder.preseed import load_preseed
from builder.qemu import machine_for

# Dedicated flags and the settings key each one sets (they win over --config and --set).
FLAG_KEYS = {
    "board": "board",
    "base": "base.source",
    "base_sha256": "base.sha256",
    "base_verify": "base.verify",
    "release": "base.release",
    "branch": "base.branch",
    "variant": "base.variant",
    "armbian_index": "base.armbian_index",
    "armbian_mirror": "base.armbian_mirror",
    "gpg_keyring": "base.gpg_keyring",      # repeatable: the whole list
    "cache_dir": "cache.dir",
    "output": "output.dir",
    "apt_proxy": "apt.proxy",
    "compress": "image.compression",
    "preseed": "firstboot.preseed",
}
# Repeatable flags that add to a list setting.
LIST_FLAGS = {"customize": "customize.scripts", "overlay": "customize.overlays"}
# The end of --help and the man page's EXAMPLES (builder/manpage.py; tests/test_manpages.py
# parses every command line here): an explanation, then its command, indented further.
EXAMPLES = """\
Settings: docs/configuration.md (and builder/defaults.yaml) lists every
key; --config and --set change them.

Examples:
  The Orange Pi PC Plus image from Armbian's trixie minimal, written to ./out:
    sudo build-image --board orangepipcplus
  The plan only (base image, sha256, steps), without root; a release, branch
  or variant the board lacks is refused with the list of those it has:
    build-image --board orangepi5 --branch vendor --dry-run
  A base built from Debian's own packages instead of Armbian's image:
    sudo build-image --board orangepipcplus --base debian
  Scripts and overlay files of your own, and answers every card gets:
    sudo build-image --board orangepizero3 --customize site/customize.d \\
        --overlay site/overlays --preseed site-preseed.conf
  The boards and their ids:
    build-image --list-boards
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build-image",
        description="Turn an Armbian image for an Orange Pi board into a Jupyter workstation.",
        epilog=EXAMPLES, formatter_class=HelpFormatter,
    )
    p.add_argument("--board", metavar="ID", help="board id (see --list-boards); "
                   "'orangepi' means orangepi5")
    p.add_argument("--list-boards", action="store_true", help="print the board catalog and exit")
    p.add_argument("--markdown", action="store_true",
                   help="with --list-boards: as the Markdown table docs/boards.md carries")
    p.add_argument("--config", metavar="FILE", type=Path, action="append", default=[],
                   help="YAML file merged over the defaults (repeatable)")
    p.add_argument("--set", metavar="KEY=VALUE", dest="overrides", action="append", default=[],
                   help="change one setting, e.g. --set jupyter.port=9000 (repeatable)")
    base = p.add_argument_group("base image")
    base.add_argument("--base", metavar="armbian|debian|PATH|URL",
                      help="armbian (default): the board's image from Armbian's index; debian: "
                           "one built from Debian's packages (the boards Debian has U-Boot "
                           "for); or a path/URL of an .img, .img.xz, .img.gz, .img.zst")
    base.add_argument("--base-sha256", metavar="HEX", help="expected sha256 of --base PATH/URL")
    base.add_argument("--release", help="Armbian release (default trixie). Which releases, "
                      "branches and variants exist depends on the board: a build or --dry-run "
                      "asking for one it lacks fails with the list Armbian's index has for it")
    base.add_argument("--branch", help="kernel branch (default current; another, such as "
                      "vendor or edge, where the board has it)")
    base.add_argument("--variant", help="image variant (default minimal; a desktop, such as "
                      "xfce or gnome, where the board has one)")
    base.add_argument("--armbian-index", metavar="URL|PATH", help="another Armbian index JSON")
    base.add_argument("--armbian-mirror", metavar="URL",
                      help="download dl.armbian.com files from this mirror instead")
    base.add_argument("--base-verify", choices=BASE_VERIFY_LEVELS,
                      help="what the base image must pass: a good signature (default), only "
                           "a sha256 (the publisher's .sha or --base-sha256), or none")
    base.add_argument("--gpg-keyring", metavar="FILE", action="append",
                      help="trust this keyring's keys too, besides Armbian's shipped key "
                           "(repeatable)")
    base.add_argument("--cache-dir", metavar="DIR",
                      help="downloads, base images and the step cache (default "
                           "$XDG_CACHE_HOME/orangepi-jupyter, else ~/.cache/orangepi-jupyter; "
                           "root's under sudo)")
    base.add_argument("--offline", action="store_true",
                      help="use only what the cache holds; no network")
    base.add_argument("--no-cache", action="store_true",
                      help="run every customize.d script, using no stage from the step cache "
                           "(the fresh stages are kept for the next build)")
    image = p.add_argument_group("the image")
    image.add_argument("--output", metavar="DIR", help="where the image and its files go "
                       "(default ./out)")
    image.add_argument("--compress", choices=("xz", "zstd", "gzip", "none"),
                       help="how the image is compressed (default xz, with every core)")
    image.add_argument("--customize", metavar="DIR", action="append", default=[],
                       help="more customize.d scripts, run in number order among the "
                            "built-in ones; a script named like a built-in one (or an earlier "
                            "--customize DIR's) replaces it (repeatable)")
    image.add_argument("--overlay", metavar="DIR", action="append", default=[],
                       help="more overlay files, after the built-in ones (repeatable)")
    image.add_argument("--preseed", metavar="FILE", type=_absolute,
                       help="answers for the first-boot wizard, put into the image as "
                            "/boot/jupyter-firstboot.conf (every card gets them: see "
                            "docs/first-boot.md)")
    image.add_argument("--apt-proxy", metavar="URL",
                       help="apt proxy for the image's apt during the build, e.g. "
                            "http://127.0.0.1:3142")
    image.add_argument("--keep-workspace", action="store_true",
                       help="keep the working copy of the image for debugging")
    run = p.add_argument_group("what to do")
    run.add_argument("--dry-run", action="store_true",
                     help="print the plan and stop: the base image and how it is verified, "
                          "the settings that differ from the defaults and where each was "
                          "given, the preseed's keys, the outputs, the room needed, the steps "
                          "and the step cache; every check a build makes before its download "
                          "is made, without root")
    run.add_argument("--fetch-only", action="store_true",
                     help="stop once the verified base image is in the cache; print its path")
    run.add_argument("--check-preseed", metavar="FILE", type=Path,
                     help="check a preseed file with the first-boot wizard's own rules, as "
                          "the card will read it; print 'ok' or every problem, and exit")
    run.add_argument("--cleanup", action="store_true",
                     help="undo what builds that were killed left behind (loop devices, "
                          "mounts, work files) and exit")
    run.add_argument("--cache-prune", action="store_true",
                     help="remove every entry of the step cache (kept images of earlier "
                          "builds' stages) and exit; downloads and base images stay")
    add_common_options(run)
    return p


def _absolute(value: str) -> str:
    """A path the build's scripts can use whatever their working directory."""
    return str(Path(value).expanduser().absolute())


@quiet_on_closed_pipe
def main(argv: Sequence[str] | None = None) -> int:
    # Line-buffered stdout keeps results in order with messages on stderr in a shared log.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    cli = parser()
    args = cli.parse_args(argv)
    if args.markdown and not args.list_boards:
        cli.error("--markdown goes with --list-boards")
    if args.dry_run and args.fetch_only:
        cli.error("--dry-run and --fetch-only exclude each other: pick one")
    log.setup(quiet=args.quiet, debug=args.debug)
    return run_reporting("build-image", lambda: _main(args), debug=args.debug,
                         after_interrupt="everything started was cleaned up (a partial "
                                         "download is kept and resumes on the next run)")


def boards_markdown() -> str:
    """The board catalog as the Markdown table docs/boards.md carries (--list-boards
    --markdown), with the machine try-image boots each board's images on."""
    return format_markdown(load_catalog(), {"try-image on": _emulated_on})


def _emulated_on(board: Board) -> str:
    """The QEMU machine try-image boots the board's images on, if any."""
    try:
        return f"`{machine_for(board, None).name}`"
    except BuildError:
        return "not emulated"


def _cache_of(config: Config) -> Cache:
    # Absolute, so the path printed by --fetch-only does not depend on the working directory.
    root = Path(config.cache.dir).expanduser() if config.cache.dir else default_cache_dir()
    return Cache(root.absolute())


def _check_preseed(path: Path, config: Config) -> int:
    """`--check-preseed FILE`: the wizard's own parser, with this configuration's rules (the
    shortest password). The problems found are the check's result: exit 1, not a usage
    error. Keys only on success: the values may be passwords."""
    if not path.is_file():
        raise UsageError(f"--check-preseed {path}: no such file: give the preseed file's path")
    settings = Settings(min_password_length=config.firstboot.min_password_length)
    try:
        data, _ = load_preseed(path, settings=settings, option="--check-preseed")
    except UsageError as exc:
        raise BuildError(str(exc), exc.details) from None
    given = preseed_keys(data.decode("utf-8-sig"))
    keys = ", ".join(key for key in KEYS if key in given) or "no settings"
    log.result(f"{path}: ok ({keys})")
    return 0


def _prune(config: Config) -> int:
    stage_cache = stage_cache_of(_cache_of(config), config)
    freed = stage_cache.prune() if stage_cache.root.exists() else 0
    log.result(f"step cache {stage_cache.root}: {log.human_size(freed)} freed")
    return 0


def _main(args: argparse.Namespace) -> int:
    catalog = load_catalog()
    if args.list_boards:
        if args.markdown:
            log.result(boards_markdown())
        else:
            log.result(format_table(catalog))
        return 0
    if args.cleanup:
        if not is_root():
            raise BuildError("--cleanup needs root (it detaches loop devices and unmounts)")
        undone = clean_stale()
        log.result(f"cleaned up after {undone} killed build(s)" if undone
                   else "nothing to clean up")
        return 0
    flags = {key: getattr(args, attr) for attr, key in FLAG_KEYS.items()}
    flags.update({key: getattr(args, attr) or None for attr, key in LIST_FLAGS.items()})
    names = {key: "--" + attr.replace("_", "-") for attr, key in {**FLAG_KEYS,
                                                                  **LIST_FLAGS}.items()}
    with checking_usage():
        config = load_config(args.config, args.overrides, flags, names)
    if args.check_preseed:
        return _check_preseed(args.check_preseed, config)
    if config.firstboot.preseed:
        # A path from --set, relative to where build-image was started (one from a --config
        # file was made absolute against its directory when the file was read).
        firstboot = dataclasses.replace(config.firstboot,
                                        preseed=_absolute(config.firstboot.preseed))
        config = dataclasses.replace(config, firstboot=firstboot)
    if args.cache_prune:
        return _prune(config)
    if not config.board:
        raise UsageError("no board given: pass --board ID (`build-image --list-boards` shows "
                         "them; --board orangepi picks the Orange Pi 5)")
    with checking_usage():
        board, alias = catalog.lookup(config.board)
    if alias:
        log.info(f"board '{alias}' is an alias for {board.id} ({board.name})")
    cache = _cache_of(config)
    http = Http(timeout=config.download.timeout, retries=config.download.retries)
    ctx = Context(
        config=config,
        options=Options(dry_run=args.dry_run, fetch_only=args.fetch_only, offline=args.offline,
                        keep_workspace=args.keep_workspace, no_cache=args.no_cache),
        board=board,
        cache=cache,
        http=http,
    )
    if ctx.options.builds_image and is_root():
        # A build killed earlier with SIGKILL may still hold loop devices and mounts.
        clean_stale()
    try:
        run_build(ctx)
    finally:
        http.close()
    return 0
