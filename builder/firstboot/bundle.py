"""The card's copy of the first-boot program: one self-contained zipapp of this package and the
two builder modules it uses, run by the image's own python3.

    python -m builder.firstboot.bundle OUT      (customize.d/50-install-firstboot.host)

The archive is the same bytes for the same sources: entries sorted, with fixed timestamps and
modes, and stored rather than compressed (deflate's output may differ between zlib versions).
So an image built twice holds the same file.
"""

from __future__ import annotations

import io
import os
import sys
import zipapp
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
BUILDER = PACKAGE.parent
INTERPRETER = "/usr/bin/python3"
# zip's earliest date: a fixed time instead of the sources' modification times.
EPOCH = (1980, 1, 1, 0, 0, 0)


def members() -> dict[str, Path]:
    """Name in the archive: source file. The bundle's own module stays on the host."""
    found = {"__main__.py": PACKAGE / "__main__.py",
             "builder/__init__.py": BUILDER / "__init__.py",
             "builder/files.py": BUILDER / "files.py"}
    for source in PACKAGE.glob("*.py"):
        if source.name != "bundle.py":
            found[f"builder/firstboot/{source.name}"] = source
    return dict(sorted(found.items()))


def build(target: Path) -> None:
    """Write the zipapp to `target`, mode 0755, replacing it whole."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as bundle:
        for name, source in members().items():
            info = zipfile.ZipInfo(name, EPOCH)
            info.external_attr = 0o100644 << 16
            bundle.writestr(info, source.read_bytes())
    archive.seek(0)
    partial = target.with_name(f".{target.name}.tmp")
    # Written into an image: a link by that name there must be replaced, not followed.
    partial.unlink(missing_ok=True)
    zipapp.create_archive(archive, partial, interpreter=INTERPRETER)
    partial.chmod(0o755)
    os.replace(partial, target)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m builder.firstboot.bundle OUT", file=sys.stderr)
        return 2
    build(Path(argv[0]))
    print(f"{argv[0]}: {', '.join(members())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
