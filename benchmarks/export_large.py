"""Export a random-weight checkpoint of a public model's shape and report export time and peak RSS.

    python benchmarks/export_large.py --preset santacoder [--dtype fp32] [--workdir /tmp/starcast-bench]

SantaCoder's shape (1.1B parameters, 4.5 GB in fp32) must export on a 24 GiB, 2-core machine: the graph
goes over protobuf's 2 GB limit, so its weights land in one external `model.onnx.data` file.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from starcast.contract.config import PRESETS
from starcast.exporter.random_checkpoint import write_random_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="santacoder", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/starcast-bench"))
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoint and export.")
    args = parser.parse_args()

    config = PRESETS[args.preset]
    checkpoint = args.workdir / f"{args.preset}-checkpoint"
    output = args.workdir / f"{args.preset}-{args.dtype}"
    if not (checkpoint / "model.safetensors").is_file():
        start = time.perf_counter()
        write_random_checkpoint(checkpoint, config)
        print(
            f"random checkpoint: {config.parameter_count() / 1e9:.2f}B parameters, {time.perf_counter() - start:.0f} s"
        )

    start = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "starcast",
        "export",
        str(checkpoint),
        str(output),
        "--dtype",
        args.dtype,
        "--overwrite",
    ]
    subprocess.run(command, check=True)
    elapsed = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    manifest = json.loads((output / "starcast.json").read_text())
    sizes = {p.name: round(p.stat().st_size / 2**30, 2) for p in output.iterdir()}
    print(
        json.dumps(
            {
                "preset": args.preset,
                "dtype": args.dtype,
                "parameters": manifest["parameters"],
                "export_s": round(elapsed, 1),
                "peak_rss_gib": round(peak_gib, 2),
                "files_gib": sizes,
                "stages_s": manifest["timings_s"],
                "parity": manifest["parity"],
            },
            indent=2,
        )
    )
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
