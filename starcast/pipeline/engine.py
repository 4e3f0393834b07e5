"""TensorRT engines in export folders: `export --format trt`, and `starcast build-engine` on an existing export
(built in a staging folder of its own, then moved to `trt/`; the manifest is replaced atomically).

UNRUN: TensorRT is not installable on this project's machines (see runtime/tensorrt/builder.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from starcast.contract.errors import UserError
from starcast.contract.manifest import Manifest, read_manifest, verify_files, write_manifest
from starcast.contract.paths import confine, read_bytes
from starcast.pipeline.folders import locked, scratch_folder
from starcast.pipeline.progress import QUIET, Progress
from starcast.runtime.tensorrt.builder import ENGINE_DIR, TIMING_CACHE, Limits, build_engine, require_tensorrt

TIMING_CACHE_LIMIT = 1 << 30


def add_engine(
    folder: Path, manifest: Manifest, limits: Limits, timing_cache: bytes, progress: Progress, out: Path | None = None
) -> None:
    """Build the engine of `folder`'s plain graph into `out/trt` (default: `folder/trt`)."""
    with progress.stage("tensorrt", f"strongly typed {manifest.dtype}, profiles for {limits}"):
        manifest.tensorrt = build_engine(
            manifest.path(folder, manifest.plain.model), manifest.config, (out or folder) / ENGINE_DIR, limits,
            timing_cache,
        )  # fmt: skip


def build_engine_in_place(export_dir: Path, limits: Limits, overwrite: bool, progress: Progress = QUIET) -> Manifest:
    """Add (or with `overwrite`, rebuild) `trt/` in an export; a failed build leaves the export as it was. A
    rebuild starts from the previous build's timing cache."""
    require_tensorrt()
    folder = export_dir.expanduser().absolute()
    manifest = read_manifest(folder)
    engine_dir = confine(folder, ENGINE_DIR, str(folder))
    if engine_dir.exists() and not overwrite:
        raise UserError(f"{folder}: already has a TensorRT engine folder {ENGINE_DIR}/ (pass --overwrite to rebuild)")
    if engine_dir.exists() and manifest.tensorrt is None:
        raise UserError(f"{folder}: {ENGINE_DIR}/ exists but starcast did not build it; it is left as it is")
    verify_files(folder, manifest)
    cache_path = confine(folder, f"{ENGINE_DIR}/{TIMING_CACHE}", str(folder))
    timing_cache = read_bytes(cache_path, TIMING_CACHE_LIMIT) if cache_path.is_file() else b""
    with scratch_folder(folder / ENGINE_DIR) as staging:
        add_engine(folder, manifest, limits, timing_cache, progress, out=staging)
        with locked(folder):
            if engine_dir.exists():
                shutil.rmtree(engine_dir)
            (staging / ENGINE_DIR).rename(engine_dir)
            write_manifest(folder, manifest)  # hashes every file, the engine included; replaced atomically
    return manifest
