"""`flash-image IMAGE DEVICE`: the command line, and the steps in their order (the package's
docstring lists them); everything that can be refused is refused before the card is touched.
An error is one line and exit 1 (a usage error exit 2), a card that does not hold the image
exit 3."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from builder import log
from builder.compression import COMPRESSIONS, built_image_suffix
from builder.entry import (
    EXIT_NOT_SOUND,
    HelpFormatter,
    add_common_options,
    checking_usage,
    quiet_on_closed_pipe,
    run_reporting,
)
from builder.errors import BuildError, Interrupted, UsageError
from builder.flash.bmap import bmap_beside, read_bmap
from builder.flash.certificate import GivenTls, check_given_tls, warn_about, warn_unnamed
from builder.flash.device import Card, Target, check_fits, inspect_target, opened
from builder.flash.personalise import Preseed, check_preseed, personalise_card
from builder.flash.source import Source, check_image_checksum, check_whole, raw_size
from builder.flash.write import (
    CARD_LEFT_INVALID,
    Mismatch,
    Written,
    invalidate,
    verify_card,
    write_card,
)
from builder.log import human_size
from builder.run import require_programs

EXIT_MISMATCH = EXIT_NOT_SOUND
# The end of --help and the man page's EXAMPLES (builder/manpage.py; tests/test_manpages.py
# parses every command line here): an explanation, then its command, indented further.
EXAMPLES = """\
Examples:
  Write an image to the card at /dev/sdb, asking first, and name the card:
    sudo flash-image out/orangepi-jupyter-orangepipc-trixie-20261126.img.xz \\
        /dev/sdb --hostname lab-pi-01
  Passwords and time zone from a file, an SSH key and a Wi-Fi network (its
  key is asked for), for this card only; --hostname wins over the file's:
    sudo flash-image out/orangepi-jupyter-orangepi5-trixie-20261126.img.xz \\
        /dev/mmcblk0 --preseed lab.conf --hostname lab-pi-02 \\
        --ssh-key ~/.ssh/id_ed25519.pub --wifi LabNet
  In a script, without asking, with a certificate of your own for Jupyter:
    sudo flash-image out/orangepi-jupyter-orangepipc-trixie-20261126.img.xz \\
        /dev/sdb --yes --hostname lab-pi-07 --tls-cert lab-pi-07.crt \\
        --tls-key lab-pi-07.key
  Check a card against the image, writing nothing:
    sudo flash-image out/orangepi-jupyter-orangepipc-trixie-20261126.img.xz \\
        /dev/sdb --verify-only
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flash-image",
        description="Write an image made by build-image to an SD card or USB disk, verify it "
                    "and give the card its own settings for the first boot. Only the blocks "
                    "the .bmap beside the image lists are written. The card's first MiB is "
                    "written last, so an interrupted card does not look bootable.",
        epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("image", type=Path,
                   help="an .img, .img.xz, .img.zst or .img.gz made by build-image")
    p.add_argument("device", type=Path,
                   help="the whole card, e.g. /dev/sdb or /dev/mmcblk0 (`lsblk` lists disks)")
    p.add_argument("-y", "--yes", action="store_true",
                   help="do not ask before writing (for scripts)")
    p.add_argument("--force", action="store_true",
                   help="also write to a disk that is not removable, USB or MMC (a loop "
                        "device), or to a regular file; never to a mounted or system disk")
    bmap = p.add_mutually_exclusive_group()
    bmap.add_argument("--bmap", type=Path, metavar="FILE",
                      help="the block map (default: IMAGE's .bmap beside it, if there is one)")
    bmap.add_argument("--no-bmap", action="store_true",
                      help="write every block of the image, even with a .bmap beside it")
    check = p.add_mutually_exclusive_group()
    check.add_argument("--no-verify", action="store_true",
                       help="do not read the card back after writing")
    check.add_argument("--verify-only", action="store_true",
                       help="write nothing: compare the card with the image (a card that has "
                            "booted, or was personalised, differs)")
    # A title, and what it means as the group's description: argparse wraps the description
    # but prints a title as one line however long.
    card = p.add_argument_group(
        "this card's settings",
        "Written into jupyter-firstboot.conf on the card's setup drive, JUPYTER-CFG, which the "
        "card reads and wipes at its first boot; on an image without that drive, into "
        "/boot/jupyter-firstboot.conf.")
    card.add_argument("--hostname", help="the card's hostname")
    card.add_argument("--preseed", type=Path, metavar="FILE",
                      help="a preseed file (passwords, time zone, ...); --hostname, --ssh-key "
                           "and --wifi win over its lines of the same key, and all of these "
                           "over the image's own preseed, key by key (its other lines stay; "
                           "SSH keys add up)")
    card.add_argument("--ssh-key", type=Path, action="append", default=[], metavar="FILE",
                      help="public key(s) for jupyter's ~/.ssh/authorized_keys (repeatable)")
    card.add_argument("--wifi", metavar="SSID",
                      help="join this Wi-Fi network; its key is asked for (or read from "
                           "stdin when it is not a terminal; empty: an open network)")
    own = p.add_argument_group(
        "this card's HTTPS certificate",
        "Both or neither; without them the card makes its own, self-signed.")
    own.add_argument("--tls-cert", type=Path, metavar="FILE",
                     help="a certificate of your own for Jupyter's HTTPS (PEM; a chain after "
                          "it is fine), valid now, best naming HOSTNAME.local; written as "
                          "/boot/jupyter-tls.crt, which the card installs at its first boot")
    own.add_argument("--tls-key", type=Path, metavar="FILE",
                     help="its private key (PEM, without a passphrase: nobody is there to type "
                          "it when the card boots); written as /boot/jupyter-tls.key, readable "
                          "by root only, and moved out of /boot at the first boot")
    add_common_options(p)
    return p


@quiet_on_closed_pipe
def main(argv: Sequence[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    args = parser().parse_args(argv)
    log.setup(quiet=args.quiet, debug=args.debug)

    def body() -> int:
        try:
            return _main(args)
        except Mismatch as exc:
            if args.debug:
                raise
            print(f"flash-image: error: {exc}", file=sys.stderr)
            return EXIT_MISMATCH

    return run_reporting("flash-image", body, debug=args.debug,
                         after_interrupt="the card is closed")


@dataclass(frozen=True)
class Request(Source):
    """The image, with what this run does with the card."""

    preseed: Preseed
    verify: bool
    verify_only: bool
    tls: GivenTls | None = None


def check_request(args: argparse.Namespace) -> Request:
    """The image, its .bmap, the per-card settings (the exact preseed lines, read by the
    wizard's parser) and the programs needed."""
    image: Path = args.image
    # The files the command line names: missing, or not an image or a bmap, is a usage error;
    # a bmap found beside the image that is damaged is not.
    with checking_usage():
        suffix = built_image_suffix(image)
        bmap = read_bmap(args.bmap) if args.bmap else None
    if bmap is None and not args.no_bmap:
        beside = bmap_beside(image)
        if beside is not None:
            bmap = read_bmap(beside)
    size = raw_size(image, suffix)
    if bmap is not None and size is not None and size != bmap.image_size:
        raise BuildError(f"{bmap.path} is for an image of {bmap.image_size} bytes, but "
                         f"{image.name} holds {size}: it belongs to another image (pass the "
                         f"right --bmap, or --no-bmap)")
    if args.verify_only:
        given = [flag for flag, value in (("--hostname", args.hostname),
                                          ("--preseed", args.preseed),
                                          ("--ssh-key", args.ssh_key), ("--wifi", args.wifi),
                                          ("--tls-cert", args.tls_cert),
                                          ("--tls-key", args.tls_key)) if value]
        if given:
            raise UsageError(f"--verify-only writes nothing: drop {', '.join(given)}")
    now = dt.datetime.now(dt.UTC)
    # Before the preseed, which may ask for a Wi-Fi key: a bad file is refused without asking.
    tls = check_given_tls(args.tls_cert, args.tls_key, now)
    preseed = check_preseed(preseed_file=args.preseed, hostname=args.hostname,
                            ssh_keys=args.ssh_key, wifi=args.wifi)
    if tls is not None:
        # Without a hostname of this card's own, the image's is known only once it is on
        # the card (finish_card warns then).
        warn_about(tls, preseed.hostname(), now)
    # Every program is there before the card is wiped: one missing halfway would leave it so.
    programs = [COMPRESSIONS[suffix][0], "blkid"]
    if preseed or tls:
        programs += ["sfdisk", "debugfs", "dumpe2fs"]
    if preseed:
        # Whether the image has a setup drive is known only once it is on the card.
        programs += ["mcopy", "mdir"]
    require_programs(*programs)
    return Request(image=image, suffix=suffix, size=bmap.image_size if bmap else size,
                   bmap=bmap, preseed=preseed, verify=not args.no_verify,
                   verify_only=args.verify_only, tls=tls)


def confirm(request: Request, target: Target) -> None:
    size = human_size(request.size) if request.size else "unknown size"
    mapped = (f", {human_size(request.bmap.mapped)} of it in use"
              if request.bmap else "")
    print(f"About to write {request.image.name} ({size}{mapped}) to\n{target.describe()}",
          file=sys.stderr)
    if request.tls is not None:
        print(f"and {request.tls.describe()}", file=sys.stderr)
    if not sys.stdin.isatty():
        raise UsageError("no terminal to confirm on: pass --yes to write without asking")
    print(f"Everything on {target.path} will be lost. Type yes to go on: ", end="",
          file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    if answer != "yes":
        raise BuildError(f"not confirmed ({answer or 'no answer'!r}): nothing was written")


def _main(args: argparse.Namespace) -> int:
    request = check_request(args)
    target = inspect_target(args.device, force=args.force, writing=not request.verify_only)
    vouched = check_image_checksum(request.image)
    if request.verify_only:
        return _verify_only(request, target)
    request = check_whole(request, vouched)
    check_fits(target, request.size)
    if not args.yes:
        confirm(request, target)
    with opened(target, write=True) as card:
        written = write_card(request, card)
        log.info(f"wrote {human_size(written.bytes)} of {human_size(written.size)} in "
                 f"{written.seconds:.1f} s ({_rate(written.bytes, written.seconds)})"
                 + (f", only the blocks {request.bmap.path.name} lists" if request.bmap else ""))
        finish_card(request, card, written)
        card.reread_partitions()
    log.result(f"{target.path}: ready; put the card in the board and power it")
    return 0


def finish_card(request: Request, card: Card, written: Written) -> None:
    """Verify the card, then personalise it. A card that fails either, or is interrupted
    meanwhile, loses its first MiB again: a card that cannot be trusted must not boot."""
    try:
        if request.verify:
            seconds = verify_card(card.handle, card.target.path, written.checks,
                                  just_written=True)
            log.info(f"verified: the card holds the image ({seconds:.1f} s)")
        if request.preseed or request.tls:
            done = personalise_card(card.handle, request.preseed, request.tls)
            card.sync()
            if done.preseed:
                keys = ", ".join(dict.fromkeys(k for k, _ in request.preseed.lines))
                if done.on_setup_drive:
                    log.info(f"this card's settings ({keys}) are in {done.preseed}, read and "
                             f"wiped at its first boot; until then they are plain text there, "
                             f"which anyone holding the card can read (FAT has no owners)")
                else:
                    log.info(f"this card's settings ({keys}) are in {done.preseed}, readable "
                             f"by root only, and are applied at its first boot")
            if request.tls and done.tls:
                cert, key = done.tls
                log.info(f"your certificate {request.tls.cert_path.name} is in {cert} and its "
                         f"key in {key} (readable by root only): the card installs them at "
                         f"its first boot and removes the key from /boot; SHA-256 "
                         f"fingerprint {request.tls.cert.fingerprint}")
                if request.preseed.hostname() is None and done.hostname:
                    warn_unnamed(request.tls, done.hostname, "the image")
    except BuildError as exc:
        invalidate(card)
        raise type(exc)(f"{exc}; {CARD_LEFT_INVALID}") from None
    except Interrupted:
        invalidate(card)
        log.warn(CARD_LEFT_INVALID)
        raise


def _verify_only(request: Request, target: Target) -> int:
    if request.size is not None and target.size < request.size:
        raise Mismatch(f"{target.path} ({human_size(target.size)}) is smaller than the image "
                       f"({human_size(request.size)}): it cannot hold it")
    if request.bmap is not None and all(r.digest for r in request.bmap.ranges):
        checks = list(request.bmap.ranges)
    else:
        checks = write_card(request, None).checks      # digests of the image, streamed
    with opened(target, write=False) as card:
        seconds = verify_card(card.handle, target.path, checks, just_written=False)
    log.result(f"{target.path} holds {request.image.name} ({seconds:.1f} s)")
    return 0


def _rate(count: int, seconds: float) -> str:
    return f"{human_size(count / seconds)}/s" if seconds > 0 else "-"
