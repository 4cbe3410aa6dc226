"""The software bill of materials (builder/sbom.py): made from a small image root built here
(dpkg's status file, a virtualenv's dist-info directories, links that try to lead out to the
host) and checked with CycloneDX's own strict JSON schema, which must also reject a broken
document. The appliance's real SBOM is checked in test_appliance.py."""

from __future__ import annotations

import copy
import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from builder import output, sbom
from builder.errors import BuildError
from builder.ledger import Ledger

VENV = "/opt/jupyter"
SITE = "opt/jupyter/lib/python3.13/site-packages"
BUILT = datetime.datetime(2026, 11, 26, 10, 30, 5, tzinfo=datetime.UTC)
BASE_SHA = "0123456789abcdef" * 4

STATUS = """\
Package: python3
Status: install ok installed
Priority: important
Architecture: armhf
Multi-Arch: allowed
Source: python3-defaults (3.13.5-1)
Version: 3.13.5-2
Description: interactive high-level object-oriented language (default python3 version)
 This package is a dependency package, which depends on Debian's default
 Python 3 version (currently v3.13).
Homepage: https://www.python.org/

Package: attr
Status: install ok installed
Architecture: armhf
Version: 1:2.5.2-3
Description: utilities for manipulating filesystem extended attributes

Package: python3-numpy
Status: hold ok installed
Architecture: armhf
Source: numpy
Version: 1:2.2.4+ds-1
Description: Fast array facility to the Python 3 language
Homepage: not a URL at all

Package: tzdata
Status: install ok installed
Architecture: all
Version: 2025b-4
Description: time zone and daylight-saving time data

Package: removed-tool
Status: deinstall ok config-files
Architecture: armhf
Version: 1.0-1
Conffiles:
 /etc/removed-tool.conf 0123456789abcdef0123456789abcdef

Package: purged-tool
Status: purge ok not-installed
Architecture: armhf
"""


def metadata(name: str, version: str, extra: str = "") -> str:
    return (f"Metadata-Version: 2.4\nName: {name}\nVersion: {version}\n"
            f"Summary: {name} for the tests\n{extra}\nThe long description, in the body.\n"
            f"Name: not-a-header\n")


def dist_info(directory: Path, name: str, version: str, extra: str = "") -> Path:
    directory.mkdir(parents=True)
    (directory / "METADATA").write_text(metadata(name, version, extra))
    return directory


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """A root filesystem as the SBOM reads it, with the links an image may hold."""
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/os-release").write_text(
        'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nNAME="Debian GNU/Linux"\n'
        "VERSION_ID=\"13\"\nVERSION_CODENAME=trixie\nID=debian\n")
    (root / "etc").mkdir()
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(STATUS)
    site = root / SITE
    dist_info(site / "jupyterlab-4.4.9.dist-info", "jupyterlab", "4.4.9",
              "License-Expression: BSD-3-Clause\nHome-page: https://jupyter.org\n")
    dist_info(site / "jupyter_server-2.17.0.dist-info", "Jupyter_Server", "2.17.0")
    (site / "broken-1.0.dist-info").mkdir()         # no METADATA: not a distribution
    # An absolute link that stays in the image (it means the image's /usr/share/...) is
    # followed there, as the image would.
    dist_info(root / "usr/share/wheels/ipykernel-7.0.1.dist-info", "ipykernel", "7.0.1")
    (site / "ipykernel-7.0.1.dist-info").symlink_to("/usr/share/wheels/ipykernel-7.0.1.dist-info")
    # An absolute link to a directory that exists on the host only: it must not be followed
    # out of the image (in the image, that path does not exist).
    outside = dist_info(tmp_path / "host" / "hostonly-6.6.6.dist-info", "hostonly", "6.6.6")
    (site / "hostonly-6.6.6.dist-info").symlink_to(outside)
    # The same, made of relative parts: `..` stops at the image's root.
    (site / "escape-1.0.dist-info").symlink_to("../../../../../../../../host/"
                                              "hostonly-6.6.6.dist-info")
    return root


PRODUCT = sbom.Product(
    name="orangepi-jupyter-orangepipcplus-trixie", version="20261126",
    description="Jupyter appliance for the Orange Pi PC + (orangepipcplus, armhf)",
    built=BUILT, builder_version="0.1.0",
    properties={"board": "orangepipcplus", "arch": "armhf", "release": "trixie"})
ANCESTOR = sbom.Ancestor(
    name="Armbian_26.5.1_Orangepipcplus_trixie_current_6.12.30_minimal.img.xz",
    description="Armbian 26.5.1 trixie current minimal", version="26.5.1",
    url="https://dl.armbian.com/orangepipcplus/archive/"
        "Armbian_26.5.1_Orangepipcplus_trixie_current_6.12.30_minimal.img.xz",
    sha256=BASE_SHA)


def document(root: Path, ancestor: sbom.Ancestor = ANCESTOR) -> str:
    return sbom.to_json(sbom.bill_of_materials(sbom.read_inventory(root, VENV), PRODUCT, ancestor))


def validate(text: str) -> str | None:
    """CycloneDX 1.6's strict schema (no property it does not define): the first error."""
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    return None if error is None else str(error)


def by_name(bom: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bom["components"]}


def test_the_sbom_lists_what_dpkg_and_the_venv_installed_and_validates(image_root: Path) -> None:
    text = document(image_root)
    assert validate(text) is None
    bom = json.loads(text)
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    components = by_name(bom)
    # Installed, also held; not what was removed or purged.
    assert set(components) == {"python3", "attr", "python3-numpy", "tzdata", "jupyterlab",
                               "Jupyter_Server", "ipykernel"}
    python3 = components["python3"]
    assert python3["version"] == "3.13.5-2"
    assert python3["purl"] == "pkg:deb/debian/python3@3.13.5-2?arch=armhf&distro=trixie"
    assert python3["bom-ref"] == python3["purl"]
    assert python3["description"].startswith("interactive high-level")
    assert python3["externalReferences"] == [{"type": "website",
                                              "url": "https://www.python.org/"}]
    assert {"name": "orangepi-jupyter:dpkg:source", "value": "python3-defaults (3.13.5-1)"} \
        in python3["properties"]
    # An epoch and a "+" in the version are the purl's to encode; the Homepage that is no URL
    # is left out rather than making the document invalid.
    assert components["attr"]["version"] == "1:2.5.2-3"
    assert components["python3-numpy"]["purl"] == \
        "pkg:deb/debian/python3-numpy@1:2.2.4%2Bds-1?arch=armhf&distro=trixie"
    assert "externalReferences" not in components["python3-numpy"]
    assert components["tzdata"]["purl"].endswith("?arch=all&distro=trixie")
    # PyPI's purl has the normalised name; the component keeps the name as published.
    assert components["jupyterlab"]["purl"] == "pkg:pypi/jupyterlab@4.4.9"
    assert components["jupyterlab"]["licenses"] == [{"expression": "BSD-3-Clause"}]
    assert components["Jupyter_Server"]["purl"] == "pkg:pypi/jupyter-server@2.17.0"
    assert components["ipykernel"]["version"] == "7.0.1"


def test_the_image_is_the_subject_and_the_base_its_ancestor(image_root: Path) -> None:
    bom = json.loads(document(image_root))
    metadata = bom["metadata"]
    assert metadata["timestamp"] == "2026-11-26T10:30:05+00:00"
    image = metadata["component"]
    assert (image["type"], image["name"], image["version"]) == \
        ("operating-system", "orangepi-jupyter-orangepipcplus-trixie", "20261126")
    assert {"name": "orangepi-jupyter:board", "value": "orangepipcplus"} in image["properties"]
    (base,) = image["pedigree"]["ancestors"]
    assert base["name"] == ANCESTOR.name and base["version"] == "26.5.1"
    assert base["hashes"] == [{"alg": "SHA-256", "content": BASE_SHA}]
    assert base["externalReferences"][0]["type"] == "distribution"
    assert base["externalReferences"][0]["url"] == ANCESTOR.url
    tools = {t["name"]: t["version"] for t in metadata["tools"]["components"]}
    assert tools["build-image"] == "0.1.0" and "cyclonedx-python-lib" in tools
    # The image holds every package listed.
    (edges,) = [d for d in bom["dependencies"] if d["ref"] == image["bom-ref"]]
    assert sorted(edges["dependsOn"]) == sorted(c["bom-ref"] for c in bom["components"])


def test_a_base_made_here_has_no_file_hash_nor_url(image_root: Path) -> None:
    made = sbom.Ancestor(name="debian-trixie.img", description="Debian trixie for Orange Pi PC +",
                         version=None, url=None, sha256=None)
    text = document(image_root, made)
    assert validate(text) is None
    (base,) = json.loads(text)["metadata"]["component"]["pedigree"]["ancestors"]
    assert base["name"] == "debian-trixie.img"
    assert "hashes" not in base and "externalReferences" not in base and "version" not in base


def test_links_never_lead_the_sbom_to_the_host(image_root: Path, tmp_path: Path) -> None:
    names = {c["name"] for c in json.loads(document(image_root))["components"]}
    assert "hostonly" not in names      # both links above resolved inside the image
    # dpkg's database as an absolute link to a host directory: the image's own path is read,
    # which is not there, and the build says so rather than list the host's packages.
    host_dpkg = tmp_path / "host" / "dpkg"
    host_dpkg.mkdir(parents=True)
    (host_dpkg / "status").write_text(STATUS)
    dpkg = image_root / "var/lib/dpkg"
    (dpkg / "status").unlink()
    dpkg.rmdir()
    dpkg.symlink_to(host_dpkg)
    with pytest.raises(BuildError, match=r"^the image has no dpkg database "
                                         r"\(/var/lib/dpkg/status\)"):
        document(image_root)


def test_the_vendor_is_the_images_os_release_id(image_root: Path) -> None:
    release = image_root / "usr/lib/os-release"
    release.write_text('ID=ubuntu\nVERSION_CODENAME="noble"\n')
    components = by_name(json.loads(document(image_root)))
    assert components["python3"]["purl"] == \
        "pkg:deb/ubuntu/python3@3.13.5-2?arch=armhf&distro=noble"


def test_no_venv_lists_the_dpkg_packages_only(image_root: Path) -> None:
    other = sbom.bill_of_materials(sbom.read_inventory(image_root, "/opt/nothing-here"),
                                  PRODUCT, ANCESTOR)
    text = sbom.to_json(other)
    assert validate(text) is None
    assert "jupyterlab" not in by_name(json.loads(text)) and "python3" in by_name(json.loads(text))


def broken_documents(good: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    unknown = copy.deepcopy(good)
    unknown["components"][0]["installedBy"] = "dpkg"
    bad_type = copy.deepcopy(good)
    bad_type["metadata"]["component"]["type"] = "disk-image"
    no_name = copy.deepcopy(good)
    del no_name["components"][0]["name"]
    bad_hash = copy.deepcopy(good)
    bad_hash["metadata"]["component"]["pedigree"]["ancestors"][0]["hashes"][0]["content"] = "xyz"
    # Each with what the validator says about it.
    return [("('installedBy' was unexpected)", unknown),      # the strict schema's own check
            ("'disk-image' is not one of", bad_type),
            ("'name' is a required property", no_name),
            ("'xyz' does not match", bad_hash)]


def test_the_validator_rejects_a_broken_document(image_root: Path) -> None:
    """The check above can fail: the same validator refuses each of these, for its fault."""
    good = json.loads(document(image_root))
    for fault, broken in broken_documents(good):
        error = validate(json.dumps(broken))
        assert error is not None and fault in error, (fault, error)


def test_the_sbom_is_published_beside_the_image(tmp_path: Path) -> None:
    out = output.Outputs(tmp_path, "orangepi-jupyter-x-trixie-20261126", "zstd")
    name = output.write_sbom(out, "{}\n")
    assert name == "orangepi-jupyter-x-trixie-20261126.sbom.cdx.json"
    assert not (tmp_path / name).exists()       # under its temporary name until published
    assert out.publish() == [tmp_path / name]
    assert (tmp_path / name).read_text() == "{}\n"


@pytest.mark.root
def test_a_failed_build_leaves_no_sbom(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), \
            output.outputs(Ledger(tmp_path / "state"), tmp_path / "out", "x", "zstd") as out:
        output.write_sbom(out, "{}\n")
        assert list((tmp_path / "out").iterdir())
        raise RuntimeError("the build failed")
    assert list((tmp_path / "out").iterdir()) == []
