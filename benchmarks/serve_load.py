"""Concurrent streaming clients against completion servers, loopback only, bounded in count and time.

    python benchmarks/serve_load.py [--clients 1,4,8,16] [--rounds 2] [--max-tokens 64] [--work /tmp/starcast-serve]

Systems, each a real server process on 127.0.0.1, measured in the same run:
  starcast      `starcast serve` (continuous batching, --max-batch 16) on a tiny_starcoder-shaped export (fp32)
  starcast-b1   `starcast serve --max-batch 1`: one request at a time, the baseline without batching
  llama.cpp     llama.cpp's `llama-server` (continuous batching, -np 16, f32 GGUF of the same checkpoint), when
                benchmarks/peers/setup.sh has built it in --peers
  triton        Triton Inference Server (nvidia-pytriton's binary) serving `starcast triton-repo` of the export,
                through its HTTP generate_stream endpoint, when the wheel is installed
Each of N clients sends `rounds` streaming requests one after another (a ~128-token prompt, `max_tokens`
tokens, greedy). Reported per level: aggregate generated tokens/s (all tokens / wall time), time to first token
p50/p95, per-token latency p50/p95 (between a request's first and last token). `starcast generate`'s own
decode step (batch 1, same prompt length) is measured before and after each system, for the single-client
comparison. Every request's prompt starts differently: llama.cpp's server would otherwise reuse the cached
prompt of the previous request.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running(command: list[str], ready_url: str, env=None, timeout: float = 300):
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env or os.environ)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(process.stderr.read().decode()[-2000:])
            try:
                if urllib.request.urlopen(ready_url, timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"{command[0]} did not become ready")
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def one_request(port: int, path: str, body: dict, deadline: float) -> dict:
    """A streaming request: time to first token, per-token latency and the token count."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=max(1.0, deadline - time.monotonic()))
    start = time.perf_counter()
    connection.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    response = connection.getresponse()
    times = []
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        text = event["choices"][0]["text"] if "choices" in event and event["choices"] else event.get("text", "")
        if text or event.get("token_ids") or event.get("tokens"):
            times.append(time.perf_counter())
    connection.close()
    tokens = len(times)
    per_token = (times[-1] - times[0]) / (tokens - 1) if tokens > 1 else None
    return {"ttft": times[0] - start if times else None, "per_token": per_token, "tokens": tokens}


def load_level(port: int, path: str, body: dict, clients: int, rounds: int, budget: float) -> dict:
    """Every request's prompt starts differently, so that no server can reuse another request's prompt cache."""
    deadline = time.monotonic() + budget

    def client(index: int) -> list[dict]:
        return [one_request(port, path, {**body, "prompt": f"# request {index}.{r}\n{body['prompt']}"}, deadline)
                for r in range(rounds)]  # fmt: skip

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    flat = [r for client in results for r in client]
    ttft = sorted(r["ttft"] for r in flat if r["ttft"] is not None)
    per_token = sorted(r["per_token"] for r in flat if r["per_token"] is not None)

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] * 1e3 if values else None

    tokens = sum(r["tokens"] for r in flat)
    return {
        "clients": clients, "requests": len(flat), "tokens": tokens, "wall_s": round(wall, 2),
        "aggregate_tokens_per_s": round(tokens / wall, 1),
        "ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p95": pct(ttft, 0.95),
        "per_token_ms_p50": pct(per_token, 0.5), "per_token_ms_p95": pct(per_token, 0.95),
    }  # fmt: skip


def prepare(work: Path, peers: Path) -> tuple[Path, str]:
    """The export (with a tokenizer) and the prompt text (~128 tokens)."""
    from starcast.contract.config import PRESETS
    from starcast.pipeline.export import export

    checkpoint = peers / "ckpt_tok"
    if not (checkpoint / "tokenizer.json").is_file():
        from starcast.exporter.random_checkpoint import write_random_checkpoint

        checkpoint = work / "checkpoint"
        if not (checkpoint / "tokenizer.json").is_file():
            write_random_checkpoint(checkpoint, PRESETS["tiny_starcoder"])
            subprocess.run([sys.executable, str(HERE / "peers" / "mktok.py"), str(checkpoint), "49152"], check=True)
    folder = work / "export"
    if not (folder / "starcast.json").is_file():
        export(str(checkpoint), folder, fuse_target="cpu", overwrite=folder.exists())
    from starcast.runtime.text import Tokenizer

    tokenizer = Tokenizer.from_export(folder)
    source = Path(json.__file__).read_text()
    ids = tokenizer.encode(source)[:128]
    return folder, tokenizer.decode(ids)


def generate_step_ms(folder: Path, threads: int) -> float:
    from starcast.runtime.bench import bench

    return bench(folder, batch=1, prompt_tokens=128, new_tokens=64, runs=3, threads=threads).decode_ms_per_step


def systems(folder: Path, peers: Path, max_length: int, threads: int) -> dict:
    starcast = [sys.executable, "-m", "starcast", "serve", str(folder), "--max-length", str(max_length),
                "--threads", str(threads)]  # fmt: skip
    found = {
        "starcast": (starcast + ["--max-batch", "16"], "/v1/completions", "/health"),
        "starcast-b1": (starcast + ["--max-batch", "1", "--max-queue", "64"], "/v1/completions", "/health"),
    }
    server = peers / "llama.cpp" / "build" / "bin" / "llama-server"
    if server.is_file() and (peers / "model-f32.gguf").is_file():
        command = [str(server), "-m", str(peers / "model-f32.gguf"), "-np", "16", "-c", str(16 * max_length),
                   "-t", str(threads), "--host", "127.0.0.1"]  # fmt: skip
        found["llama.cpp"] = (command, "/v1/completions", "/health")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=180, help="Upper bound of one load level's time.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/starcast-serve"))
    parser.add_argument("--peers", type=Path, default=Path("/tmp/peers"))
    parser.add_argument("--triton", action="store_true", help="Add Triton at 1 and 8 clients.")
    parser.add_argument("--out", type=Path, default=HERE / "serve_results.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folder, prompt = prepare(args.work, args.peers)
    max_length = 128 + args.max_tokens + 64
    report = {"generate_decode_ms": [generate_step_ms(folder, args.threads)], "systems": {}}
    print(f"starcast generate: {report['generate_decode_ms'][0]:.2f} ms per decode step", flush=True)
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": True}
    plan = systems(folder, args.peers, max_length, args.threads)
    if args.triton:
        plan["triton"] = triton_plan(folder, args.work, max_length)
    for name, (command, path, health) in plan.items():
        port = free_port()
        command = [*command, "--port", str(port)] if name != "triton" else [c.format(port=port) for c in command]
        request_path = path.format(name="starcoder")
        payload = body if name != "triton" else {"prompt": prompt, "max_tokens": args.max_tokens}
        levels = [int(c) for c in args.clients.split(",")] if name != "triton" else [1, 8]
        env = {**os.environ, **(triton_env() if name == "triton" else {})}
        with running(command, f"http://127.0.0.1:{port}{health}", env):
            one_request(port, request_path, {**payload, "max_tokens": 4}, time.monotonic() + 60)  # warm-up
            report["systems"][name] = [load_level(port, request_path, payload, n, args.rounds, args.budget_s)
                                       for n in levels]  # fmt: skip
        for level in report["systems"][name]:
            print(name, json.dumps(level), flush=True)
        report["generate_decode_ms"].append(generate_step_ms(folder, args.threads))  # the machine drifts: again
    args.out.write_text(json.dumps(report, indent=2) + "\n")


def triton_env() -> dict:
    import pytriton

    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    return {"LD_LIBRARY_PATH": f"{libs}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


def triton_plan(folder: Path, work: Path, max_length: int):
    import shutil

    import pytriton

    from starcast.triton.repository import write_repository

    root = Path(pytriton.__file__).parent / "tritonserver"
    backends = work / "triton-backends"
    if not backends.is_dir():
        shutil.copytree(root / "backends" / "python", backends / "python")
        stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
        shutil.copy(stub / "triton_python_backend_stub", backends / "python")
    write_repository(folder, work / "triton-repo", "starcoder", max_batch=16, link=True, overwrite=True)
    command = [str(root / "bin" / "tritonserver"), f"--model-repository={work / 'triton-repo'}",
               f"--backend-directory={backends}", "--http-port={port}", "--http-address=127.0.0.1",
               "--allow-grpc=false", "--allow-metrics=false"]  # fmt: skip
    return command, "/v2/models/{name}/generate_stream", "/v2/health/ready"


if __name__ == "__main__":
    main()
