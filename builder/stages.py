"""The step cache: the working image kept after the expensive customize.d scripts, under a key
made of everything the image depends on up to there, so a later build starts from the newest
entry whose key matches and runs only what follows (as osbuild's object store and mkosi's
Incremental= do).

    <cache>/stages/<key>/image.img    the working image after the script (sparse)
    <cache>/stages/<key>/work/        the build's work directory (/tmp/build-image) then
    <cache>/stages/<key>/entry.json   what the entry is, its content digest, when last used
    <cache>/stages/.<key>.<pid>.tmp/  an entry being written; renamed whole when complete
    <cache>/locks/stage-<key>.lock    held while an entry is written or read

An entry is a directory renamed into place only once complete, so a killed build leaves at
most a temporary directory, removed by the next build once nobody holds its lock. An entry
whose image does not match its recorded digest when it is read back is discarded and the
work redone. The least recently used entries go when the stages outgrow cache.stages_size.

How keys are made: see key_of_base and key_of_script.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder import log
from builder.cache import write_atomic
from builder.errors import BuildError
from builder.files import locked, sha256_of

# Raised whenever the builder changes what it does to an image around the scripts in a way
# the modules hashed into every key (CODE_IN_EVERY_KEY) would not show.
FORMAT = 1
# The builder's modules that shape every stage: the chroot session, how scripts run and
# overlays are laid in, how the image is grown, and this file.
CODE_IN_EVERY_KEY = ("chroot.py", "customize.py", "image.py", "stages.py")
BUILDER_DIR = Path(__file__).resolve().parent
CHUNK = 1 << 20
ZEROS = bytes(CHUNK)


def digest_of(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def tree_digest(root: Path, names: Sequence[str] | None = None) -> str:
    """Names, kinds, modes and contents of the files under root (or of the listed names
    under it); a missing name counts as missing, so creating it changes the digest."""
    found: list[Any] = []
    tops = [root / name for name in names] if names is not None else [root]
    for top in tops:
        paths = [top] if not top.is_dir() or top.is_symlink() else \
            [top, *sorted(top.rglob("*"))]
        for path in paths:
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                found.append((relative, "link", os.readlink(path)))
            elif path.is_dir():
                found.append((relative, "dir", path.stat().st_mode & 0o7777))
            elif path.exists():
                found.append((relative, "file", path.stat().st_mode & 0o7777,
                              sha256_of(path)))
            else:
                found.append((relative, "missing"))
    return digest_of(found)


def code_digest(names: Sequence[str]) -> str:
    """The builder's own source files (builder/NAME) that something depends on; a directory
    (NAME/, a subpackage) stands for every Python file under it."""
    files: dict[str, str] = {}
    for name in names:
        path = BUILDER_DIR / name
        sources = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for source in sources:
            files[source.relative_to(BUILDER_DIR).as_posix()] = sha256_of(source)
    return digest_of(files)


def all_code() -> list[str]:
    """What a host script that declares no `code` depends on: all of the builder, each
    module and each subpackage (as NAME/)."""
    return sorted(p.name + "/" if p.is_dir() else p.name for p in BUILDER_DIR.iterdir()
                  if p.suffix == ".py" or (p / "__init__.py").is_file())


def key_of_base(base_digest: str, board: Mapping[str, Any], release: str, headroom: int,
                emulation: Mapping[str, Any]) -> str:
    """What every stage starts from: the base image's content, the board's catalog entry,
    the release, the room added, how programs are emulated (set-aside hooks leave other
    files than hooks that ran) and the builder code around the scripts."""
    return digest_of({"format": FORMAT, "base": base_digest, "board": board,
                      "release": release, "headroom": headroom, "emulation": emulation,
                      "code": code_digest(CODE_IN_EVERY_KEY)})


def key_of_script(previous: str, name: str, content: bytes, settings: Mapping[str, Any],
                  inputs: str, code: str | None) -> str:
    """The state after a script: the state before it, its name and content, the settings
    it is given, the digest of the work files it reads, and for a script that runs on the
    host the digest of the builder code it runs."""
    return digest_of({"previous": previous, "name": name,
                      "content": hashlib.sha256(content).hexdigest(), "settings": settings,
                      "inputs": inputs, "code": code})


def key_of_overlays(previous: str, overlays: str) -> str:
    return digest_of({"previous": previous, "overlays": overlays})


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The ranges of a file that hold data (SEEK_DATA/SEEK_HOLE); all of it where the
    filesystem cannot tell."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:      # only a hole after offset
                return
            if exc.errno == errno.EINVAL:     # no SEEK_DATA here: all data
                yield offset, size
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        offset = end


def copy_image(source: Path, target: Path) -> str:
    """Copy source to target keeping holes: only 1 MiB pieces that are not all zeros are
    written. Returns the digest of the contents, each such piece with its offset, which is
    the same for a file and its copy however their holes lie."""
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(target, "wb") as dst:
        dst.truncate(os.fstat(src.fileno()).st_size)
        for offset, piece in _pieces(src.fileno()):
            digest.update(offset.to_bytes(8, "little") + piece)
            os.pwrite(dst.fileno(), piece, offset)
    # Not synced: an entry the disk lost part of (a power cut) fails its digest when it is
    # read back and is redone; waiting for gigabytes to reach the disk costs more.
    return digest.hexdigest()


def image_digest(source: Path) -> str:
    """What copy_image would return for `source`, without writing a copy: a dry run's way
    to the step cache's keys."""
    digest = hashlib.sha256()
    with open(source, "rb") as src:
        for offset, piece in _pieces(src.fileno()):
            digest.update(offset.to_bytes(8, "little") + piece)
    return digest.hexdigest()


def _pieces(fd: int) -> Iterator[tuple[int, bytes]]:
    """The file's 1 MiB pieces that are not all zeros, with their offsets, in order."""
    size = os.fstat(fd).st_size
    done = -1
    for start, end in _data_ranges(fd, size):
        for offset in range(start - start % CHUNK, end, CHUNK):
            if offset <= done:
                continue
            done = offset
            piece = os.pread(fd, CHUNK, offset)
            if piece != ZEROS[:len(piece)]:
                yield offset, piece


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    script: str
    digest: str
    created: float

    @property
    def image(self) -> Path:
        return self.path / "image.img"

    @property
    def work(self) -> Path:
        return self.path / "work"


class StageCache:
    def __init__(self, root: Path, locks: Path, max_size: int, max_age_days: float) -> None:
        self.root = root
        self.locks = locks
        self.max_size = max_size
        self.max_age = max_age_days * 86400

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.locks.mkdir(parents=True, exist_ok=True)
        self.sweep()

    @contextmanager
    def _lock(self, key: str, *, shared: bool = False,
              wait: bool = True) -> Iterator[bool]:
        """Yields whether the lock was had: without `wait`, False when another build holds
        it (it is writing that entry)."""
        with locked(self.locks / f"stage-{key}.lock", shared=shared, wait=wait) as had:
            yield had

    def sweep(self) -> None:
        """Remove entries half written by builds that were killed: a temporary directory
        whose lock nobody holds is not being written any more."""
        for tmp in self.root.glob(".*.tmp"):
            key = tmp.name[1:].split(".", 1)[0]
            with self._lock(key, wait=False) as had:
                if had:
                    log.info(f"removing {tmp}, a step-cache entry left by a killed build")
                    shutil.rmtree(tmp, ignore_errors=True)

    def lookup(self, key: str) -> Entry | None:
        path = self.root / key
        try:
            data = json.loads((path / "entry.json").read_text())
            entry = Entry(key=key, path=path, script=data["script"], digest=data["digest"],
                          created=float(data["created"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if time.time() - entry.created > self.max_age:
            return None
        return entry

    def restore(self, entry: Entry, image: Path, work: Path) -> bool:
        """Put the entry's image and work directory in place of `image` and `work`. An
        entry that does not match its digest is discarded (False): `image` stays as it was."""
        tmp = image.with_name(f".{image.name}.restoring")
        with self._lock(entry.key, shared=True):
            try:
                digest = copy_image(entry.image, tmp)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                if exc.errno != errno.ENOENT:
                    raise BuildError(f"could not copy the cached stage {entry.path}: "
                                     f"{exc.strerror}") from None
                digest = "missing"
            if digest == entry.digest:
                os.replace(tmp, image)
                shutil.rmtree(work, ignore_errors=True)
                shutil.copytree(entry.work, work, symlinks=True)
                os.utime(entry.path / "entry.json")       # least recently used goes first
                return True
        tmp.unlink(missing_ok=True)
        log.warn(f"the step cache's entry after {entry.script} is damaged (its image does not "
                 f"match its digest): removed, that work is redone")
        self.discard(entry.key)
        return False

    def store(self, key: str, script: str, image: Path, work: Path,
              inputs: Mapping[str, Any], replace: bool = False) -> Entry | None:
        """Keep `image` and `work` as the entry `key` (in place of one there with `replace`).
        Another build writing the same entry is left to it; a full disk or any other failure
        to write leaves no entry and the build goes on without it (said once)."""
        final = self.root / key
        with self._lock(key, wait=False) as had:
            if not had or (not replace and (final / "entry.json").exists()):
                return self.lookup(key)
            tmp = self.root / f".{key}.{os.getpid()}.tmp"
            try:
                tmp.mkdir()
                digest = copy_image(image, tmp / "image.img")
                shutil.copytree(work, tmp / "work", symlinks=True)
                record = {"key": key, "script": script, "digest": digest,
                          "created": time.time(), "inputs": inputs}
                write_atomic(tmp / "entry.json", json.dumps(record, indent=2).encode())
                old = self.root / f".{key}.{os.getpid()}.old.tmp"
                if final.exists():
                    os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                log.warn(f"could not keep the stage after {script} in the step cache "
                         f"({exc.strerror or exc}): the build goes on without it")
                return None
        self.evict()
        return self.lookup(key)

    def discard(self, key: str) -> None:
        with self._lock(key):
            shutil.rmtree(self.root / key, ignore_errors=True)

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last used, bytes on disk, path) of every entry, least recently used first."""
        found = []
        for path in self.root.iterdir() if self.root.is_dir() else []:
            record = path / "entry.json"
            if path.name.startswith(".") or not record.exists():
                continue
            size = sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))
            found.append((record.stat().st_mtime, size, path))
        return sorted(found)

    def evict(self) -> None:
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_size:
                break
            with self._lock(path.name, wait=False) as had:
                if not had:
                    continue
                log.info(f"step cache over {log.human_size(self.max_size)}: removing the "
                         f"least recently used entry {path.name[:12]}")
                shutil.rmtree(path, ignore_errors=True)
                total -= size

    def prune(self) -> int:
        """Remove every entry nobody is using; returns the bytes freed."""
        freed = 0
        for _, size, path in self.entries():
            with self._lock(path.name, wait=False) as had:
                if had:
                    shutil.rmtree(path, ignore_errors=True)
                    freed += size
        self.sweep()
        return freed

