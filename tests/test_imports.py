"""Each command loads only its own modules and the shared floor (builder.entry,
builder.compression, ...): flash-image and try-image must not drag in the build pipeline, its
configuration or jinja2, and the first-boot program, which the card runs on its own, nothing
of the package but itself. Checked in a fresh interpreter, as a user's command starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

BUILD_ONLY = {"builder.pipeline", "builder.cli", "builder.config", "builder.customize",
              "builder.stages", "builder.fetch", "builder.download", "builder.armbian",
              "builder.wheels", "builder.debian", "builder.chroot", "builder.output", "jinja2"}


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


def test_the_first_boot_program_stands_alone() -> None:
    loaded = loaded_by("builder.firstboot")
    assert {m for m in loaded if m.startswith("builder")} == {"builder", "builder.firstboot"}
    assert "yaml" not in loaded and "jinja2" not in loaded


def test_build_image_still_loads_its_pipeline() -> None:
    """The check above can fail: the same probe sees the pipeline where it belongs."""
    assert {"builder.pipeline", "builder.config"} <= loaded_by("builder.cli")
