"""`starcast demo`: the whole pipeline on a small random-weight checkpoint, end to end, in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starcast.exporter.config import GPTBigCodeConfig
from starcast.exporter.export import export
from starcast.exporter.random_checkpoint import write_random_checkpoint
from starcast.progress import Progress

DEMO_CONFIG = GPTBigCodeConfig(vocab_size=4096, n_positions=512, n_embd=256, n_layer=4, n_head=8)


def run_demo(scratch: Path, output: Path | None = None) -> dict[str, Any]:
    progress = Progress()
    with progress.stage("checkpoint", "random weights, multi-query, 4 layers"):
        checkpoint = write_random_checkpoint(scratch / "checkpoint", DEMO_CONFIG)
    manifest = export(str(checkpoint), output or scratch / "export", overwrite=output is not None, progress=progress)
    return {
        "parameters": manifest["parameters"],
        "dtype": manifest["dtype"],
        "parity": manifest["parity"],
        "export": str(output) if output else "(temporary, removed)",
        "timings_s": manifest["timings_s"],
    }
