"""`starcast selftest --provider cuda`: run once on a GPU machine to know starcast works there.

For `builtin:tiny-python` and a SantaCoder-shaped random checkpoint (1.1B), exported in fp16 for the cuda target
with every proof run on the GPU, it runs the checks of `selftest_checks.py` (parity, placement and Memcpy nodes,
teacher-forced greedy tokens for three batch shapes, CUDA graph replay against an uncaptured run, the engine
serving 8 rows, TensorRT where it imports) and times a decode step with and without CUDA graphs, the plain graph
and transformers eager beside the memory-bandwidth roofline. A stage that raises is a failed check, and the
others still run: the first run on a lent GPU must report everything it can. Prints a table and writes a JSON
report. `--provider cpu --small` runs the same flow on the CPU with small models (how it is tested here).
UNRUN on a GPU: no GPU machine was lent to the work that wrote it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from starcast.contract import interfaces as io
from starcast.contract.config import PRESETS
from starcast.contract.errors import ParityError, UserError
from starcast.pipeline.progress import Progress
from starcast.runtime.generator import Generator
from starcast.selftest_checks import STEPS, capture_check, checks, engine_check, greedy_checks, placement
from starcast.selftest_checks import tensorrt_check as tensorrt_check

PROMPT = 128
MARKER = ".starcast-selftest"  # in an --output folder: selftest made it, and may replace what is inside


def require_provider(provider: str, device_id: int) -> None:
    """A one-line error, before any work, where the provider cannot run: judged by a real session."""
    if provider == "cuda":
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            import torch  # noqa: F401  (loads the CUDA and cuDNN libraries it was built with, for onnxruntime)
        from starcast.runtime.session import cuda_problem

        problem = cuda_problem(device_id)
        if problem:
            raise UserError(f"selftest --provider cuda: CUDA cannot be loaded here ({problem})")


def prepare_output(folder: Path) -> None:
    """`--output DIR`: a new or empty folder, or one an earlier selftest made; never a folder of the user's."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"selftest --output {folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise UserError(f"selftest --output {folder}: the folder is not empty and was not made by selftest")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("written by starcast selftest; its contents are replaced by the next run\n")


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


def attempt(model: dict, stage: str, run) -> Any:
    """`run()`, or None with the error kept in the model's report (a failed check) when it raises."""
    try:
        return run()
    except UserError:
        raise
    except Exception as exc:
        model.setdefault("errors", {})[stage] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        return None


def model_checks(folder: Path, manifest, name: str, provider: str, device_id: int, progress: Progress) -> dict:
    """Everything the selftest measures on one export (see selftest_checks.py); a stage that raises is recorded."""
    model: dict[str, Any] = {"parameters": manifest.parameters, "parity": manifest.plain.parity.to_json(),
                             "fused_parity": manifest.fused.parity.to_json()}  # fmt: skip
    for key in ("parity", "fused_parity"):
        record = manifest.plain if key == "parity" else manifest.fused
        numbers = ", ".join(f"{k} {v:.2e}" for k, v in record.parity.measured.items() if type(v) is float)
        model[key]["summary"] = f"{numbers} ({record.parity.kind}, tolerance {record.parity.tolerance:.0e})"
    vocab, fused = manifest.config.vocab_size, manifest.path(folder, manifest.fused.model)
    with progress.stage("placement", f"{name}: which provider runs each node, Memcpy nodes"):
        optimized = folder.parent / f"{name}-optimized" / "optimized.onnx"
        optimized.parent.mkdir(exist_ok=True)
        model["placement"] = attempt(model, "placement", lambda: placement(fused, provider, device_id, optimized))
    with progress.stage("greedy", f"{name}: {STEPS} teacher-forced steps, fused against plain on {provider}"):
        plain = (manifest.path(folder, manifest.plain.model), io.CONCAT_CACHE)
        run = lambda: greedy_checks(plain, (fused, manifest.fused.interface), manifest, provider, device_id)  # noqa: E731
        model["greedy"] = attempt(model, "greedy", run) or {}
    with progress.stage("capture", f"{name}: CUDA graph replay against the uncaptured session"):
        run = lambda: capture_check(folder, provider, device_id, manifest.dtype, vocab)  # noqa: E731
        model["capture"] = attempt(model, "capture", run)
    with progress.stage("engine", f"{name}: the engine serving 8 rows"):
        model["engine"] = attempt(model, "engine", lambda: engine_check(folder, provider, device_id, vocab))
    with progress.stage("timing", f"{name}: decode step after {PROMPT} tokens"):
        model["decode_ms"] = attempt(model, "timing", lambda: timings(folder, provider, device_id, vocab)) or {}
    return {key: value for key, value in model.items() if value is not None}


def timings(folder: Path, provider: str, device_id: int, vocab: int) -> dict[str, float]:
    found = {}
    runs = (("fused, CUDA graph", "fused", True), ("fused", "fused", False), ("plain", "plain", False))
    for label, graph, cuda_graph in runs[0 if provider == "cuda" else 1 :]:  # CUDA graphs exist on CUDA only
        generator = Generator.from_pretrained(
            folder, provider=provider, graph=graph, cuda_graph=cuda_graph, device_id=device_id,
            max_length=PROMPT + STEPS + 8,
        )  # fmt: skip
        found[label] = decode_ms(generator, vocab)
    return found


def selftest(provider: str, work: Path, small: bool, device_id: int = 0, progress: Progress | None = None) -> dict:
    import torch

    from starcast.exporter.random_checkpoint import write_random_checkpoint
    from starcast.pipeline.export import export

    require_provider(provider, device_id)
    progress = progress or Progress()
    dtype = "fp16" if provider == "cuda" else "fp32"  # fp32 static-cache graphs run on the CPU provider only
    large = PRESETS["test"].with_(n_positions=256) if small else PRESETS["santacoder"]
    report: dict[str, Any] = {"provider": provider, "dtype": dtype, "device_id": device_id, "models": {}}
    bandwidth = copy_bandwidth(provider)
    for name, source in (("tiny-python", "builtin:tiny-python"), ("santacoder" if not small else "test", None)):
        if source is None:
            checkpoint = work / f"{name}-checkpoint"
            with progress.stage("checkpoint", f"random {name}: {large.parameter_count() / 1e9:.2f}B parameters"):
                write_random_checkpoint(checkpoint, large, dtype=torch.float16 if dtype == "fp16" else torch.float32)
            source = str(checkpoint)
        folder = work / name
        try:
            manifest = export(source, folder, dtype, True, "cuda", progress=progress, proof_provider=provider)
        except ParityError as exc:  # a failed proof: the model's other checks cannot run
            report["models"][name] = {"errors": {"export": str(exc)}}
            continue
        model = model_checks(folder, manifest, name, provider, device_id, progress)
        if source != "builtin:tiny-python":
            with progress.stage("transformers", f"{name}: transformers eager decode step"):
                run = lambda at=Path(source): transformers_decode_ms(at, provider, dtype)  # noqa: E731
                eager = attempt(model, "transformers", run)
                model.setdefault("decode_ms", {})["transformers eager"] = eager
            if provider == "cuda":
                run = lambda at=folder, vocab=manifest.config.vocab_size: tensorrt_check(at, dtype, vocab)  # noqa: E731
                model["tensorrt"] = attempt(model, "tensorrt", run)
        weight_bytes = manifest.parameters * (2 if dtype == "fp16" else 4)
        model["roofline_tokens_per_s"] = bandwidth / weight_bytes
        report["models"][name] = model
    report["copy_bandwidth_gb_s"] = bandwidth / 1e9
    report["stage_seconds"] = dict(progress.timings)
    report["checks"] = checks(report, provider)
    report["passed"] = bool(report["checks"]) and all(check["passed"] for check in report["checks"])
    return report


def table(report: dict) -> str:
    lines = [f"starcast selftest on {report['provider']} ({report['dtype']}), copy bandwidth "
             f"{report['copy_bandwidth_gb_s']:.0f} GB/s"]  # fmt: skip
    for check in report["checks"]:
        lines.append(f"  {'ok  ' if check['passed'] else 'FAIL'} {check['check']}: {check['detail']}")
    for name, model in report["models"].items():
        timings = ", ".join(f"{k} {v:.2f} ms" for k, v in model.get("decode_ms", {}).items() if v is not None)
        roofline = model.get("roofline_tokens_per_s", 0)
        lines.append(f"  {name}: decode step {timings}; roofline {roofline:.0f} tokens/s")
    return "\n".join(lines)
