"""Choosing the base image from Armbian's index, against the real snapshot of August 2026."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import SNAPSHOT

from builder.armbian import find_image, parse_index, use_mirror, version_key
from builder.errors import BuildError


@pytest.fixture(scope="module")
def assets() -> list[dict[str, Any]]:
    if not SNAPSHOT.exists():
        pytest.skip(f"Armbian index snapshot not found at {SNAPSHOT} (shared/ beside the repo)")
    return parse_index(SNAPSHOT.read_bytes(), str(SNAPSHOT))


def test_version_order() -> None:
    ordered = ["25.5.1", "26.2.1", "26.2.5", "26.5.1", "26.11.0-trunk.1", "26.11.0-trunk.2",
               "26.11.0-trunk.10", "26.11.0"]
    assert sorted(reversed(ordered), key=version_key) == ordered


def test_standard_board_from_the_archive(assets: list[dict[str, Any]]) -> None:
    image = find_image(assets, board="orangepi5", release="trixie", branch="current",
                       variant="minimal")
    assert image.version == "26.5.1" and image.kernel == "6.18.33"
    assert image.repository == "archive"
    assert image.url == ("https://dl.armbian.com/orangepi5/archive/"
                         "Armbian_26.5.1_Orangepi5_trixie_current_6.18.33_minimal.img.xz")
    assert image.sha_url == image.url + ".sha" and image.asc_url == image.url + ".asc"
    assert image.size and image.size > 100 << 20


def test_vendor_branch(assets: list[dict[str, Any]]) -> None:
    image = find_image(assets, board="orangepi5-plus", release="trixie", branch="vendor",
                       variant="minimal")
    assert image.kernel == "6.1.115" and "_vendor_" in image.filename


def test_highest_version_wins(assets: list[dict[str, Any]]) -> None:
    # orangepi4-lts has 26.2.1 builds for noble and trixie and a 26.2.5 for resolute.
    image = find_image(assets, board="orangepi4-lts", release="resolute", branch="current",
                       variant="minimal")
    assert image.version == "26.2.5"
    older = find_image(assets, board="orangepi4-lts", release="trixie", branch="current",
                       variant="minimal")
    assert older.version == "26.2.1"


def test_highest_version_among_several_records() -> None:
    records = [
        {"board_slug": "b", "armbian_version": v, "distro": "trixie", "branch": "current",
         "variant": "minimal", "file_extension": "img.xz", "file_application": "",
         "file_url": f"https://dl.armbian.com/b/archive/Armbian_{v}_B.img.xz",
         "download_repository": repo}
        for v, repo in [("26.5.1", "archive"), ("26.11.0-trunk.1", "community"),
                        ("26.8.1", "archive")]
    ]
    image = find_image(records, board="b", release="trixie", branch="current", variant="minimal")
    assert image.version == "26.11.0-trunk.1" and image.repository == "community"


def test_community_image_on_github(assets: list[dict[str, Any]]) -> None:
    image = find_image(assets, board="orangepi3b", release="trixie", branch="vendor",
                       variant="minimal")
    assert image.repository == "community" and image.version == "26.11.0-trunk.1"
    assert image.url.startswith("https://github.com/armbian/community/releases/download/")
    assert image.sha_url.startswith("https://cache.armbian.com/artifacts/orangepi3b/archive/")


def test_older_archive_images_for_zero_boards(assets: list[dict[str, Any]]) -> None:
    image = find_image(assets, board="orangepizero3", release="bookworm", branch="current",
                       variant="minimal")
    assert image.version == "25.5.1" and image.repository == "archive"


def test_application_images_are_never_chosen(assets: list[dict[str, Any]]) -> None:
    # For orangepi3-lts, trixie/current/server exists only as Home Assistant and openHAB builds
    # (download_repository "distribution"): not a plain base image.
    with pytest.raises(BuildError) as error:
        find_image(assets, board="orangepi3-lts", release="trixie", branch="current",
                   variant="server")
    message = str(error.value)
    assert message.startswith("no Armbian image for orangepi3-lts with release trixie, "
                              "branch current, variant server; the index has:")
    assert "--release trixie --branch current --variant minimal" in message
    assert "--release resolute --branch current --variant xfce" in message
    assert "sid" not in message  # the Kali build is an application image too


def test_no_match_lists_what_exists(assets: list[dict[str, Any]]) -> None:
    with pytest.raises(BuildError) as error:
        find_image(assets, board="orangepipc", release="bookworm", branch="current",
                   variant="minimal")
    assert str(error.value).endswith(
        "the index has: --release resolute --branch current --variant xfce; "
        "--release trixie --branch current --variant minimal")


def test_board_missing_from_the_index(assets: list[dict[str, Any]]) -> None:
    with pytest.raises(BuildError, match="Armbian's index has no images for board orangepi800"):
        find_image(assets, board="orangepi800", release="trixie", branch="current",
                   variant="minimal")


def test_uefi_board_downloads_the_generic_image(assets: list[dict[str, Any]]) -> None:
    image = find_image(assets, board="orangepi6-plus", release="trixie", branch="current",
                       variant="minimal")
    assert "/uefi-arm64/archive/" in image.url


def test_mirror_rewrites_only_dl_armbian_com(assets: list[dict[str, Any]]) -> None:
    mirror = "http://127.0.0.1:8080/armbian"
    image = find_image(assets, board="orangepi5", release="trixie", branch="current",
                       variant="minimal", mirror=mirror)
    assert image.url.startswith("http://127.0.0.1:8080/armbian/orangepi5/archive/Armbian_26.5.1")
    assert image.sha_url.startswith(mirror) and image.asc_url.startswith(mirror)
    github = "https://github.com/armbian/community/releases/download/x/a.img.xz"
    assert use_mirror(github, mirror) == github


@pytest.mark.parametrize(("data", "message"), [
    (b"<html>", "is not JSON"),
    (b'{"boards": []}', "has no 'assets' list"),
    (b"[]", "has no 'assets' list"),
])
def test_not_an_index(data: bytes, message: str) -> None:
    with pytest.raises(BuildError, match=message):
        parse_index(data, "http://x/armbian-images.json")


def test_snapshot_has_what_the_notes_promise() -> None:
    if not SNAPSHOT.exists():
        pytest.skip(f"Armbian index snapshot not found at {SNAPSHOT}")
    repos = {a["download_repository"] for a in json.loads(SNAPSHOT.read_text())["assets"]}
    assert {"archive", "community", "distribution"} <= repos
