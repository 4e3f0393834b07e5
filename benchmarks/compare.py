"""Side by side, in one run: PyTorch (transformers, sdpa), optimum-onnx's ORTModelForCausalLM, starcast's plain
graph and starcast's fused graph, on the same random-weight checkpoint; plus the machine's roofline.

    pip install -e ".[bench]"
    python benchmarks/compare.py [--preset tiny_starcoder] [--batches 1,4] [--prompt 128 --new 128] [--runs 3]

Every system is timed the same way, through its own `generate()`: T(new) for `new` tokens and T(1) for one;
prefill (time to first token) = T(1), decode tokens/s per sequence = (new - 1) / (T(new) - T(1)). Medians of
`runs` after a warm-up. Each system runs in its own process so that its peak resident memory is its own.
starcast-int8/int4 are the fused graph with weight-only MatMulNBits (block 32).
The roofline is a graph of nothing but the model's weight MatMuls at batch 1: ONNX Runtime streams those weights
at the memory's read bandwidth (measured on this project's machines), so no fp32 graph can decode faster.
Writes benchmarks/RESULTS.md's table (between markers) and benchmarks/decode_tokens_per_s.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SYSTEMS = ("pytorch", "optimum", "starcast-plain", "starcast-fused", "starcast-int8", "starcast-int4")


# -- workers: one system, one batch size, in a process of its own ---------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hf_generate(model, ids: np.ndarray, mask: np.ndarray, new: int):
    """transformers' generate(), as PyTorch and optimum models share it: greedy, exactly `new` tokens."""
    import torch

    return model.generate(
        torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        do_sample=False,
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=0,
    )


def load_system(system: str, work: Path, threads: int, max_length: int):
    """Returns generate(ids, mask, new_tokens) for the system."""
    if system == "pytorch":
        import torch
        from transformers import GPTBigCodeForCausalLM

        torch.set_num_threads(threads)
        model = GPTBigCodeForCausalLM.from_pretrained(work / "checkpoint", attn_implementation="sdpa").eval()

        def run(ids, mask, new):
            with torch.no_grad():
                return hf_generate(model, ids, mask, new)

        return run
    if system == "optimum":
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        model = ORTModelForCausalLM.from_pretrained(work / "optimum", session_options=options)

        def run(ids, mask, new):
            return hf_generate(model, ids, mask, new)

        return run
    from starcast.runtime.generator import Generator

    graph = "plain" if system == "starcast-plain" else "fused"
    folder = work / {"starcast-plain": "starcast", "starcast-fused": "starcast"}.get(system, system)
    # One generator, its cache sized for the longest request, as a server sizes it.
    generator = Generator.from_pretrained(folder, graph=graph, max_length=max_length, threads=threads)

    def run(ids, mask, new):
        return generator.generate(ids, mask, max_new_tokens=new, eos_token_id=None)

    return run


def worker(args: argparse.Namespace) -> None:
    work = Path(args.work)
    run = load_system(args.worker, work, args.threads, args.prompt + args.new)
    config = json.loads((work / "checkpoint" / "config.json").read_text())
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config["vocab_size"], size=(args.batch, args.prompt), dtype=np.int64)
    mask = np.ones_like(ids)
    run(ids, mask, 2)  # warm-up
    one, full = [], []
    for _ in range(args.runs):
        for new, times in ((1, one), (args.new, full)):
            start = time.perf_counter()
            out = run(ids, mask, new)
            times.append(time.perf_counter() - start)
            assert np.asarray(out).shape == (args.batch, args.prompt + new), np.asarray(out).shape
    t1, tn = statistics.median(one), statistics.median(full)
    per_sequence = (args.new - 1) / (tn - t1)
    print(
        json.dumps(
            {
                "system": args.worker,
                "batch": args.batch,
                "prefill_ms": t1 * 1e3,
                "decode_tokens_per_s": per_sequence,
                "aggregate_tokens_per_s": per_sequence * args.batch,
                "peak_rss_mib": peak_rss_mib(),
            }
        )
    )


# -- the roofline ------------------------------------------------------------------------------------------------


def weights_only_step(config, threads: int, runs: int = 30) -> float:
    """Median seconds of one batch-1 step of a graph holding only the model's weight MatMuls (fp32)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    d, inner, kv = config.n_embd, config.inner_dim, 2 * config.kv_heads * config.head_dim
    shapes = [(d, d + kv), (d, d), (d, inner), (inner, d)] * config.n_layer + [(d, config.vocab_size)]
    rng = np.random.default_rng(0)
    nodes, inits, inputs, outputs = [], [], [], []
    for i, (k, n) in enumerate(shapes):
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, f"w{i}"))
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, k]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]))
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]))
    graph = helper.make_graph(nodes, "weights_only", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {f"x{i}": np.ones((1, k), np.float32) for i, (k, _) in enumerate(shapes)}
    del model, graph, inits
    session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    weight_bytes = sum(k * n * 4 for k, n in shapes)
    return statistics.median(times), weight_bytes


# -- the driver --------------------------------------------------------------------------------------------------


def prepare(work: Path, preset: str, systems: list[str]) -> None:
    from starcast.contract.config import PRESETS
    from starcast.exporter.random_checkpoint import write_random_checkpoint

    if not (work / "checkpoint" / "model.safetensors").is_file():
        write_random_checkpoint(work / "checkpoint", PRESETS[preset])
    if not (work / "starcast" / "starcast.json").is_file():
        from starcast.pipeline.export import export

        export(str(work / "checkpoint"), work / "starcast", fuse_target="cpu", overwrite=True)
    for bits in (8, 4):
        if f"starcast-int{bits}" in systems and not (work / f"starcast-int{bits}" / "starcast.json").is_file():
            from starcast.pipeline.derive import quantize_export

            quantize_export(work / "starcast", work / f"starcast-int{bits}", f"int{bits}", 32, None, True)
    if "optimum" in systems and not (work / "optimum" / "model.onnx").is_file():
        from optimum.onnxruntime import ORTModelForCausalLM

        ORTModelForCausalLM.from_pretrained(work / "checkpoint", export=True).save_pretrained(work / "optimum")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("starcast", "torch", "transformers", "onnx", "onnxruntime-gpu", "onnxruntime", "optimum-onnx"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import os

    return f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny_starcoder")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--work", default="/tmp/starcast-compare")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from starcast.contract.config import PRESETS

    work = Path(args.work) / args.preset
    systems = args.systems.split(",")
    prepare(work, args.preset, systems)
    config = PRESETS[args.preset]
    step, weight_bytes = weights_only_step(config, args.threads)
    results = {
        "preset": args.preset,
        "parameters": config.parameter_count(),
        "weight_bytes": 4 * config.parameter_count(),
        "prompt": args.prompt,
        "new": args.new,
        "runs": args.runs,
        "threads": args.threads,
        "machine": machine(),
        "versions": versions(),
        "roofline": {
            "weights_only_step_ms": step * 1e3,
            "matmul_weight_bytes": weight_bytes,
            "read_bandwidth_gb_s": weight_bytes / step / 1e9,
            "tokens_per_s": 1 / step,
        },
        "rows": [],
    }
    for batch in map(int, args.batches.split(",")):
        for system in systems:
            command = [
                sys.executable,
                __file__,
                "--worker",
                system,
                "--batch",
                str(batch),
                "--work",
                str(work),
                "--prompt",
                str(args.prompt),
                "--new",
                str(args.new),
                "--runs",
                str(args.runs),
                "--threads",
                str(args.threads),
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                print(f"{system} batch {batch} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
