"""`starcast selftest --provider cuda`: run once on a GPU machine to know starcast works there.

For `builtin:tiny-python` and a SantaCoder-shaped random checkpoint (1.1B), exported in fp16 for the cuda
target with every proof run on the GPU:
  - the fused graph's nodes all on the CUDA provider, no Memcpy node, and a captured CUDA graph that replays
    to the same logits as the uncaptured session;
  - greedy tokens for 64 steps equal to a reference (the plain graph on the CPU for the small model; on the GPU
    for the large one, whose fp16 CPU run would take minutes) for batch 1, a left-padded batch of 3 and a batch
    in which every row is padded;
  - decode ms per step with and without CUDA graphs, the plain graph, and transformers eager in the same run;
  - the memory-bandwidth roofline (weight bytes per token / measured device copy bandwidth);
  - with TensorRT importable, an engine and its greedy tokens.
Prints a table and writes a JSON report. `--provider cpu --small` runs the same flow on the CPU with small
models (how it is tested here). UNRUN on a GPU: no GPU machine was lent to the work that wrote it.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from starcast.contract.config import PRESETS
from starcast.contract.errors import UserError
from starcast.pipeline.progress import Progress
from starcast.runtime.generator import Generator
from starcast.runtime.session import SessionOptions, create_session

STEPS = 64
PROMPT = 128
BATCHES = {"batch 1": [9], "left-padded batch of 3": [9, 5, 2], "every row padded": [6, 3, 1]}


def require_provider(provider: str, device_id: int) -> None:
    """A one-line error, before any work, where the provider cannot run."""
    if provider == "cuda":
        import onnxruntime as ort

        from starcast.runtime.session import preload_cuda_libraries

        missing = preload_cuda_libraries()
        if "CUDAExecutionProvider" not in ort.get_available_providers() or missing:
            raise UserError(f"selftest --provider cuda: CUDA cannot be loaded here ({', '.join(missing) or 'no GPU'})")


def batch_of(lengths: list[int], vocab: int, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    width = pad_to or max(lengths)
    rng = np.random.default_rng(3)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = rng.integers(1, vocab, length)
        mask[row, width - length :] = 1
    return ids, mask


def placement(path: Path, provider: str, device_id: int) -> dict[str, Any]:
    """Nodes per execution provider and Memcpy nodes, from ONNX Runtime's own record of the session."""
    session = create_session(path, SessionOptions(provider, device_id=device_id, record_placement=True))
    per_provider: dict[str, int] = {}
    memcpy = 0
    for assignment in session.get_provider_graph_assignment_info():
        nodes = assignment.get_nodes()
        per_provider[assignment.ep_name] = per_provider.get(assignment.ep_name, 0) + len(nodes)
        memcpy += sum(node.op_type.startswith("Memcpy") for node in nodes)
    return {"nodes": per_provider, "memcpy_nodes": memcpy, "provider_options": session.get_provider_options()}


def greedy_checks(export: Path, provider: str, reference_provider: str, device_id: int, vocab: int) -> dict:
    ours = Generator.from_pretrained(export, provider=provider, graph="fused", device_id=device_id, max_length=96)
    reference = Generator.from_pretrained(export, provider=reference_provider, graph="plain", max_length=96)
    results = {}
    for name, lengths in BATCHES.items():
        ids, mask = batch_of(lengths, vocab, pad_to=9 if name == "every row padded" else None)
        got = ours.generate(ids, mask, max_new_tokens=STEPS, eos_token_id=None)
        expected = reference.generate(ids, mask, max_new_tokens=STEPS, eos_token_id=None)
        differ = np.nonzero((got != expected).any(axis=0))[0]
        first = int(differ[0]) - ids.shape[1] if differ.size else None
        results[name] = {"equal": first is None, "first_different_step": first}
    return results


def decode_ms(generator: Generator, vocab: int, batch: int = 1) -> float:
    """Median ms of a decode step after a PROMPT-token prefill (the step `generate` runs, logits to the host)."""
    steps = generator.steps(batch)
    ids = np.random.default_rng(0).integers(1, vocab, (batch, PROMPT))
    token = steps.prefill(ids, np.ones_like(ids)).argmax(-1)
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        token = steps.decode_one_token(token).argmax(-1)
        times.append(time.perf_counter() - start)
    return statistics.median(times[4:]) * 1e3


def transformers_decode_ms(checkpoint: Path, provider: str, dtype: str) -> float | None:
    """transformers' eager GPTBigCode on the same weights: median ms of a cached decode step."""
    try:
        import torch
        from transformers import GPTBigCodeForCausalLM
    except ImportError:
        return None
    device = "cuda" if provider == "cuda" else "cpu"
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    model = GPTBigCodeForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype, attn_implementation="eager")
    model = model.to(device).eval()
    ids = torch.randint(1, model.config.vocab_size, (1, PROMPT), device=device)
    times = []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        token, past = out.logits[:, -1:].argmax(-1), out.past_key_values
        for _ in range(STEPS):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(token, past_key_values=past, use_cache=True)
            token, past = out.logits[:, -1:].argmax(-1), out.past_key_values
            token = token.cpu().to(device)  # the token choice reaches the host, as in starcast's loop
            times.append(time.perf_counter() - start)
    return statistics.median(times[4:]) * 1e3


def tensorrt_check(folder: Path, vocab: int) -> dict[str, Any] | None:
    """With TensorRT importable: build an engine for the export and compare its greedy tokens (batch 1)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None
    from starcast.pipeline.engine import build_engine_in_place
    from starcast.runtime.tensorrt.builder import Limits

    build_engine_in_place(folder, Limits(max_batch=3, max_prompt=PROMPT, max_length=PROMPT + STEPS + 8), True)
    engine = Generator.from_pretrained(folder, provider="tensorrt")
    reference = Generator.from_pretrained(folder, provider="cuda", graph="plain", max_length=96)
    ids, mask = batch_of([9], vocab)
    got = engine.generate(ids, mask, max_new_tokens=STEPS, eos_token_id=None)
    expected = reference.generate(ids, mask, max_new_tokens=STEPS, eos_token_id=None)
    return {"equal": bool((got == expected).all()), "decode_ms": decode_ms(engine, vocab)}


def copy_bandwidth(provider: str) -> float:
    """Bytes per second of a device-to-device copy (read + write), as the roofline's denominator."""
    size = 1 << 30
    if provider == "cuda":
        import torch

        source = torch.empty(size, dtype=torch.uint8, device="cuda")
        target = torch.empty_like(source)
        target.copy_(source)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            target.copy_(source)
        torch.cuda.synchronize()
        return 2 * size * 10 / (time.perf_counter() - start)
    source, target = np.ones(size // 4, np.uint8), np.ones(size // 4, np.uint8)  # both touched: no page faults
    start = time.perf_counter()
    for _ in range(4):
        np.copyto(target, source)
    return 2 * 4 * source.nbytes / (time.perf_counter() - start)


def selftest(provider: str, work: Path, small: bool, device_id: int = 0, progress: Progress | None = None) -> dict:
    import torch

    from starcast.exporter.random_checkpoint import write_random_checkpoint
    from starcast.pipeline.export import export

    require_provider(provider, device_id)
    progress = progress or Progress()
    dtype = "fp16" if provider == "cuda" else "fp32"  # fp32 static-cache graphs run on the CPU provider only
    large = PRESETS["test"].with_(n_positions=256) if small else PRESETS["santacoder"]
    report: dict[str, Any] = {"provider": provider, "dtype": dtype, "models": {}}
    bandwidth = copy_bandwidth(provider)
    for name, source in (("tiny-python", "builtin:tiny-python"), ("santacoder" if not small else "test", None)):
        if source is None:
            checkpoint = work / f"{name}-checkpoint"
            with progress.stage("checkpoint", f"random {name}: {large.parameter_count() / 1e9:.2f}B parameters"):
                write_random_checkpoint(checkpoint, large, dtype=torch.float16 if dtype == "fp16" else torch.float32)
            source = str(checkpoint)
        folder = work / name
        manifest = export(source, folder, dtype, True, "cuda", progress=progress, proof_provider=provider)
        model: dict[str, Any] = {
            "parameters": manifest.parameters,
            "parity": manifest.plain.parity.to_json(),
            "fused_parity": manifest.fused.parity.to_json(),
        }
        with progress.stage("placement", f"{name}: which provider runs each node"):
            model["placement"] = placement(manifest.path(folder, manifest.fused.model), provider, device_id)
        reference = "cpu" if name == "tiny-python" or provider == "cpu" else provider
        with progress.stage("greedy", f"{name}: {STEPS} steps against the plain graph on {reference}"):
            model["greedy"] = greedy_checks(folder, provider, reference, device_id, manifest.config.vocab_size)
        with progress.stage("timing", f"{name}: decode step after {PROMPT} tokens"):
            timings = {}
            for label, graph, cuda_graph in (("fused, CUDA graph", "fused", True), ("fused", "fused", False),
                                             ("plain", "plain", False)):  # fmt: skip
                generator = Generator.from_pretrained(
                    folder, provider=provider, graph=graph, cuda_graph=cuda_graph, device_id=device_id,
                    max_length=PROMPT + STEPS + 8,
                )  # fmt: skip
                timings[label] = decode_ms(generator, manifest.config.vocab_size)
            if source != "builtin:tiny-python":
                timings["transformers eager"] = transformers_decode_ms(Path(source), provider, dtype)
            model["decode_ms"] = timings
        if provider == "cuda" and source != "builtin:tiny-python":
            model["tensorrt"] = tensorrt_check(folder, manifest.config.vocab_size)
        weight_bytes = manifest.parameters * (2 if dtype == "fp16" else 4)
        model["roofline_tokens_per_s"] = bandwidth / weight_bytes
        report["models"][name] = model
    report["copy_bandwidth_gb_s"] = bandwidth / 1e9
    report["checks"] = checks(report, provider)
    report["passed"] = all(check["passed"] for check in report["checks"])
    return report


def checks(report: dict, provider: str) -> list[dict[str, Any]]:
    found = []
    for name, model in report["models"].items():
        ep = "CUDAExecutionProvider" if provider == "cuda" else "CPUExecutionProvider"
        nodes = model["placement"]["nodes"]
        found.append({"check": f"{name}: every node on {ep}, no Memcpy", "passed": set(nodes) == {ep}
                      and model["placement"]["memcpy_nodes"] == 0, "detail": json.dumps(nodes)})  # fmt: skip
        for batch, result in model["greedy"].items():
            detail = "equal" if result["equal"] else f"first differs at step {result['first_different_step']}"
            found.append(
                {"check": f"{name}: greedy {STEPS} steps, {batch}", "passed": result["equal"], "detail": detail}
            )
    return found


def table(report: dict) -> str:
    lines = [f"starcast selftest on {report['provider']} ({report['dtype']}), copy bandwidth "
             f"{report['copy_bandwidth_gb_s']:.0f} GB/s"]  # fmt: skip
    for check in report["checks"]:
        lines.append(f"  {'ok  ' if check['passed'] else 'FAIL'} {check['check']}: {check['detail']}")
    for name, model in report["models"].items():
        timings = ", ".join(f"{k} {v:.2f} ms" for k, v in model["decode_ms"].items() if v is not None)
        lines.append(f"  {name}: decode step {timings}; roofline {model['roofline_tokens_per_s']:.0f} tokens/s")
    return "\n".join(lines)
