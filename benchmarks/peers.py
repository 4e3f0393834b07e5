"""starcast beside the CPU peers users pick for StarCoder-family models, in one run, at every precision each offers.

    bash benchmarks/peers/setup.sh CKPT_DIR PEERS_DIR          # once: llama.cpp and CTranslate2, from PyPI
    python benchmarks/peers.py --checkpoint CKPT_DIR --peers PEERS_DIR [--label tiny_starcoder] [--rounds 3]

Systems and precisions (each measured by its own tool or API, 2 threads):
  starcast     fp32 (cpu-fused graph), int8 and int4 (MatMulNBits, block 32), int8-dynamic
               (DynamicQuantizeMatMul, per channel)                               `starcast bench --json`
  llama.cpp    f32, Q8_0, Q4_0 (GGUF, architecture `starcoder`)                 `llama-bench` (decode after a
               128-token context: -p 0 -n 64 -d 128; prefill: -p 128 -n 0); batch 4: `llama-batched-bench`
  CTranslate2  float32, int8                                                     its Generator API
Protocol: a random 128-token prompt, then 64 greedy decode steps; batch 1 and batch 4 (aggregate tokens/s);
medians of `rounds` rounds in which the systems take turns (the machine is shared and noisy: compare ratios).
A missing peer is skipped and reported as such. Writes JSON (default benchmarks/peers_<label>.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT, NEW = 128, 64
CT2_WORKER = r"""
import json, sys, time
import numpy as np, ctranslate2
folder, batch, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
vocab = json.load(open(f"{folder}/vocabulary.json"))
ids = np.random.default_rng(0).integers(1, len(vocab), size=(batch, 128))
tokens = [[vocab[i] for i in row] for row in ids.tolist()]
generator = ctranslate2.Generator(folder, device="cpu", inter_threads=1, intra_threads=threads)
def run(k):
    start = time.perf_counter()
    generator.generate_batch(tokens, max_length=k, min_length=k, sampling_topk=1, include_prompt_in_result=False,
                             end_token=[])
    return time.perf_counter() - start
run(1); run(65)
first, full = run(1), run(65)
print(json.dumps({"prefill_ms": first * 1e3, "decode_tokens_per_s": 64 / (full - first) * batch}))
"""


def starcast_bench(folder: Path, batch: int, threads: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "starcast",
        "bench",
        str(folder),
        "--json",
        "--batch",
        str(batch),
        "--prompt-tokens",
        str(PROMPT),
        "--new-tokens",
        str(NEW + 1),
        "--runs",
        "1",
        "--threads",
        str(threads),
    ]
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    return {"prefill_ms": result["prefill_ms"], "decode_tokens_per_s": result["aggregate_tokens_per_s"]}


def llama_bench(peers: Path, model: Path, batch: int, threads: int) -> dict:
    binary = peers / "llama.cpp" / "build" / "bin"
    if batch == 1:

        def run(*args):
            out = subprocess.run(
                [str(binary / "llama-bench"), "-m", str(model), "-t", str(threads), "-r", "1", "-o", "jsonl", *args],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            return json.loads(out.strip().splitlines()[-1])["avg_ts"]

        decode = run("-p", "0", "-n", str(NEW), "-d", str(PROMPT))
        prefill = run("-p", str(PROMPT), "-n", "0")
        return {"prefill_ms": PROMPT / prefill * 1e3, "decode_tokens_per_s": decode}
    batched = binary / "llama-batched-bench"
    if not batched.is_file():
        return {}
    out = subprocess.run([str(batched), "-m", str(model), "-t", str(threads), "-npp", str(PROMPT), "-ntg", str(NEW),
                          "-npl", str(batch), "-c", str(batch * (PROMPT + NEW) + 16), "--output-format", "jsonl"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    row = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    return {"prefill_ms": row["t_pp"] * 1e3, "decode_tokens_per_s": row["speed_tg"]}


def ct2_bench(peers: Path, model: Path, batch: int, threads: int) -> dict:
    python = str(peers / "venv" / "bin" / "python")
    out = subprocess.run([python, "-c", CT2_WORKER, str(model), str(batch), str(threads)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def prepare_starcast(checkpoint: Path, work: Path) -> dict[str, Path]:
    from starcast.pipeline.derive import quantize_export
    from starcast.pipeline.export import export

    work.mkdir(parents=True, exist_ok=True)
    folders = {name: work / name for name in ("fp32", "int8", "int4", "int8-dynamic")}
    if not (folders["fp32"] / "starcast.json").is_file():
        export(str(checkpoint), folders["fp32"], fuse_target="cpu", overwrite=folders["fp32"].exists())
    for precision in ("int8", "int4", "int8-dynamic"):
        if not (folders[precision] / "starcast.json").is_file():
            quantize_export(folders["fp32"], folders[precision], precision, 32, None, folders[precision].exists())
    return folders


def plan(checkpoint: Path, peers: Path, work: Path) -> tuple[dict, list[str]]:
    """(system, precision) -> measure(batch, threads); and what was skipped."""
    systems, skipped = {}, []
    for precision, folder in prepare_starcast(checkpoint, work).items():
        systems["starcast", precision] = lambda b, t, f=folder: starcast_bench(f, b, t)
    if (peers / "llama.cpp" / "build" / "bin" / "llama-bench").is_file():
        for precision, name in (("fp32", "f32"), ("8-bit", "Q8_0"), ("4-bit", "Q4_0")):
            model = peers / f"model-{name}.gguf"
            systems["llama.cpp", f"{precision} ({name})"] = lambda b, t, m=model: llama_bench(peers, m, b, t)
    else:
        skipped.append("llama.cpp (run benchmarks/peers/setup.sh)")
    if (peers / "venv" / "bin" / "python").is_file() and (peers / "ct2_int8").is_dir():
        for precision in ("float32", "int8"):
            model = peers / f"ct2_{precision}"
            systems["CTranslate2", precision] = lambda b, t, m=model: ct2_bench(peers, m, b, t)
    else:
        skipped.append("CTranslate2 (run benchmarks/peers/setup.sh)")
    return systems, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--peers", type=Path, default=Path("/tmp/peers"))
    parser.add_argument("--label", default="tiny_starcoder")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(f"/tmp/starcast-peers-{args.label}")
    systems, skipped = plan(args.checkpoint, args.peers, work)
    samples: dict = {}
    started = time.time()
    for round_index in range(args.rounds):
        for batch in map(int, args.batches.split(",")):
            for (system, precision), measure in systems.items():
                try:
                    result = measure(batch, args.threads)
                except subprocess.CalledProcessError as exc:
                    result = {"error": (exc.stderr or "")[-300:]}
                if result:
                    samples.setdefault(f"{system}|{precision}|{batch}", []).append(result)
                print(round_index, system, precision, batch, json.dumps(result), flush=True)
    rows = []
    for key, results in samples.items():
        system, precision, batch = key.split("|")
        good = [r for r in results if "error" not in r]
        if not good:
            rows.append({"system": system, "precision": precision, "batch": int(batch), "error": results[-1]["error"]})
            continue
        rows.append({"system": system, "precision": precision, "batch": int(batch),
                     "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in good),
                     "prefill_ms": statistics.median(r["prefill_ms"] for r in good), "rounds": len(good)})  # fmt: skip
    out = args.out or HERE / f"peers_{args.label}.json"
    report = {"label": args.label, "threads": args.threads, "skipped": skipped, "rows": rows,
              "minutes": round((time.time() - started) / 60, 1)}  # fmt: skip
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
