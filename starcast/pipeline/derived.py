"""What an export derives from its plain graph, each proven before it is recorded: the fused graph, the
quantized graphs, the TensorRT engine. Each works inside a folder starcast is building (a temporary folder, or
its own `trt/` staging folder) and fills in the manifest."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np

from starcast.contract import interfaces as io
from starcast.contract.errors import ParityError, UserError
from starcast.contract.graph_files import FUSED_MODEL, io_signature, load_header, weights_file
from starcast.contract.manifest import GraphRecord, Manifest, Proof
from starcast.contract.paths import confine
from starcast.graphs.fuse import fuse_file
from starcast.graphs.quantize import DYNAMIC, check_options, quantize_graph, settings
from starcast.pipeline.accuracy import eval_tokens_for, measure
from starcast.pipeline.progress import QUIET, Progress
from starcast.pipeline.proof import (
    RECORDED_LOGITS,
    RECORDED_TOLERANCE,
    TOLERANCES,
    graph_parity,
    parity_inputs,
    prove_fused,
    recorded_logits,
)

FLOAT_DIR = ".float"  # inside the folder being built: the unquantized graphs, until their accuracy is measured
# How far the quantized fused graph may be from the quantized plain graph: the quantization's own measured
# distance from the float graph, with room for another CPU's rounding.
QUANTIZED_MARGIN = 1.5


def add_fused(folder: Path, manifest: Manifest, target: str, progress: Progress = QUIET, provider: str = "cpu") -> None:
    """Fuse the plain graph into `fused.onnx` beside it (sharing its weights file) and prove it."""
    if target not in io.TARGETS:
        raise UserError(f"unknown target {target!r} (supported: {', '.join(io.TARGETS)})")
    config, dtype = manifest.config, manifest.dtype
    fused_path = folder / FUSED_MODEL
    with progress.stage("fuse", f"target {target}"):
        report = fuse_file(manifest.path(folder, manifest.plain.model), fused_path, config, target, dtype)
    entry = report.to_dict(config.n_layer)
    progress.say(
        f"nodes {entry['nodes']['before']} -> {entry['nodes']['after']} "
        f"({entry['nodes_per_layer']['before']} -> {entry['nodes_per_layer']['after']} per layer); "
        f"fused ops {entry['fused_ops']}; matches {entry['matches']}"
    )
    kind, tolerance = TOLERANCES[dtype]
    record = GraphRecord(
        FUSED_MODEL, io.TARGET_INTERFACES[target], io_signature(load_header(fused_path)), Proof(kind, tolerance, False),
        target, entry,
    )  # fmt: skip
    with progress.stage("verify-fused", f"fused vs plain graph, ONNX Runtime {provider}"):
        record.parity = prove_fused(folder, manifest, record, provider)
    progress.say(f"fused parity ok: {record.parity.measured['max_error']:.2e} ({kind}, tolerance {tolerance:.0e})")
    manifest.fused = record


def move_aside(folder: Path, names: list[str]) -> Path:
    """Move the graphs `names` and their weights files into FLOAT_DIR (same relative paths); returns it."""
    floats = folder / FLOAT_DIR
    for name in names:
        for file in (name, weights_file(name)):
            path = confine(folder, file, str(folder))
            if path.is_file():
                destination = floats / file
                destination.parent.mkdir(parents=True, exist_ok=True)
                path.rename(destination)
    return floats


def accuracy_level(folder: Path, manifest: Manifest, bits: int, block_size: int) -> int:
    """MatMulNBits' accuracy_level: 4 (int8 activations, the fast CPU kernels) where its prepacked weights fit
    the export's memory bound (0.25 x the float weights + 1 GiB, with room for the rest), else 0 (fp32
    activations): the proofs must run the kernel `generate` runs, and level 4's runs only prepacked."""
    plain = folder / manifest.plain.model
    float_bytes = sum(f.stat().st_size for f in folder.glob(weights_file(manifest.plain.model))) or plain.stat().st_size
    element = 2 if manifest.dtype == "fp16" else 4
    quantized = manifest.config.parameter_count() * (bits / 8 + element / block_size)
    # Measured: a prepacked 3B int4 session peaks at 1.45x the quantized bytes (benchmarks/RESULTS.md), beside
    # the ~0.5 GiB the export's process holds anyway.
    return 4 if 1.5 * quantized <= 0.25 * float_bytes + (512 << 20) else 0


def add_quantization(
    folder: Path, manifest: Manifest, quantization: str, block_size: int, eval_text: Path | None,
    progress: Progress = QUIET,
) -> None:  # fmt: skip
    """Quantize the export's graphs in place (a folder starcast is building), measure what it cost, and prove
    the quantized graphs: against the float graph (recorded as a tolerance against the reference, which
    `starcast check` re-proves) and the fused graph against the quantized plain graph."""
    bits = check_options(quantization, block_size)
    if quantization == DYNAMIC and manifest.fused is not None and manifest.fused.target != "cpu":
        raise UserError(f"{DYNAMIC} runs on the CPU only (DynamicQuantizeMatMul has no CUDA kernel): use int8")
    if manifest.quantization is not None:
        raise UserError(f"{folder.name}: already quantized ({manifest.quantization.get('quantization')})")
    config, dtype = manifest.config, manifest.dtype
    tokens = eval_tokens_for(folder, manifest.source, eval_text)
    graphs = [g.model for g in manifest.graphs]
    level = accuracy_level(folder, manifest, bits, block_size)
    floats = move_aside(folder, graphs)
    try:
        counts = {}
        for name in graphs:
            with progress.stage("quantize", f"{name}: {quantization}{f', block {block_size}' * (quantization != 'int8-dynamic')}"):  # noqa: E501
                target = confine(folder, name, str(folder))
                plain = folder / manifest.plain.model
                share = plain if name != manifest.plain.model and plain.parent == target.parent else None
                counts[name] = quantize_graph(
                    floats / name, target, quantization, block_size, share_with=share, accuracy_level=level
                )
        plain_float, plain_quantized = floats / manifest.plain.model, folder / manifest.plain.model
        with progress.stage("accuracy", "quantized vs float, ONNX Runtime CPU"):
            accuracy = measure(plain_float, plain_quantized, config, dtype, tokens)
            kind = manifest.plain.parity.kind
            distance = graph_parity(plain_float, plain_quantized, config, dtype, kind, parity_inputs(config.vocab_size))
        if not math.isfinite(distance):
            raise ParityError("the quantized graph produced NaN or infinite logits")
        progress.say(accuracy.summary())
    finally:
        shutil.rmtree(floats, ignore_errors=True)
    # From now on the quantized graph is proven against the logits it gives now (`starcast check`), which a changed
    # graph cannot match; the float graph's proof against the reference is kept beside it.
    logits, next_ids = recorded_logits(plain_quantized, config, dtype)
    np.savez(folder / RECORDED_LOGITS, logits=logits, next_ids=next_ids)
    kind, tolerance = RECORDED_TOLERANCE
    manifest.plain.parity = Proof(
        kind, tolerance, True,
        {"against": "recorded logits", "max_error": 0.0, "quantized_vs_float": distance,
         "float_graph_proof": manifest.plain.parity.to_json()},
    )  # fmt: skip
    if manifest.fused is not None:
        # MatMulNBits quantizes its activations (accuracy_level 4): two graphs whose activations differ by float
        # rounding can differ by a quantization step. The fused graph must stay within the quantization's own
        # distance from the float graph (and give the same greedy tokens).
        fused = manifest.fused
        fused.parity = Proof(fused.parity.kind, max(fused.parity.tolerance, QUANTIZED_MARGIN * distance), False)
        with progress.stage("verify-fused", "quantized fused vs quantized plain graph"):
            fused.parity = prove_fused(folder, manifest, fused)
    manifest.quantization = {
        "quantization": quantization,
        "bits": bits,
        "block_size": None if quantization == DYNAMIC else block_size,
        **settings(quantization),
        **({} if quantization == DYNAMIC else {"accuracy_level": level}),
        "graphs": counts,
        "accuracy": vars(accuracy),
        "recorded_logits": RECORDED_LOGITS,
    }
