"""Build a Jupyter scientific workstation image from an Armbian image for Orange Pi boards.

Three commands, each importing its own modules and the shared floor only:

build-image (cli.py), its steps in order in pipeline.py:
  config.py, defaults.yaml   settings: defaults, --config files, --set, validated up front
  config_values.py           what each setting's value may be
  boards.py, boards.yaml     the Orange Pi board catalog
  preflight.py               everything checked before the first download
  plan.py                    the dry run's plan
  armbian.py, download.py    which Armbian image to start from (Armbian's index), HTTP
  fetch.py, verify.py,       where the base image is downloaded, verified (keys/: Armbian's
  cache.py, debian.py        signing key), decompressed and cached; a Debian base made with
                             debootstrap
  image.py, ext4.py          partition table, root partition, grow and shrink; dumpe2fs
  setup_partition.py         the FAT drive after the root people edit after flashing
  mount.py, ledger.py        loop devices and mounts; the record that undoes a killed build
  chroot.py, customize.py    where scripts run (qemu-user chroot, namespaces of their own)
                             and overlays are laid in
  inside.py, hostbin/        every path inside the image resolved inside it (image-path)
  stages.py, wheels.py       the step cache; wheels chosen on the host for the image
  output.py, sbom.py         the compressed image, checksum, bmap, manifest, CycloneDX SBOM
  firstboot/                 what the card runs at first boot (shipped as one zipapp)
try-image (tryimage.py): qemu.py; the smoke in smoke.py with serial_console.py,
  guest_shell.py (logged in on the guest's console), pinning.py (the card's certificate,
  pinned to the fingerprint its console shows), jupyter_client.py, browser.py,
  smoke_report.py
flash-image: flash/ (its __init__ is the map)
The floor: entry.py (errors, signals, exit codes), errors.py, log.py, run.py (host programs),
  files.py (sha256, locks), compression.py, preseed.py (a --preseed file, checked)
The manual's generated parts: manual.py (docs/: the settings and board tables), manpage.py
  (docs/man/: a page per command, from its parser)
"""

__version__ = "0.1.0"
