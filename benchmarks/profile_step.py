"""Where a decode step's time goes: ONNX Runtime's profiler over decode steps of an export's graph.

    python benchmarks/profile_step.py EXPORT_DIR [--graph auto|plain|fused] [--batch 1] [--past 128] [--steps 20]

Prints kernel time per step by op type (and the node count), from ONNX Runtime's own profile.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from starcast.contract.dtypes import numpy_dtype
from starcast.runtime.export_folder import choose_graph, open_export
from starcast.runtime.steps import make_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--graph", default="auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    manifest = open_export(args.export)
    record = choose_graph(manifest, "cpu", args.graph).record
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    session = ort.InferenceSession(str(manifest.path(args.export, record.model)), options)
    config = manifest.config
    steps = make_steps(session, record.interface, config, args.batch, args.past + args.steps + 8,
                       numpy_dtype(manifest.dtype), "cpu")  # fmt: skip
    ids = np.random.default_rng(0).integers(1, config.vocab_size, (args.batch, args.past))
    token = steps.prefill(ids, np.ones_like(ids)).argmax(-1)
    for _ in range(args.steps):
        token = steps.decode_one_token(token).argmax(-1)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs_seen = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    first_decode = runs_seen[1] if len(runs_seen) > 1 else 0  # the prompt's run is left out
    events = [e for e in events if e.get("ts", 0) >= first_decode]
    per_op, runs = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
            runs[event["args"]["op_name"]] += 1
    total = sum(per_op.values()) / args.steps
    print(f"kernel time per decode step {total / 1e3:.2f} ms over {sum(runs.values()) // args.steps} nodes")
    for op, micros in per_op.most_common():
        print(f"  {op:28s} {micros / args.steps / 1e3:7.3f} ms  {runs[op] // args.steps:4d} nodes")


if __name__ == "__main__":
    main()
