"""flash-image: an image made by build-image onto a card, checked and personal.

The package's map:

- cli: the command line and the steps in their order (check_request, confirm, finish_card).
- bmap: the .bmap format (bmaptool's 1.0 to 2.x): the ranges in use and their checksums.
- source: the image file: its .sha256, its raw size (raw_size, measure_raw_size), whether it
  is whole (check_whole) and its raw bytes streamed through the decompressor.
- device: the card: what DEVICE is and every reason not to write to it (inspect_target),
  opening it exclusively and checked to be the one shown (opened), writes with bounded
  writeback (Card).
- write: the streaming writer (write_card) and the O_DIRECT verifier (verify_card).
- personalise: this card's preseed lines, assembled and checked (check_preseed), and
  written onto the card (personalise_card): into the setup drive's jupyter-firstboot.conf with
  mtools (builder/setup_partition.py), or, on an image without that drive, into its ext4 root
  with debugfs; the user's own TLS certificate and key into /boot.
- certificate: the user's own TLS certificate and key for this card (--tls-cert, --tls-key),
  read and checked with the card's own rules (check_given_tls) and shown by fingerprint.

The steps, in order; everything that can be refused is refused before the card is touched:

1. check_request: the image, its .bmap, the per-card settings (the exact preseed lines, read
   by the wizard's parser; the certificate and key: PEM, no passphrase, the key the
   certificate's, valid now; a warning when it does not name the hostname or ends within 30
   days) and the programs needed.
2. inspect_target: what DEVICE is, and every reason not to write to it (a partition, mounted,
   the running system's disk, swap, in use, read-only, no medium, not removable).
3. check_image_checksum, check_whole and check_fits: the image against its .sha256; an image
   nothing vouches for (no .sha256) decompressed once, front to back, so that a truncated,
   corrupt or empty file, or one whose size is not its bmap's or index's, is refused before
   the card is opened (a .zst or .gz without bmap is decompressed once to learn its size);
   the size against the card's.
4. confirm: the card's model, size and partitions, the user's certificate (its names and
   SHA-256 fingerprint, to compare with the browser's later), and a typed "yes".
5. opened: the card, exclusively, checked to be the one shown.
6. write_card: the card's first MiB is zeroed and synced first, then the image is written
   without its first MiB (only the bmap's ranges when there is one, each checked against the
   bmap as it streams), synced, and the first MiB comes last. A card interrupted at any point
   has no partition table and cannot boot as a half-written system.
7. finish_card: verify_card reads what was written back from the card itself (O_DIRECT, not
   the page cache) and compares it with the bmap's checksums or digests taken while writing;
   personalise_card writes this card's preseed lines into jupyter-firstboot.conf on the card's
   setup drive (the FAT partition after the root), after the template's comments, CRLF, read
   back: at first boot the card merges them over the image's preseed, as it does a file
   someone filled in on Windows. An image without a setup drive gets them in the
   ext4 root's /boot/jupyter-firstboot.conf with debugfs, merged here with any the image
   carries. The user's certificate and key go into /boot either way (jupyter-tls.crt, 0644;
   jupyter-tls.key, 0600). If any of it fails, the first MiB is zeroed again; so too when
   the image turns out to serve plain HTTP, which --tls-cert cannot change (an image's
   settings are known only once it is on the card).
8. The kernel re-reads the card's partition table.

The card is held with O_EXCL and a BSD lock throughout: systemd-udevd does not probe or re-read
a disk that is locked (systemd's block device locking), so no automounter grabs a half-written
card.
"""

# The console script flash-image is `builder.flash:main`, also in installs made before this
# was a package.
from builder.flash.cli import main

__all__ = ["main"]
