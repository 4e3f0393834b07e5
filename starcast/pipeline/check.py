"""`starcast check EXPORT_DIR`: re-prove an export, each graph against the tolerance its manifest records.

1. every file against its sha256 (a manifest that lists no files is refused);
2. the tokenizer and generation config load, every graph is ONNX with its weights inside the folder;
3. the fused graph (the one `generate` runs by default) against the plain graph, greedily side by side;
4. the plain graph (quantized or not) against the PyTorch reference of the source checkpoint: built-in sources
   are found by name; any other needs `--source CKPT` (a path recorded in a folder is not followed).
Steps 1-3 need only the runtime; step 4 needs the export extra (PyTorch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from starcast.contract.builtin import PREFIX
from starcast.contract.errors import MissingExtra, ParityError, UserError
from starcast.contract.graph_files import check_graph_file
from starcast.contract.manifest import read_manifest, verify_files
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
        Tokenizer.from_export(folder)
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
            f"fused parity ok: {proof.measured['max_error']:.2e} ({proof.kind}, tolerance {proof.tolerance:.1e})"
        )
    asked = source is not None
    source = source or (manifest.source if manifest.source.startswith(PREFIX) else None)
    if source is None:
        report.lines.append("reference parity not re-run: pass --source CKPT (the checkpoint this was exported from)")
        return report
    try:
        from starcast.exporter.checkpoint import TORCH_DTYPES, load_model, open_checkpoint
    except ImportError:
        if asked:
            raise MissingExtra("re-proving against the PyTorch reference", "export", "torch") from None
        report.lines.append("reference parity not re-run: it needs PyTorch (pip install 'starcast[export]')")
        return report
    from starcast.pipeline.proof import reference_parity

    checkpoint = open_checkpoint(source)
    with progress.stage("load", str(checkpoint.folder)):
        model = load_model(checkpoint, TORCH_DTYPES[manifest.dtype])
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
