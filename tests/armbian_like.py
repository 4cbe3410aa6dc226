"""An Armbian-like image for an Allwinner H3 board, made from the `--base debian` image: what
the tests build on and boot where Armbian's servers cannot be reached.

What it takes from Armbian (../shared/notes/armbian.md) is what the builder and the first boot
meet on a real Armbian card:
- the boot path: no extlinux.conf, but `boot.scr` (compiled with mkimage) reading
  `armbianEnv.txt` (`rootdev=UUID=`, `console=both`, `verbosity=1`, `extraargs`), a `zImage`
  and `uInitrd` (a U-Boot legacy image) linked to the versioned files, `dtb/` linked to
  `dtb-<version>/`;
- the root filesystem labelled `armbi_root`, `/etc/armbian-release`, the board's hostname;
- the first login: root's password 1234, root logged in automatically on every console, the
  marker `/root/.not_logged_in_yet` and the profile script that starts the first-login
  questions while it exists, root logins over SSH and a host key every card would share;
- command-not-found's apt hook, with a slow stand-in for the database it rebuilds after every
  `apt-get update` (the build must set it aside, and the image must keep it);
- Armbian's services in place of the Debian base's grow-root-filesystem:
  `armbian-resize-filesystem` (grows the root partition and filesystem once, then disables
  itself) and `armbian-firstrun` (new SSH host keys, then disables itself).
The boot script is this project's own, written from Armbian's documented behaviour.
"""

from __future__ import annotations

import shutil
import subprocess
from contextlib import ExitStack
from pathlib import Path

from builder.firstboot.answers import hash_login_password
from builder.image import find_root, read_table
from builder.ledger import Ledger
from builder.mount import loop_device, mounted

ARMBIAN_VERSION = "26.5.1"

# U-Boot's distro boot runs /boot/boot.scr when there is no extlinux.conf. `fdtfile` comes from
# U-Boot's own environment; the addresses are the board's standard ones.
BOOT_CMD = """\
# Armbian-like boot script (tests/armbian_like.py): armbianEnv.txt's settings, then the kernel.
setenv rootdev "/dev/mmcblk0p1"
setenv rootfstype "ext4"
setenv verbosity "1"
setenv console "both"
setenv consoleargs ""
if test -e ${devtype} ${devnum} ${prefix}armbianEnv.txt; then
    load ${devtype} ${devnum} ${scriptaddr} ${prefix}armbianEnv.txt
    env import -t ${scriptaddr} ${filesize}
fi
if test "${console}" = "display" || test "${console}" = "both"; then
    setenv consoleargs "console=tty1"
fi
if test "${console}" = "serial" || test "${console}" = "both"; then
    setenv consoleargs "console=ttyS0,115200 ${consoleargs}"
fi
setenv bootargs "root=${rootdev} rootwait rootfstype=${rootfstype} ${consoleargs}"
setenv bootargs "${bootargs} consoleblank=0 loglevel=${verbosity} ${extraargs}"
load ${devtype} ${devnum} ${fdt_addr_r} ${prefix}dtb/${fdtfile}
load ${devtype} ${devnum} ${ramdisk_addr_r} ${prefix}uInitrd
load ${devtype} ${devnum} ${kernel_addr_r} ${prefix}zImage
bootz ${kernel_addr_r} ${ramdisk_addr_r} ${fdt_addr_r}
"""

RESIZE_SCRIPT = """\
#!/bin/sh
# Armbian-like: grow the root partition and its filesystem to the card's end, once.
set -eu
[ -f /root/.no_rootfs_resize ] && exit 0
root=$(findmnt -no SOURCE /)
name=$(basename "$(readlink -f "$root")")
disk=/dev/$(basename "$(readlink -f "/sys/class/block/$name/..")")
part=$(cat "/sys/class/block/$name/partition")
growpart "$disk" "$part" || [ $? -eq 1 ]
resize2fs "$root"
systemctl disable armbian-resize-filesystem.service
"""
RESIZE_UNIT = """\
[Unit]
Description=Armbian filesystem resize
Before=basic.target
After=sysinit.target local-fs.target
DefaultDependencies=no

[Service]
Type=oneshot
ExecStart=/usr/lib/armbian/armbian-resize-filesystem start
TimeoutStartSec=10min

[Install]
WantedBy=basic.target
"""
FIRSTRUN_SCRIPT = """\
#!/bin/sh
# Armbian-like: the card's own SSH host keys, once.
set -eu
if command -v ssh-keygen >/dev/null; then
    rm -f /etc/ssh/ssh_host_*
    ssh-keygen -A
fi
systemctl disable armbian-firstrun.service
"""
FIRSTRUN_UNIT = """\
[Unit]
Description=Armbian first run tasks
Before=getty.target system-getty.slice

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/lib/armbian/armbian-firstrun start
TimeoutStartSec=2min

[Install]
WantedBy=multi-user.target
"""
FIRSTLOGIN_PROFILE = """\
# Armbian-like: the first-login questions in every interactive login shell until done.
if [ -w /root/.not_logged_in_yet ] && [ -t 0 ]; then
    /usr/lib/armbian/armbian-firstlogin
fi
"""
FIRSTLOGIN_SCRIPT = """\
#!/bin/bash
# Armbian-like first login: asks for a new root password before anything else.
echo "Waiting for system to finish booting ..."
read -r -s -p "Create root password: " password
echo
"""
AUTOLOGIN = ("[Service]\nExecStart=\nExecStart=-/sbin/agetty --noissue --autologin root %I "
             "$TERM\n")


# command-not-found's apt hook as Armbian's images ship it, and a stand-in for the program it
# runs: like cnf-update-db it reads every package list apt fetched and writes a database,
# which under emulation takes a long while. It leaves the time it ran, for the tests.
CNF_HOOK = """## This file is provided by command-not-found
APT::Update::Post-Invoke-Success { "if /usr/bin/test -w /var/lib/command-not-found/ -a -e \
/usr/lib/cnf-update-db; then /usr/lib/cnf-update-db > /dev/null; fi"; };
"""
CNF_UPDATE_DB = """#!/bin/sh
# Stand-in for command-not-found's cnf-update-db (see tests/armbian_like.py).
set -e
db=/var/lib/command-not-found/commands.db
for pass in 1 2 3; do
    cat /var/lib/apt/lists/*_Packages 2>/dev/null \
        | awk '/^Package: / { seen[$2]++ } END { for (name in seen) print name }' \
        | sort > "$db.new"
done
mv "$db.new" "$db"
date >> /var/lib/command-not-found/updated
"""


def make_armbian_like(debian_base: Path, target: Path, board: str, board_name: str,
                      dtb: str) -> Path:
    """`target`: a copy of the Debian base image for `board`, turned Armbian-like."""
    subprocess.run(["cp", "--sparse=always", str(debian_base), str(target)], check=True)
    ledger = Ledger()
    mountpoint = target.with_name(f"{target.name}.root")
    with ExitStack() as stack:
        part = find_root(ledger, target, read_table(target)).partition
        device = stack.enter_context(loop_device(ledger, target, part.start, part.size))
        root = stack.enter_context(mounted(ledger, device, mountpoint, fstype="ext4"))
        _make_boot(root, dtb)
        _make_system(root, board, board_name)
    mountpoint.rmdir()
    _relabel(target, part.start)
    return target


def _relabel(image: Path, offset: int) -> None:
    """Armbian's root label, written with debugfs into the superblock (no loop device)."""
    subprocess.run(["debugfs", "-w", "-R", "set_super_value volume_name armbi_root",
                    f"{image}?offset={offset}"], check=True, capture_output=True)


def _make_boot(root: Path, dtb: str) -> None:
    boot = root / "boot"
    versions = sorted(p.name.removeprefix("vmlinuz-") for p in boot.glob("vmlinuz-*"))
    version = versions[-1]
    (boot / "zImage").symlink_to(f"vmlinuz-{version}")
    subprocess.run(["mkimage", "-A", "arm", "-O", "linux", "-T", "ramdisk", "-C", "gzip",
                    "-n", "uInitrd", "-d", str(boot / f"initrd.img-{version}"),
                    str(boot / f"uInitrd-{version}")], check=True, capture_output=True)
    (boot / "uInitrd").symlink_to(f"uInitrd-{version}")
    dtbs = boot / f"dtb-{version}"
    dtbs.mkdir()
    # Armbian ships every device tree of the family, the board's named by fdtfile.
    for tree in (root / f"usr/lib/linux-image-{version}").glob("sun8i-h*.dtb"):
        shutil.copy(tree, dtbs / tree.name)
    assert (dtbs / Path(dtb).name).is_file(), dtb
    (boot / "dtb").symlink_to(f"dtb-{version}")
    shutil.rmtree(boot / "extlinux")
    uuid = (root / "etc/fstab").read_text().split()[0].removeprefix("UUID=")
    (boot / "armbianEnv.txt").write_text(
        f"verbosity=1\nbootlogo=false\nconsole=both\ndisp_mode=1920x1080p60\n"
        f"overlay_prefix=sun8i-h3\nrootdev=UUID={uuid}\nrootfstype=ext4\n"
        f"usbstoragequirks=0x2537:0x1066:u,0x2537:0x1068:u\n")
    (boot / "boot.cmd").write_text(BOOT_CMD)
    subprocess.run(["mkimage", "-C", "none", "-A", "arm", "-T", "script", "-d",
                    str(boot / "boot.cmd"), str(boot / "boot.scr")], check=True,
                   capture_output=True)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _make_system(root: Path, board: str, board_name: str) -> None:
    etc = root / "etc"
    _write(etc / "armbian-release",
           f"BOARD={board}\nBOARD_NAME=\"{board_name}\"\nBOARDFAMILY=sun8i\n"
           f"LINUXFAMILY=sunxi\nARCH=arm\nIMAGE_TYPE=stable\nVERSION={ARMBIAN_VERSION}\n")
    _write(etc / "hostname", f"{board}\n")
    _write(etc / "hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{board}\n"
                          f"::1\t\tlocalhost ip6-localhost ip6-loopback\n")
    # Armbian's services in place of the Debian base's own resize.
    (etc / "systemd/system/multi-user.target.wants/grow-root-filesystem.service").unlink()
    (etc / "systemd/system/grow-root-filesystem.service").unlink()
    (root / "usr/local/sbin/grow-root-filesystem").unlink()
    lib = root / "usr/lib/armbian"
    _write(lib / "armbian-resize-filesystem", RESIZE_SCRIPT, 0o755)
    _write(lib / "armbian-firstrun", FIRSTRUN_SCRIPT, 0o755)
    _write(lib / "armbian-firstlogin", FIRSTLOGIN_SCRIPT, 0o755)
    units = root / "usr/lib/systemd/system"
    _write(units / "armbian-resize-filesystem.service", RESIZE_UNIT)
    _write(units / "armbian-firstrun.service", FIRSTRUN_UNIT)
    for unit, target in (("armbian-resize-filesystem", "basic"),
                         ("armbian-firstrun", "multi-user")):
        wants = etc / f"systemd/system/{target}.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / f"{unit}.service").symlink_to(f"/usr/lib/systemd/system/{unit}.service")
    _write(etc / "apt/apt.conf.d/50command-not-found", CNF_HOOK)
    _write(root / "usr/lib/cnf-update-db", CNF_UPDATE_DB, 0o755)
    (root / "var/lib/command-not-found").mkdir(parents=True, exist_ok=True)
    # The first login, as shipped.
    _write(root / "root/.not_logged_in_yet", "")
    _write(etc / "profile.d/armbian-check-first-login.sh", FIRSTLOGIN_PROFILE)
    for getty in ("getty@.service.d", "serial-getty@.service.d"):
        _write(etc / "systemd/system" / getty / "override.conf", AUTOLOGIN)
    shadow = etc / "shadow"
    lines = shadow.read_text().splitlines()
    root_hash = hash_login_password("1234")
    shadow.write_text("".join((f"root:{root_hash}:20000:0:99999:7:::" if line.startswith("root:")
                               else line) + "\n" for line in lines))
    _write(etc / "ssh/sshd_config", "Include /etc/ssh/sshd_config.d/*.conf\n"
                                    "PermitRootLogin yes\nUsePAM yes\n")
    _write(etc / "ssh/ssh_host_ed25519_key", "a key every card would share\n", 0o600)
