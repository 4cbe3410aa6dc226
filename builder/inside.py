"""Paths inside the image, resolved the way the image itself would resolve them.

The image is untrusted input: any of its directories may be a symbolic link, and an absolute
link (`/usr/lib -> /usr/lib/x`, or a hostile `/tmp -> /home/someone`) means the image's own
path when the image runs, but the host's when the builder follows it from outside. Every read
and write the builder makes under a mounted root goes through `in_root` (or `entry_in_root`
for an entry that is itself replaced or removed), so a link can never lead it to the host.

Nothing of the image runs while the builder resolves and then writes (chroot sessions run
their programs to completion first), so resolving and acting need no openat2.

Host scripts (customize.d/*.host) get the same guarantee from the `image-path` command on
their PATH, which prints the host path of image paths:

    install -m 0644 my.conf "$(image-path /etc/my.conf)"

Run as `python -m builder.inside PATH...` with IMAGE_ROOT set, it is that command.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from builder.errors import BuildError

# More links than this on one path is a loop (Linux's own limit is 40).
MAX_LINKS = 40


def in_root(root: Path, path: str) -> Path:
    """The host path of `path` inside the image, following symlinks the way the image itself
    would: an absolute link (Debian's /var/run -> /run) points into the image, never at the
    host; `..` stops at the root. A part that does not exist yet is taken as it is named."""
    parts = [p for p in path.split("/") if p and p != "."]
    current = root
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > MAX_LINKS:
                raise BuildError(f"{path}: too many levels of symbolic links in the image")
            link = os.readlink(candidate)
            parts = [p for p in link.split("/") if p and p != "."] + parts
            if link.startswith("/"):
                current = root
            continue
        current = candidate
    resolved = os.path.normpath(current)
    if not (resolved == str(root) or resolved.startswith(str(root).rstrip("/") + "/")):
        raise BuildError(f"{path} leads outside the image")
    return Path(resolved)


def entry_in_root(root: Path, path: str) -> Path:
    """The host path of the directory entry `path` names in the image: its directory resolved
    as in_root does, its last part not followed (a symlink there is the thing itself, to be
    read, replaced or removed)."""
    parent, _, name = path.strip("/").rpartition("/")
    if name in ("", ".", ".."):
        raise BuildError(f"{path}: not a file's path in the image")
    return in_root(root, parent) / name


def write_file(entry: Path, data: bytes, mode: int) -> None:
    """Write `data` as a new file at `entry` (from entry_in_root), whatever was there: a file
    or a symlink is replaced, never written through. A directory there is an error."""
    remove_entry(entry)
    fd = os.open(entry, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        # The build runs as root; the image's files belong to root, whoever ran a test.
        if os.geteuid() == 0:
            os.fchown(fd, 0, 0)
        # fchmod after fchown: chown clears the setuid and setgid bits.
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def remove_entry(entry: Path) -> None:
    """Remove a file or symlink at `entry` (not what a symlink points to); nothing there is
    fine; a directory is an error naming it."""
    try:
        st = os.lstat(entry)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise BuildError(f"{entry} is a directory in the image where a file belongs: the "
                         f"image is not what the builder expects")
    os.unlink(entry)


def main(argv: list[str] | None = None) -> int:
    """image-path PATH...: the host path of each image PATH, one per line."""
    args = sys.argv[1:] if argv is None else argv
    root = os.environ.get("IMAGE_ROOT")
    if not root or not args or any(a.startswith("-") for a in args):
        print("usage: image-path PATH... (in a customize.d host script, with IMAGE_ROOT set): "
              "prints the host path of each PATH inside the image", file=sys.stderr)
        return 2
    try:
        for path in args:
            print(in_root(Path(root), path))
    except BuildError as exc:
        print(f"image-path: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
