"""`--base debian`: a bootable base image made from Debian's own packages.

For users who cannot reach Armbian's servers, and as the tests' base. The layout is
Armbian's: an MBR, one ext4 root partition from 4 MiB holding /boot, U-Boot at 8 KiB.
Inside: Debian trixie (debootstrap, run under qemu-user-static), Debian's kernel, Debian's
U-Boot for the board, and an extlinux.conf that U-Boot's distro boot reads.

Debian builds U-Boot for a few Orange Pi boards only (u-boot-sunxi); BOARDS lists them.
Building takes minutes under emulation (debootstrap, the kernel, its initramfs), so the result
is cached, keyed by everything that went into it.

Trust: the mirror is plain http, so what it serves counts only as far as Debian's archive key
vouches for it. debootstrap checks the release's Release file against the key (and every
package against the Release file), and refuses to go on without the keyring; the image's apt
checks the same key (Signed-By) for everything installed after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from builder import log
from builder.boards import Board
from builder.cache import Cache, CachedImage
from builder.chroot import Chroot, Emulation, choose_emulation, chroot_session
from builder.errors import BuildError
from builder.inside import entry_in_root, in_root, remove_entry, write_file
from builder.ledger import Ledger
from builder.mount import work_path
from builder.run import host_env, require_programs, run, stream

RELEASES = ("trixie",)
# The keys Debian signs its releases with (debian-archive-keyring), for every release in
# RELEASES: trixie's Release file carries signatures by keys that bookworm's package
# (2023.3+deb12u2) already holds, so a bookworm host checks it too.
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# Raised whenever the recipe below changes what it produces: the cache key includes it.
RECIPE = 2
ROOT_LABEL = "debian_root"
ROOT_OFFSET = 4 << 20
UBOOT_OFFSET = 8 << 10


@dataclass(frozen=True)
class DebianBoard:
    uboot: str          # the board's directory in u-boot-sunxi: /usr/lib/u-boot/<uboot>/
    dtb: str            # under /usr/lib/linux-image-<version>/
    kernel: str         # Debian's kernel flavour package
    modules: tuple[str, ...] = ("sunxi-mmc", "mmc_block", "ext4")


# arm64 boards are tried on QEMU's virt machine (try-image), whose disk is virtio: with its
# driver in the initrd (30 KiB) the image a board boots is the image QEMU boots.
ARM64_MODULES = ("sunxi-mmc", "mmc_block", "ext4", "virtio_blk")

BOARDS: dict[str, DebianBoard] = {
    "orangepizero": DebianBoard("orangepi_zero", "sun8i-h2-plus-orangepi-zero.dtb",
                                "linux-image-armmp"),
    "orangepipcplus": DebianBoard("orangepi_pc_plus", "sun8i-h3-orangepi-pc-plus.dtb",
                                  "linux-image-armmp"),
    "orangepiplus": DebianBoard("orangepi_plus", "sun8i-h3-orangepi-plus.dtb",
                                "linux-image-armmp"),
    "orangepioneplus": DebianBoard("orangepi_one_plus",
                                   "allwinner/sun50i-h6-orangepi-one-plus.dtb",
                                   "linux-image-arm64", ARM64_MODULES),
    "orangepizeroplus2-h5": DebianBoard("orangepi_zero_plus2",
                                        "allwinner/sun50i-h5-orangepi-zero-plus2.dtb",
                                        "linux-image-arm64", ARM64_MODULES),
}

# What a bootable, networked, apt-able system needs beyond debootstrap's minbase.
PACKAGES = ("systemd-sysv", "udev", "kmod", "initramfs-tools", "e2fsprogs", "iproute2",
            "ca-certificates", "systemd-resolved", "cloud-guest-utils")

# The image is as small as its contents; at first boot the root partition and filesystem
# grow to the whole card (Armbian images do this with armbian-resize-filesystem).
GROW_SCRIPT = """#!/bin/sh
# Grows the root partition and its ext4 filesystem to the end of the card, once.
set -eu
root=$(findmnt -no SOURCE /)
name=$(basename "$(readlink -f "$root")")
disk=/dev/$(basename "$(readlink -f "/sys/class/block/$name/..")")
part=$(cat "/sys/class/block/$name/partition")
growpart "$disk" "$part" || [ $? -eq 1 ]   # 1: already as large as it can be
resize2fs "$root"
touch /var/lib/grow-root-filesystem.done
"""
GROW_UNIT = """[Unit]
Description=Grow the root filesystem to the whole card
ConditionPathExists=!/var/lib/grow-root-filesystem.done
After=local-fs.target
Before=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/grow-root-filesystem

[Install]
WantedBy=multi-user.target
"""


def supported(board: Board, release: str) -> DebianBoard:
    if board.id not in BOARDS:
        raise BuildError(f"--base debian is offered for boards Debian ships U-Boot for: "
                         f"{', '.join(BOARDS)}; {board.id} is not one (use --base armbian)")
    if release not in RELEASES:
        raise BuildError(f"--base debian builds {', '.join(RELEASES)}, not {release}: "
                         f"pass --release {RELEASES[0]}")
    return BOARDS[board.id]


def check_host() -> None:
    """What building a Debian base needs on the host to check what the mirror serves: called
    before anything is downloaded (preflight's host checks, and build_base)."""
    if not KEYRING.is_file():
        raise BuildError(f"{KEYRING} not found: --base debian trusts the mirror only as far "
                         f"as Debian's archive keys in it vouch for what it serves; install it "
                         f"with: apt-get install debian-archive-keyring (or sudo ci/setup-host)")
    # debootstrap checks the Release file's signature with gpgv, and so does _untrusted.
    require_programs("debootstrap", "gpgv")


def cache_key(board: Board, release: str, mirror: str) -> str:
    recipe = {"recipe": RECIPE, "board": board.id, "arch": board.arch, "release": release,
              "debian": BOARDS[board.id].__dict__, "packages": PACKAGES, "mirror": mirror,
              "console": [board.console.device, board.console.baud]}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def label(board: Board, release: str) -> str:
    return f"Debian {release} for {board.name} (U-Boot {BOARDS[board.id].uboot})"


def build_base(board: Board, release: str, mirror: str, cache: Cache,
               ledger: Ledger, emulation: Emulation | None = None) -> CachedImage:
    """The cached Debian base for `board`, built first if there is none. The CPU model
    emulated does not change what is built, so it is not part of the key."""
    check_host()
    key = cache_key(board, release, mirror)
    cache.prepare()
    with cache.lock(key, f"the Debian base for {board.id}"):
        entry = cache.image(key)
        if entry is not None:
            log.info(f"Debian base in cache: {entry.path}")
            return entry
        work = cache.root / "work"
        work.mkdir(parents=True, exist_ok=True)
        workspace = Path(tempfile.mkdtemp(prefix=f"build-{os.getpid()}-debian-", dir=work))
        with work_path(ledger, workspace):
            rootfs = workspace / "rootfs"
            emulation = emulation or choose_emulation(board.arch)
            _bootstrap(board, release, mirror, rootfs, emulation)
            uuid_ = str(uuid.uuid4())
            uboot = _install_system(board, release, mirror, rootfs, uuid_, ledger, cache,
                                    emulation)
            final = cache.image_path(key)
            tmp = final.with_name(f".{final.name}.tmp")
            try:
                _make_image(rootfs, tmp, uboot, uuid_)
                stat = tmp.stat()
                entry = CachedImage(path=final, sha256=key, source=f"debian:{board.id}",
                                    filename=final.name, raw_size=stat.st_size,
                                    raw_mtime_ns=stat.st_mtime_ns, signature=None)
                os.replace(tmp, final)
                cache.store_image(entry)
            finally:
                tmp.unlink(missing_ok=True)
    log.info(f"Debian base ready: {entry.path}")
    return entry


def _bootstrap(board: Board, release: str, mirror: str, rootfs: Path,
               emulation: Emulation) -> None:
    log.info(f"debootstrap {release} {board.arch} from {mirror} (a few minutes under qemu)")
    argv = debootstrap_argv(board, release, mirror, rootfs)
    # Asked to stop with SIGTERM, not killed, on an interruption: debootstrap's exit trap
    # unmounts the proc and sys it mounted in the target.
    try:
        # debootstrap's second stage runs the image's programs: the CPU model reaches them
        # through its environment (host programs ignore it).
        stream(argv, env=host_env(emulation.env), prefix="debootstrap",
               what=f"debootstrap of {release} {board.arch}", stop=signal.SIGTERM)
    except BuildError as exc:
        # debootstrap exits 1 whatever went wrong, and its message goes by with its other
        # output: the Release file it refused is still in the target, judged here again.
        problem = _untrusted(rootfs / "var/lib/apt/lists", release)
        if problem:
            reason, fix = problem
            raise BuildError(f"the Release file of {release} on {mirror} is not signed by "
                             f"Debian's archive key ({reason}): {fix}") from None
        raise BuildError(f"{exc}: check the mirror {mirror} (base.debian_mirror) and the "
                         f"network") from None


def debootstrap_argv(board: Board, release: str, mirror: str, rootfs: Path) -> list[str]:
    # --keyring names the keys instead of leaving them to debootstrap's script for the
    # release, and --force-check-gpg makes checking them a must: by default, a script that
    # names no keyring, or one the host lacks, gets a warning ("Cannot check Release
    # signature"), after which debootstrap takes whatever the mirror serves.
    return ["debootstrap", f"--arch={board.arch}", "--variant=minbase",
            f"--keyring={KEYRING}", "--force-check-gpg",
            f"--include={','.join(PACKAGES[:5])}", release, str(rootfs), mirror]


def _untrusted(lists: Path, release: str) -> tuple[str, str] | None:
    """Why the Release file debootstrap fetched into `lists` does not carry Debian's
    signature, and the fix; None if it does, or if debootstrap stopped before fetching it.
    Judged as debootstrap judges it: gpgv against KEYRING, good if any signature is valid."""
    unsigned = ("the mirror serves it without a signature", "use a Debian mirror "
                "(base.debian_mirror)")
    found = sorted(lists.glob(f"*_dists_{release}_Release")) if lists.is_dir() else []
    if not found:
        inline = sorted(lists.glob(f"*_dists_{release}_InRelease")) if lists.is_dir() else []
        # An InRelease that is no signed message leaves debootstrap no Release to split off.
        if inline and b"-----BEGIN PGP SIGNED MESSAGE-----" not in inline[0].read_bytes():
            return unsigned
        return None
    release_file = found[0]
    signature = release_file.with_name(release_file.name + ".gpg")
    if not signature.is_file():
        return unsigned
    status = run(["gpgv", "--status-fd", "1", "--keyring", KEYRING, "--ignore-time-conflict",
                  signature, release_file], capture=True, check=False).stdout
    words = [line.split()[1:3] for line in status.decode(errors="replace").splitlines()
             if line.startswith("[GNUPG:] ") and len(line.split()) >= 3]
    if any(keyword == "VALIDSIG" for keyword, _ in words):
        return None
    if any(keyword == "BADSIG" for keyword, _ in words):
        return ("its signature does not match it: it was changed after Debian signed it, on "
                "the mirror or on the way", "use another mirror (base.debian_mirror)")
    keys = [key for keyword, key in words if keyword == "NO_PUBKEY"]
    if keys:
        return (f"it is signed by key {keys[0]}, which {KEYRING} does not hold",
                f"use a Debian mirror (base.debian_mirror), or update the host's keyring "
                f"if it predates {release}: apt-get install debian-archive-keyring")
    return (f"gpgv could not check it against {KEYRING}",
            "reinstall them: apt-get install --reinstall gpgv debian-archive-keyring")


def _install_system(board: Board, release: str, mirror: str, rootfs: Path, root_uuid: str,
                    ledger: Ledger, cache: Cache, emulation: Emulation) -> bytes:
    """Kernel, initramfs, boot configuration, network; returns U-Boot's binary."""
    debian = BOARDS[board.id]

    def at(inside: str) -> Path:
        # Debian's packages made this tree, but the builder still resolves every path in it
        # as the image does (builder/inside.py): nothing it writes follows a link out.
        return in_root(rootfs, inside)

    def write(inside: str, text: str, mode: int = 0o644) -> None:
        path = entry_in_root(rootfs, inside)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, text.encode(), mode)

    apt_cache = cache.root / "apt" / f"{release}-{board.arch}"
    apt_cache.mkdir(parents=True, exist_ok=True)
    # debootstrap leaves its packages in the image: into the host's apt cache with them,
    # where the next build finds them, instead of shipping them in every image.
    for deb in at("var/cache/apt/archives").glob("*.deb"):
        shutil.move(deb, apt_cache / deb.name)
    remove_entry(entry_in_root(rootfs, "etc/apt/sources.list"))
    # The release alone: its point releases carry the stable updates. {release}-updates is
    # small and changes daily, and mirrors were seen serving it half-synced for hours, which
    # fails every apt-get update; a customize script can add it where the mirror is sound.
    write("etc/apt/sources.list.d/debian.sources", sources(mirror, release))
    # Before the kernel: an initramfs with only the modules that reach the root filesystem
    # takes seconds to make under emulation instead of minutes, and still boots (MODULES=most
    # has been seen to leave out the MMC driver altogether).
    conf = at("etc/initramfs-tools/initramfs.conf")
    text = conf.read_text() if conf.is_file() else ""
    write("etc/initramfs-tools/initramfs.conf",
          "\n".join(line for line in text.splitlines()
                    if not line.startswith("MODULES=")) + "\nMODULES=list\n")
    write("etc/initramfs-tools/modules", "\n".join(debian.modules) + "\n")
    write("etc/hostname", "orangepi\n")
    write("etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\torangepi\n"
                       "::1\t\tlocalhost ip6-localhost ip6-loopback\n")
    write("etc/fstab", f"UUID={root_uuid}\t/\text4\tdefaults,noatime\t0\t1\n")
    write("etc/systemd/network/20-wired.network",
          "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n")
    write("usr/local/sbin/grow-root-filesystem", GROW_SCRIPT, 0o755)
    write("etc/systemd/system/grow-root-filesystem.service", GROW_UNIT)
    with chroot_session(ledger, rootfs, board.arch, apt_cache=apt_cache, apt_proxy=None,
                        env={}, emulation=emulation) as session:
        _apt_update(session)
        session.run(["apt-get", "install", "-q", "-y", "--no-install-recommends",
                     debian.kernel, *PACKAGES[5:]], prefix="apt",
                    what=f"install {debian.kernel}")
        session.run(["systemctl", "enable", "systemd-networkd", "grow-root-filesystem"],
                    prefix="systemctl", what="enable systemd-networkd")
        session.run(["sh", "-c", "cd /tmp && apt-get download -q u-boot-sunxi"],
                    prefix="apt", what="download u-boot-sunxi")
        debs = list(at("tmp").glob("u-boot-sunxi_*.deb"))
        if not debs:
            raise BuildError("u-boot-sunxi was not downloaded")
        uboot = _extract_uboot(debs[0], debian.uboot)
    versions = sorted(p.name.removeprefix("vmlinuz-") for p in at("boot").glob("vmlinuz-*"))
    if not versions:
        raise BuildError(f"{debian.kernel} installed no kernel in /boot")
    version = versions[-1]
    dtb = f"/usr/lib/linux-image-{version}/{debian.dtb}"
    if not at(dtb).exists():
        raise BuildError(f"the kernel {version} has no device tree {debian.dtb}")
    console = f"{board.console.device},{board.console.baud}"
    write("boot/extlinux/extlinux.conf",
          "# U-Boot's distro boot reads this file. Written by build-image --base debian.\n"
          "default debian\ntimeout 1\n\nlabel debian\n"
          f"  kernel /boot/vmlinuz-{version}\n  initrd /boot/initrd.img-{version}\n"
          f"  fdt {dtb}\n  append root=UUID={root_uuid} rootwait rw console={console}\n")
    write("etc/machine-id", "", 0o444)
    return uboot


def sources(mirror: str, release: str) -> str:
    """The image's apt source: the mirror, trusted for what Debian's archive keys signed (the
    image's own debian-archive-keyring), as debootstrap trusted it; never `Trusted: yes`."""
    return (f"Types: deb\nURIs: {mirror}\nSuites: {release}\nComponents: main\n"
            f"Signed-By: {KEYRING}\n")


def _apt_update(session: Chroot, attempts: int = 4) -> None:
    """apt-get update, again when it fails: Debian's mirrors now and then serve an index of
    the wrong size while they sync ("Mirror sync in progress?"), which passes in a minute."""
    for attempt in range(1, attempts + 1):
        try:
            session.run(["apt-get", "update", "-q", "--error-on=any"], prefix="apt",
                        what="apt-get update")
            return
        except BuildError:
            if attempt == attempts:
                raise
            log.warn(f"apt-get update failed; trying again in {15 * attempt} s "
                     f"(attempt {attempt + 1} of {attempts})")
            time.sleep(15 * attempt)


def _extract_uboot(deb: Path, target: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="build-image-uboot-") as tmp:
        run(["dpkg-deb", "--extract", deb, tmp], capture=True, what=f"unpack {deb.name}")
        binary = Path(tmp) / "usr/lib/u-boot" / target / "u-boot-sunxi-with-spl.bin"
        if not binary.exists():
            raise BuildError(f"{deb.name} has no U-Boot for {target}")
        return binary.read_bytes()


def _make_image(rootfs: Path, image: Path, uboot: bytes, root_uuid: str) -> None:
    """MBR, root from 4 MiB to the end, filled from the directory without a loop device;
    U-Boot at 8 KiB, in the gap before the partition."""
    used = int(run(["du", "-s", "--block-size=1M", "--one-file-system", rootfs],
                   capture=True).stdout.split()[0])
    size_mib = (ROOT_OFFSET >> 20) + used + used // 4 + 128
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    run(["sfdisk", "--quiet", image], input=f"label: dos\nstart={ROOT_OFFSET // 512}, "
        f"type=83, bootable\n".encode(), capture=True, what="partition the Debian base")
    size_k = ((size_mib << 20) - ROOT_OFFSET) // 1024
    run(["mkfs.ext4", "-q", "-L", ROOT_LABEL, "-U", root_uuid, "-d", rootfs, "-E",
         f"offset={ROOT_OFFSET}", image, f"{size_k}k"], capture=True,
        what="make the root filesystem")
    if UBOOT_OFFSET + len(uboot) > ROOT_OFFSET:
        raise BuildError("U-Boot does not fit before the root partition")
    with open(image, "r+b") as f:
        f.seek(UBOOT_OFFSET)
        f.write(uboot)
