"""Export random-weight checkpoints of the family's published shapes; record wall time and peak anonymous memory.

    python benchmarks/export_large.py --preset starcoderbase-3b [--dtype fp16] [--quantize int4]
        [--workdir /tmp/starcast-bench] [--generate] [--keep] [--results benchmarks/export_results.json]

The checkpoint is written in the Hub's sharded layout, tensor by tensor (never the whole model in memory). Then
`starcast export` runs as a child process while the RssAnon of its whole process tree is sampled every 50 ms
(runtime/memory.py): file-backed pages of the mapped checkpoint and export do not count, the kernel can drop
them. The bound issue 23 sets is 0.25 x the weight bytes + 1 GiB. Beside the export's time it records the time to
copy the checkpoint's files once (seconds per GB of both). `--generate` also runs `starcast generate` and
`starcast bench` on the export and records their peak memory and speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from starcast.contract.config import PRESETS
from starcast.exporter.random_checkpoint import write_random_shards
from starcast.runtime.memory import run_measured

SHAPES = ("santacoder", "starcoderbase-3b", "starcoderbase-7b", "starcoder")
GIB = 2**30


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def copy_seconds(checkpoint: Path, workdir: Path) -> float:
    """Time to copy the checkpoint's files once, flushed to disk (the floor for any converter)."""
    target = workdir / "copy-probe"
    start = time.perf_counter()
    shutil.copytree(checkpoint, target)
    for path in target.iterdir():
        with path.open("rb+") as handle:
            os.fsync(handle.fileno())
    elapsed = time.perf_counter() - start
    shutil.rmtree(target)
    return elapsed


def starcast(*args: str) -> list[str]:
    return [sys.executable, "-m", "starcast", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="starcoderbase-3b", choices=SHAPES)
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"))
    parser.add_argument("--quantize", choices=("int8", "int4", "int8-dynamic"))
    parser.add_argument("--target", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/starcast-bench"))
    parser.add_argument("--generate", action="store_true", help="Also run generate and bench on the export.")
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoint and export.")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "export_results.json")
    args = parser.parse_args()

    config = PRESETS[args.preset]
    checkpoint = args.workdir / f"{args.preset}-{args.dtype}-checkpoint"
    suffix = f"-{args.quantize}" if args.quantize else ""
    output = args.workdir / f"{args.preset}-{args.dtype}{suffix}"
    if not (checkpoint / "model.safetensors.index.json").is_file():
        start = time.perf_counter()
        write_random_shards(checkpoint, config, torch.float16 if args.dtype == "fp16" else torch.float32)
        print(f"random checkpoint: {config.parameter_count() / 1e9:.2f}B, {time.perf_counter() - start:.0f} s")
    weights = folder_bytes(checkpoint)
    copy_s = copy_seconds(checkpoint, args.workdir)

    command = starcast("export", str(checkpoint), str(output), "--dtype", args.dtype, "--target", args.target,
                       "--overwrite")  # fmt: skip
    if args.quantize:
        command += ["--quantize", args.quantize]
    measured = run_measured(command)
    if measured.returncode != 0:
        raise SystemExit(f"export failed with exit code {measured.returncode}")
    manifest = json.loads((output / "starcast.json").read_text())
    bound = 0.25 * weights + GIB
    record = {
        "preset": args.preset, "dtype": args.dtype, "quantize": args.quantize, "target": args.target,
        "parameters": manifest["parameters"], "checkpoint_gb": round(weights / 1e9, 2),
        "export_s": round(measured.wall_s, 1), "export_s_per_gb": round(measured.wall_s / (weights / 1e9), 1),
        "copy_s": round(copy_s, 1), "copy_s_per_gb": round(copy_s / (weights / 1e9), 2),
        "peak_anon_gib": round(measured.peak_anon_bytes / GIB, 2), "bound_gib": round(bound / GIB, 2),
        "within_bound": measured.peak_anon_bytes <= bound, "stages_s": manifest["timings_s"],
        "export_gb": round(folder_bytes(output) / 1e9, 2), "parity": manifest["parity"],
        "fused_parity": (manifest.get("fused") or {}).get("parity"), "cpu": cpu_model(),
        "torch": torch.__version__,
    }  # fmt: skip
    if args.generate:
        runs = {
            "generate": ["--ids", "1,2,3,4,5,6,7,8", "--max-new-tokens", "32"],  # random checkpoints: no tokenizer
            "bench": ["--prompt-tokens", "128", "--new-tokens", "32", "--runs", "2", "--json"],
        }
        for name, extra in runs.items():
            run = run_measured(starcast(name, str(output), *extra))
            record[f"{name}_s"] = round(run.wall_s, 1)
            record[f"{name}_peak_anon_gib"] = round(run.peak_anon_bytes / GIB, 2)
            record[f"{name}_returncode"] = run.returncode
    print(json.dumps(record, indent=2))
    results = json.loads(args.results.read_text()) if args.results.is_file() else []
    results.append(record)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(output)


if __name__ == "__main__":
    main()
