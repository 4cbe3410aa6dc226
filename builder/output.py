"""Where the output is written: the compressed image, its sha256, bmap, manifest, software bill
of materials and log.

Every file is written under a hidden temporary name in the output directory and renamed only
at the very end, all together: a build that fails or is interrupted leaves nothing that looks
finished.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder import log
from builder.cache import key_of
from builder.entry import shielded
from builder.errors import BuildError
from builder.files import locked, sha256_of
from builder.inside import in_root
from builder.ledger import STATE_DIR, Ledger
from builder.mount import work_path
from builder.run import run, spawn

COMPRESSORS: dict[str, tuple[str, list[str]]] = {
    "xz": (".xz", ["xz", "--compress", "--stdout", "--threads=0"]),
    "zstd": (".zst", ["zstd", "--compress", "--stdout", "--quiet", "-T0"]),
    "gzip": (".gz", ["gzip", "--stdout"]),
    "none": ("", []),
}
# The software bill of materials: ".cdx.json" is the name CycloneDX's specification recognises
# for its JSON documents; ".sbom" before it says what it is to whoever does not know that.
SBOM_SUFFIX = ".sbom.cdx.json"


def build_name(product: str, board: str, release: str, day: datetime.date) -> str:
    """The outputs' common name: what, for which board, from which release, built when."""
    return f"{product}-{board}-{release}-{day.strftime('%Y%m%d')}"


def output_suffixes(compression: str) -> list[str]:
    """Every file a build publishes, as suffixes of build_name: the image first."""
    image = ".img" + COMPRESSORS[compression][0]
    return [image, image + ".sha256", ".img.bmap", ".manifest.json", SBOM_SUFFIX, ".build.log"]


@dataclass
class Outputs:
    """The files of one build: final names, and the temporary ones they are written under."""

    directory: Path
    name: str
    compression: str
    pending: dict[Path, Path] = field(default_factory=dict)   # temporary → final
    cleanup: Callable[[Path], object] | None = None

    def add(self, suffix: str) -> Path:
        """The temporary name of a further output, removed unless published."""
        tmp = self.temporary(suffix)
        if self.cleanup is not None:
            self.cleanup(tmp)
        return tmp

    def final(self, suffix: str) -> Path:
        return self.directory / f"{self.name}{suffix}"

    def temporary(self, suffix: str) -> Path:
        """The hidden name a file is written under; it carries the build's pid, so builds
        never share one and a later build can tell a killed build's leftovers."""
        final = self.final(suffix)
        tmp = self.directory / f".{final.name}.{os.getpid()}.partial"
        self.pending[tmp] = final
        return tmp

    @property
    def image_suffix(self) -> str:
        return output_suffixes(self.compression)[0]

    def publish(self) -> list[Path]:
        """Rename every temporary file to its final name; the image itself last but one and
        the checksum last, so a present .sha256 means everything is there."""
        written = [(tmp, final) for tmp, final in self.pending.items() if tmp.exists()]
        order = sorted(written, key=lambda kv: (kv[1].suffix == ".sha256",
                                                kv[1].name.endswith(self.image_suffix)))
        with shielded():
            # An older build's files of the same name go first, its checksum before all:
            # a new image must never sit next to an old .sha256.
            for suffix in (".sha256",):
                for old in self.directory.glob(f"{glob.escape(self.name)}*{suffix}"):
                    old.unlink()
            for _, final in order:
                final.unlink(missing_ok=True)
            for tmp, final in order:
                os.replace(tmp, final)
        self.pending.clear()
        return [final for _, final in order]


@contextmanager
def outputs(ledger: Ledger, directory: Path, name: str, compression: str) -> Iterator[Outputs]:
    """The output files of a build; every temporary one is removed unless published. One
    build at a time writes a given name into a directory."""
    directory.mkdir(parents=True, exist_ok=True)
    sweep_partials(directory)
    result = Outputs(directory, name, compression)
    with ExitStack() as stack:
        # The lock lives in /run, not beside the outputs: nothing but results in --output.
        locks = STATE_DIR / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        if not stack.enter_context(locked(locks / f"{key_of(str(directory / name))}.lock",
                                          wait=False)):
            raise BuildError(f"another build is writing {name} in {directory} right now: "
                             f"wait for it, or use another --output") from None
        for suffix in output_suffixes(compression):
            stack.enter_context(work_path(ledger, result.temporary(suffix)))
        result.cleanup = lambda path: stack.enter_context(work_path(ledger, path))
        yield result


def sweep_partials(directory: Path) -> None:
    """Remove temporary outputs of builds that were killed (their pid is in the name)."""
    for tmp in directory.glob(".*.partial"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            log.info(f"removing {tmp}, left by a build that was killed")
            tmp.unlink(missing_ok=True)


def write_image(raw: Path, out: Outputs, level: int) -> Path:
    """Compress the raw image with every core into its temporary output file."""
    target = out.temporary(out.image_suffix)
    argv = COMPRESSORS[out.compression][1]
    if not argv:
        run(["cp", "--sparse=always", raw, target], capture=True, what="copy the image")
        return target
    argv = [*argv, f"-{level}"]
    size = raw.stat().st_size
    # spawn kills the compressor on an interruption: it would go on using every core for a
    # file nobody wants.
    with open(raw, "rb") as src, open(target, "wb") as dst, \
            log.progress(f"compressing with {out.compression}", size) as bar, \
            spawn(argv, stdin=src, stdout=dst, what="compress the image") as proc:
        seen = 0
        while proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5)
            # The compressor shares our file description of src: its position is progress.
            position = os.lseek(src.fileno(), 0, os.SEEK_CUR)
            bar.update(position - seen)
            seen = position
    return target


def write_checksum(image: Path, out: Outputs) -> None:
    """`<hex>  <name>` for the image as published, which `sha256sum -c` checks."""
    final_name = out.final(out.image_suffix).name
    out.temporary(out.image_suffix + ".sha256").write_text(f"{sha256_of(image)}  {final_name}\n")


def write_bmap(raw: Path, out: Outputs) -> None:
    """A block map of the raw image: bmaptool copy writes only the blocks in use."""
    run(["bmaptool", "create", "--output", out.temporary(".img.bmap"), raw], capture=True,
        what="create the block map (apt-get install bmap-tools)")


def installed_packages(root: Path) -> list[dict[str, str]]:
    """The image's dpkg database, read with the host's dpkg-query (no emulation needed)."""
    admin = in_root(root, "var/lib/dpkg")
    if not admin.is_dir():
        return []
    proc = run(["dpkg-query", f"--admindir={admin}", "--show",
                "--showformat=${Package}\t${Version}\t${Architecture}\t${db:Status-Abbrev}\n"],
               capture=True, what="list the image's packages")
    packages = []
    for line in proc.stdout.decode(errors="replace").splitlines():
        name, version, arch, status = [*line.split("\t"), "", "", ""][:4]
        if status.startswith("ii"):
            packages.append({"name": name, "version": version, "arch": arch})
    return packages


def write_manifest(out: Outputs, manifest: dict[str, Any]) -> None:
    out.temporary(".manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def write_sbom(out: Outputs, document: str) -> str:
    """The SBOM (builder/sbom.py makes it) beside the image; returns the name it is published
    under, for the manifest."""
    out.temporary(SBOM_SUFFIX).write_text(document)
    return out.final(SBOM_SUFFIX).name
