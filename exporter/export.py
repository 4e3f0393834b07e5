"""`starcast export`: checkpoint -> plain ONNX graph -> parity check -> export folder, written atomically.

Everything is written into a temporary folder beside the target and renamed into place at the end, so a
failed or interrupted export leaves no half-written folder and never damages an existing one.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from starcast.errors import UserError
from starcast.exporter.checkpoint import DTYPES, Checkpoint, load_model, open_checkpoint
from starcast.exporter.manifest import io_signature, package_versions, write_manifest
from starcast.exporter.onnx_export import IR_VERSION, OPSET, export_onnx
from starcast.exporter.verify import ParityReport, check_parity
from starcast.progress import QUIET, Progress

MODEL_FILE = "model.onnx"


class ParityError(Exception):
    """The exported graph does not compute what the reference computes: a bug, reported with its numbers."""


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise UserError(f"{output}: already exists (pass --overwrite to replace it)")
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder")
    if not output.parent.is_dir():
        raise UserError(f"{output.parent}: no such folder")


@contextmanager
def atomic_folder(output: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `output`; on success it replaces `output`, on failure it vanishes."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(
    source: str,
    output: Path,
    dtype: str = "fp32",
    overwrite: bool = False,
    fuse_target: str | None = "cpu",
    engine: tuple[Any, str] | None = None,
    quantize: tuple[int, int] | None = None,
    progress: Progress = QUIET,
) -> dict[str, Any]:
    """Export `source` (a checkpoint folder or Hub id) to `output`, plus a fused graph for `fuse_target` unless
    it is None; returns the manifest."""
    check_dtype(dtype)
    if quantize is not None:
        from starcast.graphs.quantize import check_options

        check_options(*quantize)
    if fuse_target is not None:
        from starcast.graphs.fuse import TARGETS

        if fuse_target not in TARGETS:
            raise UserError(f"unknown target {fuse_target!r} (supported: {', '.join(TARGETS)})")
    output = output.expanduser().absolute()
    check_output(output, overwrite)
    checkpoint = open_checkpoint(source)
    with progress.stage("load", str(checkpoint.folder)):
        model = load_model(checkpoint, DTYPES[dtype], progress)
    with atomic_folder(output) as tmp:
        with progress.stage("trace", f"{checkpoint.config.n_layer} layers, {dtype}"):
            export_onnx(model, tmp / MODEL_FILE)
        with progress.stage("save"):
            copy_side_files(checkpoint, tmp)
        with progress.stage("verify", "ONNX Runtime CPU vs PyTorch reference"):
            report = check_parity(model, tmp / MODEL_FILE, dtype)
        del model  # the PyTorch weights are not needed past this point: free them before fusing (1.1B: 4.5 GB)
        gc.collect()
        progress.say(report.summary())
        if not report.passed:
            raise ParityError(report.summary())
        manifest = build_manifest(checkpoint, tmp, dtype, report, progress.timings)
        if fuse_target is not None:
            from starcast.graphs.optimize import write_fused

            manifest["fused"] = write_fused(tmp, manifest, fuse_target, progress)
        if quantize is not None:
            from starcast.graphs.quantize import quantize_folder

            manifest["quantization"] = quantize_folder(tmp, manifest, *quantize, None, progress)
        if engine is not None:  # UNRUN here: TensorRT is not installable on this project's machines
            from starcast.exporter.tensorrt import ENGINE_DIR, build_engine

            limits, precision = engine
            with progress.stage("tensorrt", f"{precision}, profiles for {limits}"):
                manifest["tensorrt"] = build_engine(
                    tmp / MODEL_FILE, checkpoint.config, tmp / ENGINE_DIR, limits, precision
                )
        manifest["timings_s"] = dict(progress.timings)
        write_manifest(tmp, manifest)
    return manifest


def derive_export(source: Path, output: Path, overwrite: bool, change: Callable[[Path, dict], None]) -> dict:
    """A new export folder: a copy of `source` (checked against its manifest) changed in place by `change`,
    written atomically beside `output`. The source export is never modified."""
    from starcast.exporter.manifest import read_manifest, verify_files

    source, output = source.expanduser().absolute(), output.expanduser().absolute()
    manifest = read_manifest(source)
    if output == source:
        raise UserError(f"{output}: the output must differ from the source export, which is never modified")
    check_output(output, overwrite)
    verify_files(source, manifest)
    with atomic_folder(output) as tmp:
        for name in manifest["files"]:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, tmp / name)
        change(tmp, manifest)
        write_manifest(tmp, manifest)
    return manifest


def copy_side_files(checkpoint: Checkpoint, folder: Path) -> None:
    shutil.copy2(checkpoint.folder / "config.json", folder / "config.json")
    for path in checkpoint.side_files:
        shutil.copy2(path, folder / path.name)


def build_manifest(
    checkpoint: Checkpoint, folder: Path, dtype: str, report: ParityReport, timings: dict[str, float]
) -> dict[str, Any]:
    cfg = checkpoint.config
    return {
        "source": str(checkpoint.folder.absolute()),
        "model": MODEL_FILE,
        "dtype": dtype,
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "config": cfg.to_hf_dict(),
        "parameters": cfg.parameter_count(),
        "versions": package_versions(),
        "io": io_signature(folder / MODEL_FILE),
        "parity": report.to_dict(),
        "timings_s": dict(timings),
    }


def recheck(folder: Path, source: str | None = None, progress: Progress = QUIET) -> ParityReport:
    """`starcast check`: verify files against the manifest, then re-run parity against the source checkpoint."""
    from starcast.exporter.manifest import read_manifest, verify_files

    folder = folder.expanduser().absolute()
    manifest = read_manifest(folder)
    with progress.stage("files", "sha256 against starcast.json"):
        verify_files(folder, manifest)
    dtype = manifest.get("dtype", "fp32")
    check_dtype(dtype)
    checkpoint = open_checkpoint(source or manifest["source"])
    with progress.stage("load", str(checkpoint.folder)):
        model = load_model(checkpoint, DTYPES[dtype])
    with progress.stage("verify", "ONNX Runtime CPU vs PyTorch reference"):
        report = check_parity(model, folder / manifest.get("model", MODEL_FILE), dtype)
    progress.say(report.summary())
    return report
