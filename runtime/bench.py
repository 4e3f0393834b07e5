"""`starcast bench EXPORT_DIR`: prefill latency, time to first token, decode tokens/s and peak memory.

Every figure is the median of `runs` timed runs after a warm-up. A run is one prefill of `prompt_tokens`
tokens then `new_tokens - 1` greedy decode steps, through the same `prefill` / `decode_one_token` path that
`Generator.generate` uses (host-side token choice included).
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from starcast.contract.errors import UserError
from starcast.runtime.export_folder import open_export
from starcast.runtime.generator import Generator
from starcast.runtime.inputs import check_whole_number


@dataclass(frozen=True)
class BenchResult:
    graph: str
    provider: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    time_to_first_token_ms: float
    decode_ms_per_step: float
    decode_tokens_per_s: float  # per sequence
    aggregate_tokens_per_s: float  # all sequences of the batch
    peak_rss_mib: float
    runs: int

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [
            ("graph", f"{self.graph} ({self.provider})"),
            ("batch x prompt -> new", f"{self.batch} x {self.prompt_tokens} -> {self.new_tokens}"),
            ("prefill", f"{self.prefill_ms:.1f} ms"),
            ("time to first token", f"{self.time_to_first_token_ms:.1f} ms"),
            ("decode step", f"{self.decode_ms_per_step:.2f} ms"),
            ("decode tokens/s per sequence", f"{self.decode_tokens_per_s:.1f}"),
            ("decode tokens/s aggregate", f"{self.aggregate_tokens_per_s:.1f}"),
            ("peak resident memory", f"{self.peak_rss_mib:.0f} MiB"),
            ("medians of", f"{self.runs} runs after a warm-up"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_run(generator: Generator, ids: np.ndarray, new_tokens: int) -> tuple[float, float, float]:
    """(prefill s, time to first token s, decode s for new_tokens - 1 steps)."""
    steps = generator.steps(ids.shape[0])
    mask = np.ones_like(ids)
    start = time.perf_counter()
    logits = steps.prefill(ids, mask)
    prefilled = time.perf_counter()
    next_ids = logits.argmax(-1)
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        next_ids = steps.decode_one_token(next_ids).argmax(-1)
    done = time.perf_counter()
    return prefilled - start, first - start, done - first


def bench(
    export_dir: Path,
    batch: int = 1,
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    provider: str = "cpu",
    graph: str = "auto",
    runs: int = 3,
    threads: int = 0,
    **session: object,
) -> BenchResult:
    """`session`: Generator.from_pretrained's device_id, tf32, verbose."""
    for name, value in (("batch", batch), ("prompt tokens", prompt_tokens), ("new tokens", new_tokens), ("runs", runs)):
        check_whole_number(name, value)
    if batch < 1 or prompt_tokens < 1 or new_tokens < 2 or runs < 1:
        raise UserError("batch, prompt tokens and runs must be >= 1, new tokens >= 2")
    n_positions = open_export(Path(export_dir).expanduser().absolute()).config.n_positions
    if prompt_tokens + new_tokens > n_positions:
        raise UserError(
            f"prompt tokens ({prompt_tokens}) + new tokens ({new_tokens}) exceed the export's maximum "
            f"length {n_positions}"
        )
    # The cache is sized for this run, as a server sizes it for its longest request.
    generator = Generator.from_pretrained(export_dir, provider, graph, prompt_tokens + new_tokens, threads, **session)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, generator.config.vocab_size, size=(batch, prompt_tokens), dtype=np.int64)
    one_run(generator, ids, new_tokens)  # warm-up: allocations, kernel selection, CUDA graph capture
    prefill, ttft, decode = zip(*(one_run(generator, ids, new_tokens) for _ in range(runs)), strict=True)
    step = statistics.median(decode) / (new_tokens - 1)
    return BenchResult(
        graph=generator.graph_file,
        provider=provider,
        batch=batch,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        prefill_ms=statistics.median(prefill) * 1e3,
        time_to_first_token_ms=statistics.median(ttft) * 1e3,
        decode_ms_per_step=step * 1e3,
        decode_tokens_per_s=1 / step,
        aggregate_tokens_per_s=batch / step,
        peak_rss_mib=peak_rss_mib(),
        runs=runs,
    )
