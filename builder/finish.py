"""The steps after the scripts, from the customized root to the outputs: build-only state
out of the image and its free space cleared (finalize-image), the filesystem, partition and
file shrunk (shrink-image), the setup drive added after the root (add-setup-partition), the
compressed image with its checksum and bmap (write-outputs), and the manifest with the SBOM
and what scripts handed over (write-manifest). pipeline.py runs them in that order; each
takes the build's Context.
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from builder import __version__, customize, fetch, image, output, sbom, setup_partition
from builder.cache import CachedImage
from builder.config import Config
from builder.inside import in_root
from builder.mount import remove_path

if TYPE_CHECKING:
    # Types only: pipeline.py imports this module to run these steps.
    from builder.pipeline import Context, RootMount, Workspace


# Files that would make every card flashed from the image share a secret or an identity,
# or that only the build needed. SSH host keys are made anew at first boot (Armbian's
# firstrun; overlays/ carries a unit that does it on other bases).
BUILD_ONLY = (
    "var/lib/dbus/machine-id",
    "var/lib/systemd/random-seed",
    "var/lib/systemd/credential.secret",
    "etc/ssh/ssh_host_*",
    "var/cache/apt/*.bin",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/lib/apt/lists/*_*",
    "var/log/apt/*",
    "var/log/journal/*",
    "var/log/*.log",
    "root/.bash_history",
    "root/.python_history",
    "root/.cache",
    "root/.local/share/jupyter",
    "home/*/.bash_history",
    "home/*/.python_history",
    "home/*/.cache",
    "home/*/.local/share/jupyter/runtime",
    "var/tmp/*",
    "var/cache/apt/archives/*.deb",
)


def finalize_image(ctx: Context, root: RootMount
                   ) -> tuple[list[dict[str, str]], sbom.Inventory]:
    """Build-only state out, the package list and the SBOM's inventory read, free space
    zeroed and synced (read here, while the root is mounted anyway; shrinking changes no
    file)."""
    path = root.path
    for pattern in BUILD_ONLY:
        for found in image_glob(path, pattern):
            remove_path(found)
    machine_id = in_root(path, "etc/machine-id")
    # Empty, not absent: systemd then makes a new one at first boot. "uninitialized", which
    # a script may have chosen (the appliance does), also says it is the first boot.
    if machine_id.exists() and machine_id.read_text() != "uninitialized\n":
        machine_id.write_text("")
    inventory = sbom.read_inventory(path, ctx.config.venv.path)
    packages = output.installed_packages(path)
    # Freed blocks go back to the sparse file as holes: zeros that compress to nothing, and
    # nothing deleted during the build can be read back from the image.
    image.clear_free_space(path)
    image.sync_fs(path)
    return packages, inventory


def image_glob(root: Path, pattern: str) -> list[Path]:
    """The paths matching `pattern` ("home/*/.bash_history") in the image, each directory on
    the way resolved as the image sees it, so a link can never lead a removal to the host."""
    *directories, name = pattern.split("/")
    found = [root]
    for part in directories:
        found = [child for parent in found for child in in_root(root, str(parent.relative_to(
            root))).glob(part) if in_root(root, str(child.relative_to(root))).is_dir()]
    return [path for parent in found
            for path in in_root(root, str(parent.relative_to(root))).glob(name)]


def shrink_image(ctx: Context, work: Workspace, partition: image.Partition) -> None:
    current = image.current_partition(work.image, partition.number)
    image.shrink(ctx.ledger, work.image, current, ctx.config.image.free_space)


def wants_setup_partition(config: Config) -> bool:
    """The appliance's first boot reads it: with the built-in scripts only."""
    return config.image.setup_partition and config.customize.builtin


def add_setup_partition(ctx: Context, work: Workspace, name: str) -> None:
    files = setup_partition.contents(customize.template_context(ctx.config, ctx.board))
    added = setup_partition.add_setup_partition(work.image, files,
                                                setup_partition.volume_id_for(name))
    ctx.setup_partition = {"number": added.number, "label": setup_partition.LABEL,
                           "size": added.size, "files": sorted(files)}


def write_outputs(ctx: Context, work: Workspace, out: output.Outputs) -> None:
    compressed = output.write_image(work.image, out, ctx.config.image.compression_level)
    output.write_checksum(compressed, out)
    output.write_bmap(work.image, out)


def write_manifest(ctx: Context, work: Workspace, out: output.Outputs, source: fetch.BaseSource,
                   base: CachedImage, packages: list[dict[str, str]],
                   inventory: sbom.Inventory) -> None:
    """The files scripts handed over (published as <image>.<name>), the software bill of
    materials, and the manifest, with their manifest/<key>.json sections."""
    files, sections = customize.read_outputs(work.work / "output")
    for name, path in files.items():
        shutil.copyfile(path, out.add(f".{name}"))
    built = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    sbom_file = write_sbom(ctx, out, source, base, inventory, built)
    output.write_manifest(out, {**sections, **{
        "builder": {"name": "orangepi-jupyter", "version": __version__},
        "built": built.isoformat(timespec="seconds"),
        "board": customize.template_context(ctx.config, ctx.board)["board"],
        # What the build started from and how it was verified (base.verify, signer, sha256).
        "base": fetch.manifest_record(source, base),
        "config": ctx.config.to_dict(),
        "packages": packages,
        "sbom": sbom_file,
        # The steps up to the outputs: this one and publishing come after.
        "steps": {name: round(seconds, 1) for name, seconds in ctx.timings.items()},
        "scripts": {name: round(seconds, 1) for name, seconds in ctx.script_timings.items()},
        # Each stage kept in or restored from the step cache, in order, with its key.
        "stages": ctx.stages,
        # The FAT partition after the root, which the card removes at first boot.
        "setup_partition": ctx.setup_partition,
    }})


def write_sbom(ctx: Context, out: output.Outputs, source: fetch.BaseSource, base: CachedImage,
               inventory: sbom.Inventory, built: datetime.datetime) -> str:
    """The software bill of materials of what finalize-image found in the image; returns the
    SBOM's file name."""
    cfg, board = ctx.config, ctx.board
    name = f"{cfg.output.product}-{board.id}-{cfg.base.release}"
    product = sbom.Product(
        # build_image names the image <name>-<date>: the date is its version.
        name=name, version=out.name.removeprefix(f"{name}-"),
        description=f"Jupyter appliance for the {board.name} ({board.id}, {board.arch})",
        built=built, builder_version=__version__,
        properties={"board": board.id, "arch": board.arch, "release": cfg.base.release})
    ancestor = sbom.Ancestor(
        name=source.filename, description=source.label,
        version=source.armbian.version if source.armbian else None,
        url=source.location if source.is_remote else None,
        # A Debian base is made here: its cache key is a digest of the recipe, not of a file.
        sha256=base.sha256 if source.kind == "file" else None)
    return output.write_sbom(out, sbom.to_json(sbom.bill_of_materials(inventory, product,
                                                                     ancestor)))
