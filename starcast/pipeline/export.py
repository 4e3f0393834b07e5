"""`starcast export`: checkpoint -> plain graph -> proof -> fused graph -> quantized graphs -> TensorRT engine,
into an export folder written atomically (pipeline/folders.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from starcast.contract import interfaces as io
from starcast.contract.builtin import MODELS, PREFIX
from starcast.contract.dtypes import check_dtype
from starcast.contract.errors import ParityError, UserError
from starcast.contract.graph_files import IR_VERSION, OPSET, PLAIN_MODEL, io_signature, load_header, save_model
from starcast.contract.manifest import GraphRecord, Manifest, package_versions, write_manifest
from starcast.graphs.quantize import QUANTIZATIONS, check_options
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


def export_bytes(config, dtype: str, quantize: tuple[str, int] | None) -> int:
    """About what the export folder takes on disk at its largest: the float weights, plus while quantizing the
    quantized graphs beside them (4 or 8 bits a weight, scales, the head's own copy)."""
    parameters = config.parameter_count()
    size = parameters * (2 if dtype == "fp16" else 4)
    if quantize is not None:
        size += parameters * QUANTIZATIONS[quantize[0]] // 8 * 5 // 4 + config.vocab_size * config.n_embd
    return size + size // 100 + (1 << 20)  # graphs, tokenizer and manifest: small beside the weights


def check_room(output: Path, need: int) -> None:
    """Refuse, before any work, a disk that cannot hold the export."""
    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(
            f"{folder}: not enough free space for the export ({free / 2**20:,.0f} MiB free, it needs about "
            f"{need / 2**20:,.0f} MiB)"
        )


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
    from starcast.exporter.checkpoint import TORCH_DTYPES, check_exportable, open_checkpoint
    from starcast.exporter.reference import StreamedReference
    from starcast.exporter.trace import trace_graph
    from starcast.exporter.weights import write_weights
    from starcast.pipeline.proof import reference_parity

    check_request(dtype, fuse_target, quantize)
    checkpoint = open_checkpoint(source)
    inputs = (checkpoint.folder, checkpoint.root) if not source.startswith(PREFIX) else (MODELS,)
    output = check_output(output, overwrite, inputs)
    config, torch_dtype = checkpoint.config, TORCH_DTYPES[dtype]
    check_exportable(checkpoint)
    check_room(output, export_bytes(config, dtype, quantize))
    with atomic_folder(output, overwrite) as tmp:
        plain = tmp / PLAIN_MODEL
        with progress.stage("trace", f"{config.n_layer} layers, {dtype}, without the weights"):
            proto, refs = trace_graph(config, torch_dtype)
        with progress.stage("weights", f"{checkpoint.folder} -> {PLAIN_MODEL}"):
            write_weights(proto, refs, checkpoint, torch_dtype, plain, config.tie_word_embeddings,
                          progress.bar("weights", gigabytes=True))  # fmt: skip
            save_model(proto, plain)
        with progress.stage("save"):
            copy_side_files(checkpoint, tmp)
        with progress.stage("verify", f"ONNX Runtime {proof_provider} vs PyTorch reference, one layer resident"):
            report = reference_parity(StreamedReference(checkpoint, torch_dtype), plain, dtype, provider=proof_provider)
        progress.say(report.summary())
        if not report.passed:
            raise ParityError(report.summary())
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
