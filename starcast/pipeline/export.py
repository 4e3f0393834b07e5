"""`starcast export`: checkpoint -> plain graph -> proof -> fused graph -> quantized graphs -> TensorRT engine,
into an export folder written atomically (pipeline/folders.py)."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

from starcast.contract import interfaces as io
from starcast.contract.builtin import MODELS, PREFIX
from starcast.contract.dtypes import check_dtype
from starcast.contract.errors import ParityError, UserError
from starcast.contract.graph_files import IR_VERSION, OPSET, PLAIN_MODEL, io_signature, load_header
from starcast.contract.manifest import GraphRecord, Manifest, package_versions, write_manifest
from starcast.graphs.quantize import check_options
from starcast.pipeline.derived import add_fused, add_quantization
from starcast.pipeline.folders import atomic_folder, check_output
from starcast.pipeline.progress import QUIET, Progress
from starcast.runtime.export_folder import read_eos
from starcast.runtime.text import Tokenizer

VERSIONS = ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "onnx-ir", "numpy")


def check_request(dtype: str, fuse_target: str | None, quantize: tuple[str, int] | None) -> None:
    """Every option checked before any work."""
    check_dtype(dtype)
    if fuse_target is not None and fuse_target not in io.TARGETS:
        raise UserError(f"unknown target {fuse_target!r} (supported: {', '.join(io.TARGETS)})")
    if quantize is not None:
        check_options(*quantize)


def source_name(source: str, folder: Path) -> str:
    """What the manifest records as the source: `builtin:NAME`, or the folder's absolute path."""
    return source if source.startswith(PREFIX) else str(folder)


def copy_side_files(checkpoint, folder: Path) -> None:
    """config.json, the tokenizer and generation files, each checked: a file that would make the export
    unusable is refused now, not when someone generates from it."""
    shutil.copyfile(checkpoint.file("config.json"), folder / "config.json")
    for path in checkpoint.side_files:
        shutil.copyfile(path, folder / path.name)
    Tokenizer.from_export(folder)
    read_eos(folder, checkpoint.config)


def export(
    source: str,
    output: Path,
    dtype: str = "fp32",
    overwrite: bool = False,
    fuse_target: str | None = "cpu",
    engine=None,
    quantize: tuple[str, int] | None = None,
    progress: Progress = QUIET,
    proof_provider: str = "cpu",
) -> Manifest:
    """Export `source` (a checkpoint folder, Hub id or builtin:NAME) to `output`, plus a fused graph for
    `fuse_target` unless it is None, quantized graphs (("int8" | "int4", block size)) and a TensorRT engine
    ((limits) for runtime/tensorrt/builder.py); returns the manifest. The proofs run ONNX Runtime on
    `proof_provider` (`starcast selftest` proves on the GPU)."""
    from starcast.exporter.checkpoint import TORCH_DTYPES, load_model, open_checkpoint
    from starcast.exporter.onnx_export import export_onnx
    from starcast.pipeline.proof import reference_parity

    check_request(dtype, fuse_target, quantize)
    checkpoint = open_checkpoint(source)
    inputs = (checkpoint.folder, checkpoint.root) if not source.startswith(PREFIX) else (MODELS,)
    output = check_output(output, overwrite, inputs)
    with progress.stage("load", str(checkpoint.folder)):
        model = load_model(checkpoint, TORCH_DTYPES[dtype], progress.bar("load"))
    with atomic_folder(output, overwrite) as tmp:
        plain = tmp / PLAIN_MODEL
        with progress.stage("trace", f"{checkpoint.config.n_layer} layers, {dtype}"):
            export_onnx(model, plain)
        with progress.stage("save"):
            copy_side_files(checkpoint, tmp)
        with progress.stage("verify", f"ONNX Runtime {proof_provider} vs PyTorch reference"):
            report = reference_parity(model, plain, dtype, provider=proof_provider)
        del model  # the PyTorch weights are not needed past this point: free them before fusing (1.1B: 4.5 GB)
        gc.collect()
        progress.say(report.summary())
        if not report.passed:
            raise ParityError(report.summary())
        config = checkpoint.config
        manifest = Manifest(
            source=source_name(source, checkpoint.folder),
            dtype=dtype,
            config=config,
            plain=GraphRecord(PLAIN_MODEL, io.CONCAT_CACHE, io_signature(load_header(plain)), report.proof()),
            parameters=config.parameter_count(),
            versions=package_versions(*VERSIONS),
            opset=OPSET,
            ir_version=IR_VERSION,
        )
        if fuse_target is not None:
            add_fused(tmp, manifest, fuse_target, progress, proof_provider)
        if quantize is not None:
            add_quantization(tmp, manifest, *quantize, None, progress)
        if engine is not None:  # UNRUN here: TensorRT is not installable on this project's machines
            from starcast.pipeline.engine import add_engine

            add_engine(tmp, manifest, engine, b"", progress)
        manifest.timings_s = dict(progress.timings)
        write_manifest(tmp, manifest)
    return manifest
