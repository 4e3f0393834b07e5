"""One decode step on ONNX Runtime's CPU provider: plain graph vs the cpu-fused and cuda-fused (GroupQueryAttention)
graphs, for the tiny_starcoder shape (random weights) at several past lengths. Medians of many runs.

    python benchmarks/decode_step.py [--pasts 128,1024,4096] [--runs 50] [--threads 2]

Each graph's step is timed through the runtime's own `decode_one_token` (IO binding, cache bound by address):
the plain and cpu-fused graphs copy the cache through their Concat every step, the GroupQueryAttention graph
writes one position in place. The three are timed round-robin, so that machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from starcast.contract.config import PRESETS, GPTBigCodeConfig
from starcast.pipeline.derive import optimize_export
from starcast.pipeline.export import export
from starcast.runtime.session import SessionOptions, create_session
from starcast.runtime.steps import ConcatCacheSteps, StaticCacheSteps


def prepare(work: Path, preset: str) -> Path:
    from starcast.exporter.random_checkpoint import write_random_checkpoint

    plain = work / "plain"
    if not (work / "checkpoint" / "model.safetensors").is_file():
        write_random_checkpoint(work / "checkpoint", PRESETS[preset])
    if not (plain / "starcast.json").is_file():
        export(str(work / "checkpoint"), plain, fuse_target=None, overwrite=True)
    for target in ("cpu", "cuda"):
        if not (work / target / "starcast.json").is_file():
            optimize_export(plain, work / target, target, overwrite=True)
    return work


def steppers(work: Path, config: GPTBigCodeConfig, max_length: int, threads: int) -> dict:
    def session(folder: str, model: str):
        return create_session(work / folder / model, SessionOptions("cpu", threads, spinning=False))

    args = (config, 1, max_length, np.float32, "cpu")
    return {
        "plain": ConcatCacheSteps(session("plain", "model.onnx"), *args),
        "fused-cpu": ConcatCacheSteps(session("cpu", "fused.onnx"), *args),
        "fused-gqa": StaticCacheSteps(session("cuda", "fused.onnx"), *args),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny_starcoder")
    parser.add_argument("--pasts", default="128,1024,4096")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/starcast-decode-step")
    args = parser.parse_args()
    config = PRESETS[args.preset]
    work = prepare(Path(args.work) / args.preset, args.preset)
    rows = []
    for past in map(int, args.pasts.split(",")):
        graphs = steppers(work, config, past + args.runs + 8, args.threads)
        prompt = np.random.default_rng(0).integers(0, config.vocab_size, size=(1, past), dtype=np.int64)
        mask = np.ones_like(prompt)
        times = {name: [] for name in graphs}
        tokens = {}
        for name, steps in graphs.items():
            tokens[name] = steps.prefill(prompt, mask).argmax(-1)
            tokens[name] = steps.decode_one_token(tokens[name]).argmax(-1)  # warm-up
        for _ in range(args.runs):
            for name, steps in graphs.items():
                start = time.perf_counter()
                tokens[name] = steps.decode_one_token(tokens[name]).argmax(-1)
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        row = {
            "past": past,
            **{f"{name}_ms": round(ms, 2) for name, ms in medians.items()},
            "plain_over_fused_cpu": round(medians["plain"] / medians["fused-cpu"], 3),
            "plain_over_fused_gqa": round(medians["plain"] / medians["fused-gqa"], 3),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del graphs


if __name__ == "__main__":
    main()
