"""The software bill of materials of a finished image: CycloneDX 1.6 JSON.

What it lists is read from the image's root filesystem, never from the host: dpkg's database
(every package installed, with its version and architecture) and the Jupyter virtualenv's
dist-info directories (what pip installed there). The Python modules Debian packaged, in
/usr/lib/python3/dist-packages, are dpkg packages and listed as such, once.

The image itself is the BOM's subject (metadata.component) and the base image it was made from
is that component's pedigree ancestor: CycloneDX's pedigree is for exactly this, a component
made by modifying another ("ancestors: components this one is derived from"), and it keeps the
base, with its published file's sha256 and URL, apart from the inventory of what the image
holds now.

Every path is resolved inside the image (inside.in_root): a link in the image, absolute or
relative, leads to the image's own files, never to the host's.
"""

from __future__ import annotations

import datetime
import email.parser
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cyclonedx.contrib.this.builders import this_component as cyclonedx_library
from cyclonedx.exception.model import InvalidUriException
from cyclonedx.model import (
    ExternalReference,
    ExternalReferenceType,
    HashAlgorithm,
    HashType,
    Property,
    XsUri,
)
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType, Pedigree
from cyclonedx.model.license import LicenseExpression
from cyclonedx.model.tool import ToolRepository
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

from builder.errors import BuildError
from builder.inside import in_root

# Names of our own properties: CycloneDX asks for a namespace that is not one of its own
# taxonomy's ("cdx:", ...), and the project's name is one nobody else uses.
PROPERTY = "orangepi-jupyter"


@dataclass(frozen=True)
class Package:
    """One package in the image: a dpkg package or a distribution in the virtualenv."""

    name: str
    version: str
    purl: PackageURL
    summary: str = ""
    homepage: str = ""
    source: str = ""        # dpkg's Source: the source package, "name (version)" if different
    license: str = ""       # PEP 639's License-Expression, an SPDX expression by definition


@dataclass(frozen=True)
class Ancestor:
    """The base image the build started from, as published."""

    name: str                   # its file name
    description: str            # "Armbian 26.5.1 trixie current minimal ..."
    version: str | None         # Armbian's version, when it is Armbian's image
    url: str | None             # where it was downloaded from, when it was
    sha256: str | None          # of the file as published; None for a base made here


@dataclass(frozen=True)
class Product:
    """The image the SBOM describes."""

    name: str                   # orangepi-jupyter-<board>-<release>
    version: str                # the build's date, as in the file name
    description: str
    built: datetime.datetime
    builder_version: str
    properties: dict[str, str]  # board, arch, release...


def os_release(root: Path) -> dict[str, str]:
    """/etc/os-release of the image (a link to ../usr/lib/os-release, followed inside it)."""
    for name in ("etc/os-release", "usr/lib/os-release"):
        path = in_root(root, name)
        if path.is_file():
            fields = {}
            for line in path.read_text(errors="replace").splitlines():
                key, sep, value = line.partition("=")
                if sep and re.fullmatch(r"[A-Z0-9_]+", key.strip()):
                    try:
                        fields[key.strip()] = "".join(shlex.split(value))
                    except ValueError:      # an unbalanced quote: the value as it stands
                        fields[key.strip()] = value.strip()
            return fields
    return {}


def dpkg_stanzas(text: str) -> Iterator[dict[str, str]]:
    """The stanzas of a dpkg status file, each a dict of its fields; a continuation line (a
    multi-line Description, Conffiles) is kept with its field."""
    fields: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
            fields, last = {}, ""
        elif line[0] in " \t":
            if last:
                fields[last] += "\n" + line.strip()
        else:
            key, _, value = line.partition(":")
            last = key.strip()
            fields[last] = value.strip()
    if fields:
        yield fields


def dpkg_packages(root: Path, vendor: str, distro: str) -> list[Package]:
    """Every package whose files are on the image (status "installed", whether wanted or
    held), from dpkg's status file; `vendor` is the purl namespace (debian, ubuntu)."""
    status = in_root(root, "var/lib/dpkg/status")
    if not status.is_file():
        raise BuildError("the image has no dpkg database (/var/lib/dpkg/status) to list its "
                         "packages in the SBOM from: build from an Armbian or Debian image")
    packages = []
    for fields in dpkg_stanzas(status.read_text(errors="replace")):
        # "want flag status": install ok installed, hold ok installed; deinstall ok
        # config-files or purge ok not-installed left no program behind.
        if fields.get("Status", "").split()[-1:] != ["installed"]:
            continue
        name, version = fields.get("Package", ""), fields.get("Version", "")
        if not name or not version:
            continue
        qualifiers = {"arch": fields.get("Architecture", "")}
        if distro:
            qualifiers["distro"] = distro
        packages.append(Package(
            name=name, version=version,
            purl=PackageURL("deb", vendor, name, version,
                            {k: v for k, v in qualifiers.items() if v}),
            summary=fields.get("Description", "").split("\n", 1)[0],
            homepage=fields.get("Homepage", ""), source=fields.get("Source", "")))
    return packages


def venv_packages(root: Path, venv: str) -> list[Package]:
    """The distributions installed in the virtualenv at `venv` (a path in the image), from
    each `*.dist-info/METADATA` of its site-packages; none when there is no virtualenv."""
    venv = venv.strip("/")
    packages = []
    lib = in_root(root, f"{venv}/lib")
    if not lib.is_dir():
        return []
    for python in sorted(lib.glob("python3*")):
        site = f"{venv}/lib/{python.name}/site-packages"
        if not in_root(root, site).is_dir():
            continue
        for entry in sorted(in_root(root, site).glob("*.dist-info")):
            metadata = in_root(root, f"{site}/{entry.name}/METADATA")
            if not metadata.is_file():
                continue
            # As importlib.metadata reads it: UTF-8 text, headers only (the body is the
            # long description).
            message = email.parser.Parser().parsestr(metadata.read_text(errors="replace"),
                                                     headersonly=True)
            name, version = message.get("Name", ""), message.get("Version", "")
            if not name or not version:
                continue
            # The purl of a PyPI project is its normalised name (PEP 503).
            normalised = re.sub(r"[-_.]+", "-", name).lower()
            packages.append(Package(
                name=name, version=version, purl=PackageURL("pypi", None, normalised, version),
                summary=message.get("Summary", ""), homepage=message.get("Home-page", ""),
                license=message.get("License-Expression", "")))
    return packages


def _external(kind: ExternalReferenceType, url: str | None,
              hashes: list[HashType] | None = None) -> list[ExternalReference]:
    """An external reference, or none for a URL CycloneDX cannot carry (a Homepage field is
    free text: a package may have anything there)."""
    if not url or "://" not in url:
        return []
    try:
        return [ExternalReference(type=kind, url=XsUri(url), hashes=hashes or [])]
    except InvalidUriException:
        return []


def _component(package: Package) -> Component:
    properties = []
    if package.source:
        properties.append(Property(name=f"{PROPERTY}:dpkg:source", value=package.source))
    return Component(
        type=ComponentType.LIBRARY, name=package.name, version=package.version,
        purl=package.purl, bom_ref=package.purl.to_string(),
        description=package.summary or None,
        licenses=[LicenseExpression(package.license)] if package.license else None,
        external_references=_external(ExternalReferenceType.WEBSITE, package.homepage),
        properties=properties)


def _ancestor(base: Ancestor) -> Component:
    hashes = [HashType(alg=HashAlgorithm.SHA_256, content=base.sha256)] if base.sha256 else []
    return Component(
        type=ComponentType.OPERATING_SYSTEM, name=base.name, version=base.version,
        description=base.description, hashes=hashes,
        external_references=_external(ExternalReferenceType.DISTRIBUTION, base.url, hashes))


@dataclass(frozen=True)
class Inventory:
    """What the image holds, read while its root is mounted: its packages, by purl."""

    packages: dict[str, Package]


def read_inventory(root: Path, venv: str) -> Inventory:
    """The packages of the image whose root filesystem is mounted at `root`: dpkg's and the
    virtualenv's at `venv`."""
    release = os_release(root)
    # purl's deb namespace is the distribution's vendor. dpkg's database does not say which
    # archive each package came from, so the image's own ID names it for all of them: Debian
    # or Ubuntu, also for an Armbian image, which keeps its base's ID (Armbian is named in
    # /etc/armbian-release and PRETTY_NAME) and where nearly every package is its base's.
    vendor = release.get("ID", "").lower() or "debian"
    distro = release.get("VERSION_CODENAME", "")
    return Inventory({p.purl.to_string(): p for p in [*dpkg_packages(root, vendor, distro),
                                                      *venv_packages(root, venv)]})


def bill_of_materials(inventory: Inventory, product: Product, base: Ancestor) -> Bom:
    """The BOM of the image that holds `inventory`."""
    packages = inventory.packages
    components = [_component(packages[purl]) for purl in sorted(packages)]

    image = Component(
        type=ComponentType.OPERATING_SYSTEM, name=product.name, version=product.version,
        bom_ref=f"{product.name}@{product.version}", description=product.description,
        pedigree=Pedigree(ancestors=[_ancestor(base)],
                          notes="the base image, customised by build-image "
                                "(customize.d/ scripts and overlays/)"),
        properties=[Property(name=f"{PROPERTY}:{key}", value=value)
                    for key, value in sorted(product.properties.items())])
    builder = Component(type=ComponentType.APPLICATION, name="build-image",
                        group="orangepi-jupyter", version=product.builder_version)
    bom = Bom(metadata=BomMetaData(
        timestamp=product.built, component=image,
        tools=ToolRepository(components=[builder, cyclonedx_library()])))
    bom.components.update(components)
    # The image holds every package: without the edges, the BOM's dependency graph would say
    # nothing about what the packages are part of.
    bom.register_dependency(image, components)
    return bom


def to_json(bom: Bom) -> str:
    return JsonV1Dot6(bom).output_as_string(indent=2) + "\n"
