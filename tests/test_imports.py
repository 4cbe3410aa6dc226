"""Each command loads only its own modules and the shared floor (builder.entry,
builder.compression, ...): flash-image and try-image must not drag in the build pipeline, its
configuration or jinja2, and the first-boot package, which the card runs on its own, nothing
of the builder but itself and builder.files; the host's preseed reader only its format module.
Checked in a fresh interpreter, as a user's command starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

BUILD_ONLY = {"builder.pipeline", "builder.cli", "builder.config", "builder.config_values",
              "builder.customize",
              "builder.stages", "builder.fetch", "builder.download", "builder.armbian",
              "builder.wheels", "builder.debian", "builder.chroot", "builder.output",
              "builder.sbom", "cyclonedx", "jinja2"}
# flash-image's house: `import builder.flash` (its console script's entry point) loads all of it.
FLASH = {"builder.flash", "builder.flash.bmap", "builder.flash.certificate", "builder.flash.cli",
         "builder.flash.device",
         "builder.flash.personalise", "builder.flash.source", "builder.flash.write"}


def loaded_by(module: str) -> set[str]:
    code = (f"import json, sys, {module}; "
            f"print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=True)
    return set(json.loads(result.stdout))


@pytest.mark.parametrize("module", ["builder.flash", "builder.tryimage"])
def test_a_command_loads_nothing_of_the_build(module: str) -> None:
    loaded = loaded_by(module)
    assert module in loaded
    assert loaded & BUILD_ONLY == set()


def test_flash_image_loads_its_own_package() -> None:
    loaded = loaded_by("builder.flash")
    assert {m for m in loaded if m.startswith("builder.flash")} == FLASH


# What the preseed format (builder.firstboot.answers) may bring along.
PRESEED_FORMAT = {"builder", "builder.files", "builder.firstboot", "builder.firstboot.card",
                  "builder.firstboot.answers"}


def test_the_first_boot_program_stands_alone() -> None:
    loaded = loaded_by("builder.firstboot.cli")
    assert {m for m in loaded if m.startswith("builder") and not m.startswith(
        "builder.firstboot.")} <= {"builder", "builder.files", "builder.firstboot"}
    assert "yaml" not in loaded and "jinja2" not in loaded
    # The package's own import is light: its docstring is the map, nothing more.
    assert {m for m in loaded_by("builder.firstboot") if m.startswith("builder")} == \
        {"builder", "builder.firstboot"}


@pytest.mark.parametrize("module", ["builder.firstboot.answers", "builder.preseed"])
def test_the_preseed_reader_loads_only_the_format(module: str) -> None:
    """The host checks a preseed file with the card's own parser, without its console,
    wizard or boot session."""
    loaded = {m for m in loaded_by(module) if m.startswith("builder")}
    assert loaded - {module, "builder.errors"} <= PRESEED_FORMAT
    assert "builder.firstboot.answers" in loaded


def test_build_image_still_loads_its_pipeline() -> None:
    """The check above can fail: the same probe sees the pipeline where it belongs."""
    assert {"builder.pipeline", "builder.config"} <= loaded_by("builder.cli")
