"""Wheels for the image's Python, chosen and downloaded on the host.

pip inside the image is slow (every byte of it runs under emulation), cannot use the host's
index, proxy or CA settings, and would compile anything without a wheel for hours. So pip
runs here, on the host, for the image's platform, and the chroot only installs files:

1. 30-describe-python.chroot writes what the image's Python is (version, CPU, glibc, the
   values of dependency markers) and which distributions Debian's packages installed:
   python.json.
2. What Debian installed is held at Debian's version: pip's resolver is offered each as a
   placeholder wheel (metadata only, tagged for the target so it wins over PyPI's wheel of the
   same version) with a `name==version` constraint, and the venv sees Debian's copy through
   its system site. One copy of each package: certifi keeps the system's CA store, and
   compiled packages, of which PyPI has no armv7l wheels, never need one. When Jupyter needs
   a newer pure-Python package than Debian has, only the compiled ones are held and the venv
   gets its own copy of the rest.
3. pip resolves packages.pip for the target (`pip install --dry-run --report`, wheels only,
   the host's pip configuration, the target's marker values), then downloads what it chose
   into the cache, where a wheel is kept by its file name: name, version and platform.
4. The lock (`name==version --hash=sha256:...`) and those wheels go to /tmp/build-image for
   40-create-venv.chroot, which installs exactly them with `--no-index --require-hashes`.

`python -m builder.wheels` is what customize.d/35-download-wheels.host runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder import log
from builder.errors import BuildError
from builder.files import locked, sha256_of
from builder.run import host_env, run

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
# PEP 440 versions, local part included (Debian's "2.2.3+dfsg"); others cannot be held.
VERSION = re.compile(r"(\d+!)?\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?"
                     r"(\+[A-Za-z0-9]+(\.[A-Za-z0-9]+)*)?")
# Choosing for another platform without --target (`install --dry-run --platform ...`) is
# allowed from pip 23.3 on; pyproject.toml asks for it, and this catches an install without it.
MIN_PIP = (23, 3)
# pip has options for the target's tags but none for its marker values (platform_machine,
# python_version...): without this it would pick dependencies for the host's CPU and Python.
# The values go in through pip's vendored packaging, a private API: the script proves the
# patch takes before pip runs, and says so in one line (prefixed "build-image:") if not.
PIP_FOR_TARGET = f"""\
import json, os, re, runpy, sys
import pip
found = tuple(int(n) for n in re.findall(r"\\d+", pip.__version__)[:2])
if found < {MIN_PIP!r}:
    sys.exit(f"build-image: choosing wheels for the board needs pip {MIN_PIP[0]}.{MIN_PIP[1]} or "
             f"newer, and {{sys.executable}} has pip {{pip.__version__}}: run "
             f"'{{sys.executable}} -m pip install --upgrade pip'")
target = json.loads(os.environ.get("BUILD_IMAGE_TARGET_MARKERS") or "{{}}")
if target:
    from pip._vendor.packaging import markers
    markers.default_environment = lambda: dict(target)
    probe = " and ".join(f"{{key}} == '{{target[key]}}'" for key in
                         ("platform_machine", "python_version") if key in target)
    if probe and not markers.Marker(probe).evaluate():
        sys.exit(f"build-image: pip {{pip.__version__}} no longer takes the board's marker "
                 f"values through its vendored packaging: run '{{sys.executable}} -m pip "
                 f"install \\"pip<{{pip.__version__}}\\"' and report it")
sys.argv[0] = "pip"
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class Provided:
    version: str
    compiled: bool


@dataclass(frozen=True)
class Target:
    """The Python wheels must fit."""

    python: str                       # "3.13"
    machine: str                      # "aarch64", "armv7l"
    glibc: tuple[int, int]
    provided: Mapping[str, Provided] = field(default_factory=dict)   # from Debian, by name
    markers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_facts(cls, facts: Mapping[str, Any]) -> Target:
        major, minor = (int(x) for x in str(facts["glibc"]).split(".")[:2])
        provided = {name: Provided(info["version"], info["compiled"])
                    for name, info in facts["provided"].items()}
        return cls(python=facts["python"], machine=facts["machine"], glibc=(major, minor),
                   provided=provided, markers=facts.get("markers", {}))

    def describe(self) -> str:
        return f"Python {self.python} on {self.machine} (glibc {self.glibc[0]}.{self.glibc[1]})"

    @property
    def abi(self) -> str:
        return "cp" + self.python.replace(".", "")

    def pip_options(self) -> list[str]:
        """pip's options that make it choose for the target instead of the host."""
        options = ["--only-binary=:all:", "--implementation", "cp", "--python-version",
                   self.python, "--abi", self.abi]
        for platform in platform_tags(self.machine, self.glibc):
            options += ["--platform", platform]
        return options

    def pip(self, *args: str) -> tuple[list[str], dict[str, str]]:
        """The pip command line for the target, and its environment."""
        env = host_env({"BUILD_IMAGE_TARGET_MARKERS": json.dumps(dict(self.markers))})
        return [sys.executable, "-c", PIP_FOR_TARGET, "--disable-pip-version-check",
                *args], env


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
    target = Target(python, MACHINES[arch], glibc)
    argv, env = target.pip("install", "--dry-run", "--ignore-installed", "--no-deps",
                           "--progress-bar", "off", *target.pip_options(),
                           *index_options(cache, offline), *requirements)
    proc = run(argv, env=env, capture=True, check=False)
    if proc.returncode != 0:
        raise BuildError(explain_failure(proc.stderr.decode(errors="replace"), target,
                                         cache if offline else None))


def explain_failure(stderr: str, target: Target, offline_cache: Path | None,
                    held: Mapping[str, str] | None = None) -> str:
    """pip's complaint as one line that says what to do."""
    ours = re.search(r"^build-image: (.*)$", stderr, re.M)
    if ours:
        return ours.group(1)
    unreachable = re.search(r"(ProxyError|SSLError|NewConnectionError|ConnectTimeoutError|"
                            r"Could not fetch URL [^:]*|HTTP error \d+)[^\n]*", stderr)
    missing = re.search(r"Could not find a version that satisfies the requirement (\S+)"
                        r"(?: \(from (?!versions:)([^)]*)\))?", stderr)
    if unreachable:
        return (f"pip could not reach the package index ({unreachable.group(0).strip()}): "
                f"check the host's pip configuration (index-url, proxy, cert in pip.conf or "
                f"PIP_* variables; sudo drops the variables unless -E), or use --offline")
    if missing:
        requirement, needed_by = missing.groups()
        name = re.split(r"[<>=!~;\[ ]", requirement)[0]
        by = f", needed by {needed_by}" if needed_by else ""
        if offline_cache is not None:
            return (f"--offline: no wheel of {requirement} for {target.describe()}{by} in the "
                    f"cache ({offline_cache}): run once without --offline")
        return (f"packages.pip: no wheel of {requirement} for {target.describe()}{by}: install "
                f"it from Debian instead (add its package, e.g. python3-{canonical(name)}, to "
                f"packages.apt), or drop it from packages.pip")
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"(The user requested|\S+ \S+ depends on)",
                                                 line)]
    pinned = [line for line in causes if "(constraint)" in line]
    if pinned and held:
        names = sorted({canonical(line.split()[3]) for line in pinned if len(line.split()) > 3}
                       & set(held))
        versions = ", ".join(f"{n} {held[n]}" for n in names) or "some"
        return (f"packages.pip: Debian's compiled packages are too old for what was asked "
                f"({versions}; {'; '.join(causes[:4])}): ask for an older version in "
                f"packages.pip, or build on a newer release")
    detail = "; ".join(causes[:4] or lines[-2:]) or "no output"
    return f"packages.pip: pip could not choose wheels for {target.describe()}: {detail}"


# -- during the build ---------------------------------------------------------------------


def placeholder_wheels(provided: Mapping[str, Provided], target: Target,
                       directory: Path) -> dict[str, str]:
    """A metadata-only wheel for each distribution Debian installed, so that pip's resolver
    counts it as available at Debian's version; returns the constraints that hold them there.
    Tagged with the target's most specific tag, so pip prefers it to a real wheel of that
    version; the build tag keeps its file name apart from any real wheel's."""
    constraints: dict[str, str] = {}
    tag = f"{target.abi}-{target.abi}-{platform_tags(target.machine, target.glibc)[0]}"
    for name, info in sorted(provided.items()):
        if not VERSION.fullmatch(info.version):
            log.warn(f"Debian's {name} has version {info.version!r}, which pip cannot "
                     f"compare: not holding it")
            continue
        stem = re.sub(r"[-_.]+", "_", name)
        dist_info = f"{stem}-{info.version}.dist-info"
        files = {
            f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\n"
                                     f"Version: {info.version}\n",
            f"{dist_info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: orangepi-jupyter\n"
                                 f"Root-Is-Purelib: false\nTag: {tag}\n",
        }
        files[f"{dist_info}/RECORD"] = "".join(
            f"{path},,\n" for path in [*files, f"{dist_info}/RECORD"])
        wheel = directory / f"{stem}-{info.version}-{PLACEHOLDER_BUILD}-{tag}.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            for path, text in files.items():
                archive.writestr(path, text)
        constraints[canonical(name)] = info.version
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
    """What pip would install for the target: everything packages.pip needs that Debian
    does not provide at a version it accepts. All of Debian's packages are held if that
    costs nothing; if holding the pure-Python ones makes pip pick an older version of a
    package that was asked for (or no version at all), only the compiled ones are held."""
    everything = dict(target.provided)
    compiled = {name: info for name, info in everything.items() if info.compiled}
    lenient = _resolve(requirements, target, compiled, cache, offline, scratch / "compiled")
    if everything == compiled:
        log.info(f"Debian's {len(compiled)} compiled Python packages are held at their "
                 f"versions")
        return lenient
    try:
        strict = _resolve(requirements, target, everything, cache, offline, scratch / "all")
    except BuildError as exc:
        log.info(f"holding every Debian package is not possible ({exc}); holding only the "
                 f"{len(compiled)} compiled ones")
        return lenient
    asked = {canonical(re.split(r"[<>=!~;\[ ]", r)[0]) for r in requirements}
    held = {canonical(name): info.version for name, info in everything.items()}
    older = sorted(name for name in asked
                   if _older(_version(strict, name) or held.get(name),
                             _version(lenient, name) or held.get(name)))
    if older:
        log.info(f"holding Debian's pure-Python packages would mean older {', '.join(older)}: "
                 f"holding only the {len(compiled)} compiled ones; the venv gets its own copy "
                 f"of the others it needs")
        return lenient
    log.info(f"every Debian package is held at its version ({len(everything)}); the venv gets "
             f"only what Debian does not have")
    return strict


def _version(locked: Sequence[Locked], name: str) -> str | None:
    return next((item.version for item in locked if canonical(item.name) == name), None)


def _older(version: str | None, than: str | None) -> bool:
    """Whether `version` is an older release than `than`, by their release numbers (what
    matters here: Jupyter 4.5 against 4.6); a version that cannot be read counts as older
    when it differs."""
    if version is None or than is None:
        return version != than
    first = re.match(r"\d+(?:\.\d+)*", version)
    second = re.match(r"\d+(?:\.\d+)*", than)
    if first is None or second is None:
        return version != than
    mine = [int(x) for x in first.group(0).split(".")]
    theirs = [int(x) for x in second.group(0).split(".")]
    width = max(len(mine), len(theirs))
    return mine + [0] * (width - len(mine)) < theirs + [0] * (width - len(theirs))


def _resolve(requirements: Sequence[str], target: Target, held_dists: Mapping[str, Provided],
             cache: Path, offline: bool, scratch: Path) -> list[Locked]:
    placeholders = scratch / "debian"
    placeholders.mkdir(parents=True)
    held = placeholder_wheels(held_dists, target, placeholders)
    constraints = scratch / "constraints.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in held.items()))
    report = scratch / "report.json"
    argv, env = target.pip("install", "--dry-run", "--ignore-installed", "--progress-bar",
                           "off", "--report", str(report), *target.pip_options(),
                           *index_options(cache, offline), "--find-links", str(placeholders),
                           "--constraint", str(constraints), *requirements)
    proc = run(argv, env=env, capture=True, check=False)
    if proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace")
        raise BuildError(explain_failure(stderr, target, cache if offline else None, held))
    chosen = []
    for item in json.loads(report.read_text())["install"]:
        meta, info = item["metadata"], item["download_info"]
        if canonical(meta["name"]) in held:
            if PLACEHOLDER_BUILD not in info["url"]:
                raise BuildError(f"pip chose {info['url']} over Debian's {meta['name']} "
                                 f"{meta['version']}: report this as a bug")
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
        argv, env = target.pip("download", "--quiet", "--no-deps", "--progress-bar", "off",
                               "--dest", str(cache), *target.pip_options(),
                               *[f"{item.name}=={item.version}" for item in missing])
        run(argv, env=env, what="download wheels for the image")
    for item in locked:
        path = cache / item.filename
        if not path.is_file():
            raise BuildError(f"pip did not download {item.filename} for {item.name} "
                             f"{item.version}: check the host's pip index settings")
        if item.sha256 and sha256_of(path) != item.sha256:
            path.unlink()
            raise BuildError(f"{item.filename} in the wheel cache does not match the index's "
                             f"sha256: removed it; run the build again")


def write_wheelhouse(locked: Sequence[Locked], cache: Path, work: Path,
                     target: Target) -> None:
    """The wheels and the lock, for 40-create-venv.chroot."""
    house = work / "wheels"
    house.mkdir(exist_ok=True)
    lines = [f"# The venv's packages for {target.describe()}, chosen and downloaded on the "
             f"build host.\n",
             "# Debian's packages the venv uses instead: see the manifest's python section.\n"]
    for item in locked:
        shutil.copyfile(cache / item.filename, house / item.filename)
        digest = sha256_of(house / item.filename)
        lines.append(f"{item.name}=={item.version} --hash=sha256:{digest}\n")
    (work / "requirements.txt").write_text("".join(lines))


def main(env: Mapping[str, str]) -> None:
    work = Path(env["IMAGE_OUTPUT"]).parent
    config = json.loads(Path(env["IMAGE_CONFIG"]).read_text())["config"]
    requirements = config["packages"]["pip"]
    facts_file = work / "python.json"
    if not facts_file.is_file():
        raise BuildError(f"{facts_file} is missing: 30-describe-python.chroot must run first")
    target = Target.from_facts(json.loads(facts_file.read_text()))
    if not config["venv"]["system_site_packages"]:
        # The venv will not see Debian's packages: it needs its own copy of everything.
        target = Target(target.python, target.machine, target.glibc, {}, target.markers)
    cache = Path(env["IMAGE_CACHE"]) / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    offline = env.get("IMAGE_OFFLINE") == "1"
    if not requirements:
        log.info("packages.pip is empty: no wheels to download")
        write_wheelhouse([], cache, work, target)
        return
    log.info(f"choosing wheels of {', '.join(requirements)} for {target.describe()}, with "
             f"{len(target.provided)} Python packages from Debian")
    with tempfile.TemporaryDirectory(prefix="wheels-") as scratch, locked(cache / ".lock"):
        chosen = resolve(requirements, target, cache, offline, Path(scratch))
        download(chosen, target, cache, offline)
        write_wheelhouse(chosen, cache, work, target)
    size = sum((cache / item.filename).stat().st_size for item in chosen)
    log.info(f"{len(chosen)} wheels ({log.human_size(size)}) ready for the venv")


if __name__ == "__main__":
    try:
        main(os.environ)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
