"""Lint and type checks run with the tests, so CI fails on them like on a broken test."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import REPO


def tool(name: str) -> str:
    path = shutil.which(name, path=str(REPO / ".venv" / "bin")) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run ci/setup-host --dev")
    return path


def test_ruff() -> None:
    result = subprocess.run([tool("ruff"), "check", "builder", "tests"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_on_builder() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "builder"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
