"""try-image --smoke's report: the checks that passed, in order, each phase's time, the notes
and the failure; written as report.json and summary.txt into a directory of the run's own, so
that a later run never takes an earlier one's evidence away."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from builder import log
from builder.compression import image_suffix
from builder.errors import BuildError


@dataclass
class Report:
    """What --smoke found, written as report.json and printed as a summary."""

    image: str
    board: str = ""
    machine: str = ""
    ok: bool = False
    failed_phase: str | None = None
    error: str | None = None
    phases: dict[str, float] = field(default_factory=dict)      # seconds each
    checks: list[str] = field(default_factory=list)             # what passed, in order
    notes: list[str] = field(default_factory=list)
    stack: dict[str, Any] = field(default_factory=dict)
    guest_state: str | None = None      # what the guest said about itself after a failure

    def passed(self, what: str) -> None:
        self.checks.append(what)
        log.info(f"ok: {what}")


def last_serial_log(directory: Path) -> Path | None:
    """The serial log of the boot started last (boot1, then boot2): the failure is in it."""
    logs = sorted(directory.glob("serial-boot*.log"))
    return logs[-1] if logs else None


def summary(report: Report) -> str:
    lines = [f"try-image --smoke: {'PASSED' if report.ok else 'FAILED'} — {report.image} "
             f"({report.board} on QEMU {report.machine})", "", "phases (seconds):"]
    lines += [f"  {name:<12} {seconds:7.0f}" for name, seconds in report.phases.items()]
    lines += ["", "checks passed:"] + [f"  ✓ {c}" for c in report.checks]
    if report.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in report.notes]
    if not report.ok:
        lines += ["", f"FAILED in {report.failed_phase}: {report.error}"]
    return "\n".join(lines) + "\n"


def write_report(report: Report, directory: Path) -> None:
    (directory / "report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    (directory / "summary.txt").write_text(summary(report))


def new_report_directory(reports: Path, image: Path) -> Path:
    """A directory of this run's own in `reports`, named after the image and the time, and
    `reports/latest` pointing to it. An earlier run's report is never touched: after a
    failure, the next run (of this image or another) must not take its evidence away."""
    try:
        reports.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"--report {reports}: cannot make it ({exc.strerror}); give a "
                         f"writable directory") from None
    stem = image.name[: -len(image_suffix(image.name))] or image.name
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        directory = reports / (name if n == 1 else f"{name}-{n}")
        try:
            directory.mkdir()
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise BuildError(f"--report {reports}: cannot write there ({exc.strerror}); give "
                             f"a writable directory") from None
    else:
        raise BuildError(f"--report {reports}: too many reports named {name}")
    latest = reports / "latest"
    if not latest.exists() or latest.is_symlink():
        link = reports / f".latest-{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(directory.name)
        os.replace(link, latest)
    return directory
