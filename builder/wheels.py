"""Wheels for the image's Python, chosen and downloaded on the host.

pip inside the image is slow (every byte of it runs under emulation), cannot use the host's
index, proxy or CA settings, and would compile anything without a wheel for hours. So pip
runs here, on the host, for the image's platform, and the chroot only installs files:

1. 30-describe-python.chroot writes what the image's Python is (version, CPU, glibc) and
   which distributions Debian's packages installed: python.json.
2. Compiled distributions from Debian are held at Debian's version: PyPI has no armv7l wheels
   of them, and a second copy in the venv would shadow the one Debian's other packages were
   built against. pip's resolver is offered each as a placeholder wheel (metadata only) and a
   `name==version` constraint; the venv then sees Debian's copy through its system site.
3. pip resolves packages.pip for the target (`pip install --dry-run --report`, wheels only,
   the host's pip configuration), then downloads what it chose into the cache, where a wheel
   is kept by its file name: name, version and platform.
4. The lock (`name==version --hash=sha256:...`) and those wheels go to /tmp/build-image for
   40-create-venv.chroot, which installs exactly them with `--no-index --require-hashes`.

`python -m builder.wheels` is what customize.d/35-download-wheels.host runs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder import log
from builder.errors import BuildError
from builder.run import run

# The Python and glibc of each release's own packages, for the check before the first
# download; the build itself reads them from the image.
RELEASES: dict[str, tuple[str, tuple[int, int]]] = {
    "bookworm": ("3.11", (2, 36)),
    "trixie": ("3.13", (2, 41)),
    "jammy": ("3.10", (2, 35)),
    "noble": ("3.12", (2, 39)),
}
MACHINES = {"arm64": "aarch64", "armhf": "armv7l"}
PLACEHOLDER_BUILD = "0debian"
# PEP 440 public versions; a Debian distribution with another kind of version is not pinned.
VERSION = re.compile(r"(\d+!)?\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?")


@dataclass(frozen=True)
class Target:
    """The Python wheels must fit."""

    python: str                       # "3.13"
    machine: str                      # "aarch64", "armv7l"
    glibc: tuple[int, int]
    provided: Mapping[str, str]       # compiled distributions from Debian: name -> version

    @classmethod
    def from_facts(cls, facts: Mapping[str, Any]) -> Target:
        major, minor = (int(x) for x in str(facts["glibc"]).split(".")[:2])
        provided = {name: info["version"] for name, info in facts["provided"].items()
                    if info["compiled"]}
        return cls(python=facts["python"], machine=facts["machine"], glibc=(major, minor),
                   provided=provided)

    def describe(self) -> str:
        return f"Python {self.python} on {self.machine} (glibc {self.glibc[0]}.{self.glibc[1]})"

    def pip_options(self) -> list[str]:
        """pip's options that make it choose for the target instead of the host."""
        version = self.python.replace(".", "")
        options = ["--only-binary=:all:", "--implementation", "cp", "--python-version",
                   self.python, "--abi", f"cp{version}"]
        for platform in platform_tags(self.machine, self.glibc):
            options += ["--platform", platform]
        return options


def platform_tags(machine: str, glibc: tuple[int, int]) -> list[str]:
    """Every manylinux tag a system with this glibc runs, newest first. pip does not widen
    an explicit --platform by itself."""
    major, minor = glibc
    tags = [f"manylinux_{major}_{m}_{machine}" for m in range(minor, 16, -1)]
    if minor >= 17:
        tags.append(f"manylinux2014_{machine}")
    return tags


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]


def index_options(cache: Path, offline: bool) -> list[str]:
    """Where pip looks: the host's configured index, or with --offline the cache alone."""
    if offline:
        return ["--no-index", "--find-links", str(cache)]
    return []


# -- before the first download ------------------------------------------------------------


def check_requested(requirements: Sequence[str], release: str, arch: str, cache: Path,
                    offline: bool) -> None:
    """Every package of packages.pip has a wheel for the image's Python and CPU: found now,
    not after a base image was downloaded and half customised. Its dependencies are
    resolved later, against what the image's Debian packages provide."""
    if not requirements or release not in RELEASES or arch not in MACHINES:
        return
    python, glibc = RELEASES[release]
    target = Target(python, MACHINES[arch], glibc, {})
    proc = run(pip_command("install", "--dry-run", "--ignore-installed", "--no-deps",
                           "--quiet", "--progress-bar", "off", *target.pip_options(),
                           *index_options(cache, offline), *requirements),
               capture=True, check=False)
    if proc.returncode != 0:
        raise BuildError(explain_failure(proc.stderr.decode(errors="replace"), target,
                                         "packages.pip"))


def explain_failure(stderr: str, target: Target, what: str) -> str:
    """pip's complaint as one line that says what to do."""
    missing = re.search(r"Could not find a version that satisfies the requirement (\S+)"
                        r"(?: \(from ([^)]*)\))?", stderr)
    if missing:
        requirement, needed_by = missing.groups()
        name = re.split(r"[<>=!~;\[ ]", requirement)[0]
        by = f", needed by {needed_by}" if needed_by else ""
        return (f"{what}: no wheel of {requirement} for {target.describe()}{by}: install it "
                f"from Debian instead (add its package, e.g. python3-{canonical(name)}, to "
                f"packages.apt), or drop it from packages.pip")
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    conflict = [line for line in lines if "conflict" in line.lower() or
                line.startswith(("The user requested", "ERROR:"))]
    detail = "; ".join(conflict[-3:] or lines[-2:]) or "no output"
    return f"{what}: pip could not choose wheels for {target.describe()}: {detail}"


# -- during the build ---------------------------------------------------------------------


def placeholder_wheels(provided: Mapping[str, str], directory: Path) -> dict[str, str]:
    """A metadata-only wheel for each compiled Debian distribution, so that pip's resolver
    counts it as available at Debian's version; returns the constraints that hold it there.
    The build tag in the file name keeps them apart from real wheels."""
    constraints: dict[str, str] = {}
    for name, version in sorted(provided.items()):
        if not VERSION.fullmatch(version):
            log.warn(f"Debian's {name} has version {version!r}, which pip cannot compare: "
                     f"not holding it")
            continue
        stem = re.sub(r"[-_.]+", "_", name)
        info = f"{stem}-{version}.dist-info"
        files = {
            f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
            f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: orangepi-jupyter\n"
                             "Root-Is-Purelib: true\nTag: py3-none-any\n",
        }
        files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
        wheel = directory / f"{stem}-{version}-{PLACEHOLDER_BUILD}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            for path, text in files.items():
                archive.writestr(path, text)
        constraints[canonical(name)] = version
    return constraints


@dataclass(frozen=True)
class Locked:
    name: str
    version: str
    filename: str
    url: str
    sha256: str | None


def resolve(requirements: Sequence[str], target: Target, cache: Path, offline: bool,
            scratch: Path) -> list[Locked]:
    """What pip would install for the target: everything packages.pip needs that Debian's
    compiled packages do not already provide."""
    placeholders = scratch / "debian"
    placeholders.mkdir()
    held = placeholder_wheels(target.provided, placeholders)
    constraints = scratch / "constraints.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in held.items()))
    report = scratch / "report.json"
    proc = run(pip_command("install", "--dry-run", "--ignore-installed", "--quiet",
                           "--progress-bar", "off", "--report", str(report),
                           *target.pip_options(), *index_options(cache, offline),
                           "--find-links", str(placeholders), "--constraint", str(constraints),
                           *requirements),
               capture=True, check=False)
    if proc.returncode != 0:
        raise BuildError(explain_failure(proc.stderr.decode(errors="replace"), target,
                                         "packages.pip"))
    chosen = []
    for item in json.loads(report.read_text())["install"]:
        meta, info = item["metadata"], item["download_info"]
        if canonical(meta["name"]) in held:
            continue    # Debian's copy, seen by the venv through its system site
        url = info["url"]
        hashes = info.get("archive_info", {}).get("hashes", {})
        chosen.append(Locked(name=meta["name"], version=meta["version"],
                             filename=urllib.parse.unquote(url.rsplit("/", 1)[-1]), url=url,
                             sha256=hashes.get("sha256")))
    return sorted(chosen, key=lambda locked: canonical(locked.name))


def download(locked: Iterable[Locked], target: Target, cache: Path, offline: bool) -> None:
    """The chosen wheels into the cache, each checked against the index's sha256."""
    missing = [item for item in locked if not (cache / item.filename).is_file()]
    if missing and offline:
        names = ", ".join(item.filename for item in missing)
        raise BuildError(f"--offline: wheels not in the cache ({cache}): {names}; run once "
                         f"without --offline")
    if missing:
        log.info(f"downloading {len(missing)} wheels into {cache}")
        run(pip_command("download", "--no-deps", "--progress-bar", "off", "--dest", str(cache),
                        *target.pip_options(),
                        *[f"{item.name}=={item.version}" for item in missing]),
            what="download wheels for the image")
    for item in locked:
        path = cache / item.filename
        if not path.is_file():
            raise BuildError(f"pip did not download {item.filename} for {item.name} "
                             f"{item.version}: check the host's pip index settings")
        if item.sha256 and sha256_of(path) != item.sha256:
            path.unlink()
            raise BuildError(f"{item.filename} in the wheel cache does not match the index's "
                             f"sha256: removed it; run the build again")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_wheelhouse(locked: Sequence[Locked], cache: Path, work: Path,
                     target: Target) -> None:
    """The wheels and the lock, for 40-create-venv.chroot."""
    house = work / "wheels"
    house.mkdir(exist_ok=True)
    lines = [f"# The venv's packages for {target.describe()}, chosen and downloaded on the "
             f"build host.\n",
             "# Compiled packages Debian provides are not here; the venv sees them: "
             + (", ".join(f"{n}=={v}" for n, v in sorted(target.provided.items())) or "none")
             + "\n"]
    for item in locked:
        shutil.copyfile(cache / item.filename, house / item.filename)
        digest = sha256_of(house / item.filename)
        lines.append(f"{item.name}=={item.version} --hash=sha256:{digest}\n")
    (work / "requirements.txt").write_text("".join(lines))


def main(env: Mapping[str, str]) -> None:
    work = Path(env["IMAGE_CONFIG"]).parent
    config = json.loads(Path(env["IMAGE_CONFIG"]).read_text())["config"]
    requirements = config["packages"]["pip"]
    facts_file = work / "python.json"
    if not facts_file.is_file():
        raise BuildError(f"{facts_file} is missing: 30-describe-python.chroot must run first")
    target = Target.from_facts(json.loads(facts_file.read_text()))
    cache = Path(env["IMAGE_CACHE"]) / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    offline = env.get("IMAGE_OFFLINE") == "1"
    if not requirements:
        log.info("packages.pip is empty: no wheels to download")
        write_wheelhouse([], cache, work, target)
        return
    log.info(f"choosing wheels of {', '.join(requirements)} for {target.describe()}; "
             f"held at Debian's version: {', '.join(sorted(target.provided)) or 'nothing'}")
    with tempfile.TemporaryDirectory(prefix="wheels-") as scratch, _locked(cache / ".lock"):
        locked = resolve(requirements, target, cache, offline, Path(scratch))
        download(locked, target, cache, offline)
        write_wheelhouse(locked, cache, work, target)
    size = sum((cache / item.filename).stat().st_size for item in locked)
    log.info(f"{len(locked)} wheels ({log.human_size(size)}) ready for the venv")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One build at a time adds to the wheel cache; the kernel drops the lock if it dies."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


if __name__ == "__main__":
    try:
        main(os.environ)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
