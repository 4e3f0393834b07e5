"""`starcast optimize` and `starcast quantize`: a new export folder derived from an existing one, which is never
modified. The source's files are checked against its manifest, copied (by the names the manifest lists, each
confined to the source folder) into a folder being built beside the output, changed there, proven, and moved
into place atomically."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from starcast.contract.errors import UserError
from starcast.contract.manifest import Manifest, read_manifest, verify_files, write_manifest
from starcast.graphs.quantize import check_options
from starcast.pipeline.derived import add_fused, add_quantization
from starcast.pipeline.export import check_room, export_bytes
from starcast.pipeline.folders import atomic_folder, check_output
from starcast.pipeline.progress import QUIET, Progress
from starcast.runtime.generator import check_export_files


def derive_export(
    source: Path, output: Path, overwrite: bool, change: Callable[[Path, Manifest], None], extra_bytes: int = 0
) -> Manifest:
    """A new export folder: `source`'s files copied, then `change`d (it writes about `extra_bytes` more)."""
    source = source.expanduser().absolute()
    manifest = read_manifest(source)
    output = check_output(output, overwrite, inputs=(source,))
    verify_files(source, manifest)
    check_export_files(source, manifest)  # the recorded config describes config.json and the graph's tables
    copied = sum(manifest.path(source, name).stat().st_size for name in manifest.files)
    check_room(output, copied + extra_bytes + (1 << 20))
    with atomic_folder(output, overwrite) as tmp:
        for name in manifest.files:
            target = tmp.joinpath(*PurePosixPath(name).parts)  # `name` was confined when the manifest was read
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(manifest.path(source, name), target)
        change(tmp, manifest)
        write_manifest(tmp, manifest)
    return manifest


def optimize_export(source: Path, output: Path, target: str, overwrite: bool, progress: Progress = QUIET) -> Manifest:
    """`starcast optimize`: a new export folder = the plain export + its fused graph."""
    manifest = read_manifest(source.expanduser().absolute())
    if manifest.quantization is not None:
        raise UserError(
            f"{source}: is quantized ({manifest.quantization.get('quantization')}); optimize the float export it "
            f"was made from, then quantize the result"
        )
    if manifest.fused is not None:
        raise UserError(f"{source}: already has a fused graph ({manifest.fused.target}); nothing to do")

    def fuse(folder: Path, manifest: Manifest) -> None:
        add_fused(folder, manifest, target, progress)

    return derive_export(source, output, overwrite, fuse)


def quantize_export(
    source: Path, output: Path, quantization: str, block_size: int, eval_text: Path | None, overwrite: bool,
    progress: Progress = QUIET,
) -> Manifest:  # fmt: skip
    """`starcast quantize EXPORT_DIR OUT`: a new export folder with quantized graphs."""
    check_options(quantization, block_size)
    manifest = read_manifest(source.expanduser().absolute())
    if manifest.quantization is not None:
        raise UserError(f"{source}: already quantized ({manifest.quantization.get('quantization')})")

    def quantize(folder: Path, manifest: Manifest) -> None:
        add_quantization(folder, manifest, quantization, block_size, eval_text, progress)

    quantized = export_bytes(manifest.config, manifest.dtype, (quantization, block_size))
    floats = export_bytes(manifest.config, manifest.dtype, None)
    return derive_export(source, output, overwrite, quantize, extra_bytes=max(0, quantized - floats))
