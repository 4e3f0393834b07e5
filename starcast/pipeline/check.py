"""`starcast check EXPORT_DIR`: re-prove an export, each graph against the tolerance its manifest records.

1. every file against its sha256 (a manifest that lists no files is refused);
2. the tokenizer and generation config load, every graph is ONNX with its weights inside the folder;
3. the fused graph (the one `generate` runs by default) against the plain graph, greedily side by side;
4. the plain graph against the PyTorch reference of the source checkpoint: built-in sources are found by name;
   any other needs `--source CKPT` (a path recorded in a folder is not followed). A quantized plain graph is
   proven instead against the logits it gave when it was made (recorded in the export), tightly: its float
   graph, the one the reference proof was about, is gone.
Steps 1-3 need only the runtime; step 4 needs the export extra (PyTorch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from starcast.contract.builtin import PREFIX
from starcast.contract.errors import MissingExtra, ParityError, UserError
from starcast.contract.graph_files import check_graph_file
from starcast.contract.manifest import read_manifest, verify_files
from starcast.contract.paths import confine
from starcast.pipeline.progress import QUIET, Progress
from starcast.pipeline.proof import prove_fused
from starcast.runtime.export_folder import read_eos
from starcast.runtime.text import Tokenizer


@dataclass
class CheckReport:
    lines: list[str] = field(default_factory=list)


def check_export(
    folder: Path, source: str | None = None, files_only: bool = False, progress: Progress = QUIET
) -> CheckReport:
    folder = folder.expanduser().absolute()
    manifest = read_manifest(folder)
    report = CheckReport()
    with progress.stage("files", f"sha256 of {len(manifest.files)} files against starcast.json"):
        verify_files(folder, manifest)
        tokenizer, vocab = Tokenizer.from_export(folder), manifest.config.vocab_size
        if tokenizer is not None and tokenizer.largest_id() >= vocab:
            raise UserError(
                f"{folder}: tokenizer.json has ids up to {tokenizer.largest_id()}, beyond the model's vocabulary "
                f"(0..{vocab - 1}): it is not this model's tokenizer"
            )
        read_eos(folder, manifest.config)
        for graph in manifest.graphs:
            check_graph_file(manifest.path(folder, graph.model))
    report.lines.append(f"files ok: {len(manifest.files)} files match their sha256")
    if files_only:
        return report
    if manifest.fused is not None:
        with progress.stage("verify-fused", f"{manifest.fused.model} vs {manifest.plain.model}, ONNX Runtime CPU"):
            proof = prove_fused(folder, manifest, manifest.fused)
        report.lines.append(
            f"fused parity ok: {proof.measured['max_error']:.2e} ({proof.kind}, tolerance {proof.tolerance:.0e})"
        )
    if manifest.quantization is not None:
        return check_quantized(folder, manifest, report, progress, asked=source is not None)
    asked = source is not None
    source = source or (manifest.source if manifest.source.startswith(PREFIX) else None)
    if source is None:
        report.lines.append("reference parity not re-run: pass --source CKPT (the checkpoint this was exported from)")
        return report
    try:
        from starcast.exporter.checkpoint import TORCH_DTYPES, open_checkpoint
        from starcast.exporter.reference import StreamedReference
    except ImportError:
        if asked:
            raise MissingExtra("re-proving against the PyTorch reference", "export", "torch") from None
        report.lines.append("reference parity not re-run: it needs PyTorch (pip install '.[export]' in a clone)")
        return report
    from starcast.pipeline.proof import reference_parity

    checkpoint = open_checkpoint(source)
    model = StreamedReference(checkpoint, TORCH_DTYPES[manifest.dtype])
    if model.config != manifest.config:
        raise UserError(f"{source} is not the checkpoint this export was made from (its config differs)")
    with progress.stage("verify", "ONNX Runtime CPU vs PyTorch reference"):
        parity = manifest.plain.parity
        result = reference_parity(
            model, manifest.path(folder, manifest.plain.model), manifest.dtype, parity.kind, parity.tolerance
        )
    if not result.passed:
        raise ParityError(result.summary())
    report.lines.append(result.summary())
    return report


def check_quantized(folder: Path, manifest, report: CheckReport, progress: Progress, asked: bool) -> CheckReport:
    import numpy as np

    from starcast.pipeline.proof import RECORDED_LOGITS, recorded_parity

    name = manifest.quantization.get("recorded_logits")
    if name != RECORDED_LOGITS or name not in manifest.files:
        raise UserError(f"{folder}: a quantized export without its recorded logits cannot be re-proven: re-export it")
    try:
        with np.load(confine(folder, name, str(folder)), allow_pickle=False) as archive:
            recorded = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{folder}: {name} is not a numpy .npz archive ({exc})") from None
    with progress.stage("verify", f"{manifest.plain.model} against its recorded logits, ONNX Runtime CPU"):
        proof = recorded_parity(manifest.path(folder, manifest.plain.model), manifest.config, manifest.dtype, recorded)
    line = f"recorded-logits parity: {proof.measured['max_error']:.2e} ({proof.kind}, tolerance {proof.tolerance:.0e})"
    if not proof.passed:
        raise ParityError(f"FAILED {line}: the quantized graph does not compute what it computed when it was made")
    report.lines.append(f"{line} ok")
    float_proof = manifest.plain.parity.measured.get("float_graph_proof")
    measured = float_proof if isinstance(float_proof, dict) else {}
    errors = [measured.get(key) for key in ("prompt_error", "decode_error")]
    errors = [float(e) if isinstance(e, (int, float)) else float("nan") for e in errors]
    why = ": the float graph is not in the export" if asked else ""
    report.lines.append(
        f"reference parity of the float graph before quantization (recorded, not re-run{why}): "
        f"prompt {errors[0]:.2e}, decode {errors[1]:.2e}"
    )
    return report
