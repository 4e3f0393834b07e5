"""Fuse a plain export into `fused/model.onnx`, prove it against the plain graph, record it in the manifest.

`starcast export` calls `write_fused` on its temporary folder; `starcast optimize PLAIN_DIR OUTPUT_DIR` copies
the plain export into a new temporary folder beside OUTPUT_DIR and does the same, so the source folder is
never modified.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from starcast.errors import UserError
from starcast.exporter.config import GPTBigCodeConfig
from starcast.exporter.manifest import io_signature, read_manifest
from starcast.exporter.onnx_export import EXTERNAL_DATA_THRESHOLD, IR_VERSION
from starcast.exporter.verify import TOLERANCES, parity_inputs
from starcast.graphs.fuse import fuse
from starcast.progress import QUIET, Progress

FUSED_DIR = "fused"
INTERFACES = {"cpu": "concat-cache", "cuda": "static-cache"}
PARITY_DECODE_STEPS = 8


@dataclass(frozen=True)
class FusedParity:
    kind: str
    tolerance: float
    max_error: float
    steps: int
    same_tokens: bool

    @property
    def passed(self) -> bool:
        return self.same_tokens and self.max_error <= self.tolerance

    def summary(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        tokens = "same greedy tokens" if self.same_tokens else "greedy tokens differ"
        return (
            f"fused parity {verdict}: max {self.kind} error {self.max_error:.2e} over prompt + {self.steps} decode "
            f"steps (tolerance {self.tolerance:.0e}), {tokens}"
        )


def save_ir(model: ir.Model, path: Path) -> None:
    model.ir_version = IR_VERSION
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weight_bytes < EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path)
    else:
        ir.save(model, path, external_data=path.name + ".data")


def steps_for(folder: Path, model_file: str, interface: str, config: GPTBigCodeConfig, batch: int, dtype: str):
    from starcast.runtime.session import create_session
    from starcast.runtime.steps import ConcatCacheSteps, StaticCacheSteps

    steps = StaticCacheSteps if interface == "static-cache" else ConcatCacheSteps
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    return steps(create_session(folder / model_file), config, batch, 64, np_dtype, "cpu")


def check_fused_parity(folder: Path, config: GPTBigCodeConfig, dtype: str, interface: str) -> FusedParity:
    """Greedy decoding through plain and fused graph side by side (ONNX Runtime CPU), left-padded batch of 2."""
    kind, tolerance = TOLERANCES[dtype]
    feeds = parity_inputs(config.vocab_size, prompt=5)
    batch = feeds["input_ids"].shape[0]
    plain = steps_for(folder, "model.onnx", "concat-cache", config, batch, dtype)
    fused = steps_for(folder, f"{FUSED_DIR}/model.onnx", interface, config, batch, dtype)
    expected = plain.prefill(feeds["input_ids"], feeds["attention_mask"]).astype(np.float64)
    ours = fused.prefill(feeds["input_ids"], feeds["attention_mask"]).astype(np.float64)
    worst, same = 0.0, True
    for step in range(PARITY_DECODE_STEPS + 1):
        scale = np.abs(expected).max() if kind == "rel" else 1.0
        worst = max(worst, float(np.abs(ours - expected).max() / scale))
        tokens, fused_tokens = expected.argmax(-1), ours.argmax(-1)
        same = same and bool((tokens == fused_tokens).all())
        if step < PARITY_DECODE_STEPS:
            expected = plain.decode_one_token(tokens).astype(np.float64)
            ours = fused.decode_one_token(tokens).astype(np.float64)
    return FusedParity(kind, tolerance, worst, PARITY_DECODE_STEPS, same)


def write_fused(folder: Path, manifest: dict[str, Any], target: str, progress: Progress = QUIET) -> dict[str, Any]:
    """Fuse `folder/model.onnx` into `folder/fused/`; returns the manifest's "fused" entry. Raises on failure."""
    from starcast.exporter.export import ParityError

    config = GPTBigCodeConfig.from_hf_dict(manifest["config"])
    dtype = manifest["dtype"]
    with progress.stage("fuse", f"target {target}"):
        model = ir.load(folder / manifest.get("model", "model.onnx"))
        report = fuse(model, config, target, dtype)
        (folder / FUSED_DIR).mkdir()
        save_ir(model, folder / FUSED_DIR / "model.onnx")
        del model
    entry = report.to_dict(config.n_layer)
    progress.say(
        f"nodes {entry['nodes']['before']} -> {entry['nodes']['after']} "
        f"({entry['nodes_per_layer']['before']} -> {entry['nodes_per_layer']['after']} per layer); "
        f"fused ops {entry['fused_ops']}; matches {entry['matches']}"
    )
    interface = INTERFACES[target]
    with progress.stage("verify-fused", "fused vs plain graph, ONNX Runtime CPU"):
        parity = check_fused_parity(folder, config, dtype, interface)
    progress.say(parity.summary())
    if not parity.passed:
        raise ParityError(parity.summary())
    return {
        "model": f"{FUSED_DIR}/model.onnx",
        "target": target,
        "interface": interface,
        "io": io_signature(folder / FUSED_DIR / "model.onnx"),
        **entry,
        "parity": {**asdict(parity), "passed": parity.passed},
    }


def optimize_export(source: Path, output: Path, target: str, overwrite: bool, progress: Progress = QUIET) -> dict:
    """`starcast optimize`: a new export folder = the plain export + its fused graph."""
    from starcast.exporter.export import derive_export

    manifest = read_manifest(source.expanduser().absolute())
    if "fused" in manifest:
        raise UserError(f"{source}: already has a fused graph ({manifest['fused']['target']}); nothing to do")

    def add_fused(folder: Path, manifest: dict) -> None:
        manifest["fused"] = write_fused(folder, manifest, target, progress)

    return derive_export(source, output, overwrite, add_fused)
