"""The one proof harness: a graph against the PyTorch reference, and a graph against another graph.

- `reference_parity`: like llm.c's golden-tensor checks, the reference and ONNX Runtime run the same left-padded
  batch, a prompt step then a decode step; the max difference is reported against a stated tolerance. Padding
  query positions are excluded: their logits are never used.
- `greedy_side_by_side`: two graphs decode greedily in step (prompt + N steps), through the runtime's own
  drivers; the max logit difference and whether every greedy token agreed (up to ties: two tokens whose
  reference logits are closer than the tolerance may swap).
NaN or infinity anywhere in compared logits is a failure, never a number `max()` can skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from starcast.contract import interfaces as io
from starcast.contract.config import GPTBigCodeConfig
from starcast.contract.dtypes import numpy_dtype
from starcast.contract.errors import ParityError
from starcast.contract.graph_files import external_data_files, load_header
from starcast.contract.manifest import GraphRecord, Manifest, Proof
from starcast.runtime.session import SessionOptions, create_session, device_of
from starcast.runtime.steps import make_steps

TOLERANCES = {"fp32": ("abs", 1e-4), "fp16": ("rel", 2e-2)}
GREEDY_STEPS = 8
# Above this many bytes of weights, graphs are proven on the CPU in ONNX Runtime's low-memory form (the graph as
# written, weights read from the mapped file: runtime/session.py), so that a proof's memory does not grow with the
# model; the form that ran is recorded with the proof.
LOW_MEMORY_ABOVE = 32 << 20


def session_form(path: Path, provider: str) -> str:
    """"default" (ONNX Runtime's full optimizations, as `generate` runs) or "low-memory" (large graphs on the CPU).
    A MatMulNBits graph with int8 activations (accuracy_level 4) is proven in the default form whatever its size:
    without prepacking its kernel computes in fp32 (what accuracy_level 0 computes), not what `generate` runs;
    the quantizer chose level 4 only where the prepacked weights fit the export's memory bound."""
    if provider != "cpu":
        return "default"
    header = load_header(path)
    if any(n.op_type == "MatMulNBits" and any(a.name == "accuracy_level" and a.i == 4 for a in n.attribute)
           for n in header.graph.node):  # fmt: skip
        return "default"
    weights = sum(file.stat().st_size for file in external_data_files(header, path))
    return "low-memory" if weights + path.stat().st_size > LOW_MEMORY_ABOVE else "default"


def proof_session(path: Path, provider: str = "cpu", device_id: int = 0):
    """A session for proving the graph at `path`, in the form `session_form` picks."""
    low_memory = session_form(path, provider) == "low-memory"
    return create_session(path, SessionOptions(provider, device_id=device_id, low_memory=low_memory))


def error(kind: str, ours: np.ndarray, reference: np.ndarray, valid: np.ndarray | None = None) -> float:
    """max |ours - reference| over `valid` (divided by max |reference| for "rel"); inf when either side holds
    NaN or infinity there."""
    ours, reference = ours.astype(np.float64), reference.astype(np.float64)
    if valid is not None:
        ours, reference = ours[valid], reference[valid]
    if not (np.isfinite(ours).all() and np.isfinite(reference).all()):
        return float("inf")
    diff = float(np.abs(ours - reference).max())
    if kind == "rel":
        return diff / max(float(np.abs(reference).max()), 1e-12)
    return diff


def verdict(kind: str, tolerance: float, worst: float) -> str:
    if not np.isfinite(worst):
        return "FAILED: NaN or infinite logits"
    return ("ok" if worst <= tolerance else "FAILED") + f" ({kind} error {worst:.2e}, tolerance {tolerance:.0e})"


@dataclass(frozen=True)
class ParityReport:
    """A graph against the reference: a prompt step and a decode step."""

    dtype: str
    kind: str
    tolerance: float
    prompt_error: float
    decode_error: float
    form: str = "default"

    @property
    def passed(self) -> bool:
        worst = max(self.prompt_error, self.decode_error)
        return bool(np.isfinite(worst)) and worst <= self.tolerance

    def proof(self) -> Proof:
        measured = {"dtype": self.dtype, "prompt_error": self.prompt_error, "decode_error": self.decode_error,
                    "session": self.form, "reference": "streamed"}  # fmt: skip
        return Proof(self.kind, self.tolerance, self.passed, measured)

    def summary(self) -> str:
        if not self.passed and not np.isfinite(max(self.prompt_error, self.decode_error)):
            return f"parity FAILED: the graph or the reference produced NaN or infinite logits ({self.dtype})"
        word = "ok" if self.passed else "FAILED"
        return (
            f"parity {word}: prompt {self.prompt_error:.2e}, decode {self.decode_error:.2e} "
            f"({self.kind} error, tolerance {self.tolerance:.0e}, {self.dtype})"
        )


@dataclass(frozen=True)
class GreedyReport:
    """Two graphs decoding greedily side by side."""

    what: str
    kind: str
    tolerance: float
    max_error: float
    steps: int
    same_tokens: bool
    form: str = "default"

    @property
    def passed(self) -> bool:
        return self.same_tokens and bool(np.isfinite(self.max_error)) and self.max_error <= self.tolerance

    def proof(self) -> Proof:
        measured = {"max_error": self.max_error, "steps": self.steps, "same_tokens": self.same_tokens,
                    "session": self.form}  # fmt: skip
        return Proof(self.kind, self.tolerance, self.passed, measured)

    def summary(self) -> str:
        tokens = "same greedy tokens" if self.same_tokens else "greedy tokens differ"
        result = verdict(self.kind, self.tolerance, self.max_error)
        return f"{self.what} {result} over prompt + {self.steps} steps, {tokens}"


def parity_inputs(vocab: int, batch: int = 2, prompt: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    """A left-padded batch: row 0 is full, row 1 has two padding tokens on the left."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, prompt), dtype=np.int64)
    mask = np.ones((batch, prompt), dtype=np.int64)
    mask[1:, :2] = 0
    return {io.INPUT_IDS: ids, io.ATTENTION_MASK: mask, io.POSITION_IDS: io.positions_from_mask(mask)}


def run_plain_graph(session, config: GPTBigCodeConfig, feeds: dict[str, np.ndarray], past: list[np.ndarray]):
    """One step of a concat-cache graph with plain session.run: (logits, presents)."""
    names = io.concat_inputs(config.n_layer)
    logits, *presents = session.run(None, {**feeds, **dict(zip(names[3:], past, strict=True))})
    return logits, presents


def reference_parity(
    model: Any, graph: Path, dtype: str, kind: str | None = None, tolerance: float | None = None, provider: str = "cpu"
) -> ParityReport:
    """`graph` (a concat-cache graph with all positions' logits, run on `provider`) against the PyTorch reference
    `model`."""
    import torch

    default_kind, default_tolerance = TOLERANCES[dtype]
    kind, tolerance = kind or default_kind, tolerance or default_tolerance
    cfg = model.config
    session = proof_session(graph, provider)
    feeds = parity_inputs(cfg.vocab_size)
    batch = feeds[io.INPUT_IDS].shape[0]
    empty = [np.zeros(cfg.cache_shape(batch, 0), numpy_dtype(dtype)) for _ in range(cfg.n_layer)]
    order = (io.INPUT_IDS, io.ATTENTION_MASK, io.POSITION_IDS)
    with torch.no_grad():
        ref = model(*(torch.from_numpy(feeds[n]) for n in order), *model.empty_past(batch))
    ours, presents = run_plain_graph(session, cfg, feeds, empty)
    valid = feeds[io.ATTENTION_MASK].astype(bool)
    prompt_error = error(kind, ours, ref[0].float().numpy(), valid)

    # One decode step: both continue from their own cache with the token the reference scored highest.
    next_ids = ref[0][:, -1].float().argmax(-1, keepdim=True).numpy()
    mask = np.concatenate([feeds[io.ATTENTION_MASK], np.ones((batch, 1), np.int64)], axis=1)
    step = {io.INPUT_IDS: next_ids, io.ATTENTION_MASK: mask, io.POSITION_IDS: io.positions_from_mask(mask)[:, -1:]}
    with torch.no_grad():
        ref_step = model(*(torch.from_numpy(step[n]) for n in order), *ref[1:])
    ours_step, _ = run_plain_graph(session, cfg, step, presents)
    decode_error = error(kind, ours_step, ref_step[0].float().numpy())
    return ParityReport(dtype, kind, tolerance, prompt_error, decode_error, session_form(graph, provider))


def two_steps(
    session, config: GPTBigCodeConfig, dtype: str, feeds: dict[str, np.ndarray], next_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A concat-cache graph's logits on a prompt step and one decode step, with `next_ids` (default: its own
    greedy tokens)."""
    batch = feeds[io.INPUT_IDS].shape[0]
    empty = [np.zeros(config.cache_shape(batch, 0), numpy_dtype(dtype)) for _ in range(config.n_layer)]
    prompt, past = run_plain_graph(session, config, feeds, empty)
    if next_ids is None:
        next_ids = prompt[:, -1].argmax(-1)[:, None].astype(np.int64)
    mask = np.concatenate([feeds[io.ATTENTION_MASK], np.ones((batch, 1), np.int64)], axis=1)
    step = {io.INPUT_IDS: next_ids, io.ATTENTION_MASK: mask, io.POSITION_IDS: io.positions_from_mask(mask)[:, -1:]}
    decode, _ = run_plain_graph(session, config, step, past)
    return prompt, decode


def graph_parity(
    reference: Path, candidate: Path, config: GPTBigCodeConfig, dtype: str, kind: str, feeds: dict[str, np.ndarray]
) -> float:
    """A concat-cache `candidate` against a concat-cache `reference` graph on one prompt and one decode step
    (the quantized graph against the float one, on `reference_parity`'s inputs)."""
    expected, expected_step = two_steps(proof_session(reference), config, dtype, feeds)
    next_ids = expected[:, -1].argmax(-1)[:, None].astype(np.int64)
    ours, ours_step = two_steps(proof_session(candidate), config, dtype, feeds, next_ids)
    worst = error(kind, ours, expected, feeds[io.ATTENTION_MASK].astype(bool))
    return max(worst, error(kind, ours_step, expected_step))


# A quantized graph is re-proven against the logits it gave when it was made, on the same inputs and decode
# tokens. Its kernels on another CPU or ONNX Runtime release may round its int8 activations differently (a
# quantization step: about 2% of the largest logit measured between two kernel paths), so the tolerance is the
# fp16 one; a changed or corrupted graph does not stay this close.
RECORDED_TOLERANCE = ("rel", 2e-2)
RECORDED_LOGITS = "quantized_logits.npz"  # in the export folder, hashed with its other files


def recorded_logits(graph: Path, config: GPTBigCodeConfig, dtype: str, next_ids: np.ndarray | None = None):
    """The graph's logits on `parity_inputs` — every real prompt position, then the decode step, (n, vocab) — and
    the decode step's tokens (its own greedy tokens unless `next_ids`)."""
    feeds = parity_inputs(config.vocab_size)
    prompt, decode = two_steps(proof_session(graph), config, dtype, feeds, next_ids)
    valid = feeds[io.ATTENTION_MASK].astype(bool)
    chosen = prompt[:, -1].argmax(-1)[:, None].astype(np.int64) if next_ids is None else next_ids
    return np.concatenate([prompt[valid], decode[:, -1]]).astype(np.float32), chosen


def recorded_parity(graph: Path, config: GPTBigCodeConfig, dtype: str, recorded: dict[str, np.ndarray]) -> Proof:
    """The graph now against its `recorded_logits` (fed the recorded decode tokens); a shape that differs is a
    failure."""
    kind, tolerance = RECORDED_TOLERANCE
    logits, next_ids = recorded.get("logits"), recorded.get("next_ids")
    rows = parity_inputs(config.vocab_size)[io.INPUT_IDS].shape[0]
    if logits is None or next_ids is None or next_ids.shape != (rows, 1):
        worst = float("inf")
    else:
        ours, _ = recorded_logits(graph, config, dtype, next_ids.astype(np.int64))
        worst = error(kind, ours, logits) if ours.shape == logits.shape else float("inf")
    passed = bool(np.isfinite(worst)) and worst <= tolerance
    return Proof(kind, tolerance, passed, {"against": "recorded logits", "max_error": worst})


def greedy_side_by_side(
    reference: tuple[Path, str],
    candidate: tuple[Path, str],
    config: GPTBigCodeConfig,
    dtype: str,
    what: str,
    steps: int = GREEDY_STEPS,
    lengths: tuple[int, ...] = (5, 3),
    kind: str | None = None,
    tolerance: float | None = None,
    provider: str = "cpu",
    pad_to: int | None = None,
    device_id: int = 0,
) -> GreedyReport:
    """Greedy decoding through two graphs (path, interface) side by side on ONNX Runtime (`provider`), from a
    left-padded batch of prompts of `lengths`; tokens come from the reference."""
    default_kind, default_tolerance = TOLERANCES[dtype]
    kind, tolerance = kind or default_kind, tolerance or default_tolerance
    rng = np.random.default_rng(1)
    width = max(pad_to or 0, *lengths)  # pad_to > every length: every row padded, the prompt step's hardest case
    ids = rng.integers(1, config.vocab_size, size=(len(lengths), width), dtype=np.int64)
    mask = (np.arange(width)[None, :] >= width - np.array(lengths)[:, None]).astype(np.int64)
    length, np_dtype, device = width + steps + 1, numpy_dtype(dtype), device_of(provider)

    def decode(path: Path, interface: str, tokens: list[np.ndarray] | None) -> list[np.ndarray]:
        """Prompt + `steps` decode steps, fed `tokens` (the reference's) or its own greedy tokens."""
        session = proof_session(path, provider, device_id)
        driver = make_steps(session, interface, config, len(lengths), length, np_dtype, device)
        logits = [np.array(driver.prefill(ids, mask), copy=True)]
        for step in range(steps):
            token = logits[-1].argmax(-1) if tokens is None else tokens[step]
            logits.append(np.array(driver.decode_one_token(token), copy=True))
        return logits

    # One graph at a time, the reference first: its tokens do not depend on the candidate, and a large
    # quantized graph's session (its prepacked weights) is not held twice.
    expected_steps = decode(*reference, None)
    ours_steps = decode(*candidate, [logits.argmax(-1) for logits in expected_steps[:-1]])
    worst, same = 0.0, True
    for expected, ours in zip(expected_steps, ours_steps, strict=True):
        worst = max(worst, error(kind, ours, expected))
        same = same and not real_disagreement(expected, ours.argmax(-1), kind, tolerance)
    form = session_form(candidate[0], provider)
    return GreedyReport(what, kind, tolerance, worst, steps, same, form)


def real_disagreement(expected: np.ndarray, chosen: np.ndarray, kind: str, tolerance: float) -> bool:
    """Whether a row's chosen token is worse, in the reference's own logits, than the reference's greedy token by
    more than the tolerance: a tie within the tolerance (two logits closer than the graphs may differ) is not a
    disagreement, any other different token is."""
    expected = expected.astype(np.float64)
    rows = np.arange(expected.shape[0])
    margin = expected[rows, expected.argmax(-1)] - expected[rows, chosen]
    allowed = tolerance * (np.abs(expected).max() if kind == "rel" else 1.0)
    return bool((margin > allowed).any())


def prove_fused(folder: Path, manifest: Manifest, fused: GraphRecord, provider: str = "cpu") -> Proof:
    """Greedy decoding through the plain and the fused graph side by side."""
    plain_path, fused_path = manifest.path(folder, manifest.plain.model), manifest.path(folder, fused.model)
    report = greedy_side_by_side(
        (plain_path, io.CONCAT_CACHE), (fused_path, fused.interface), manifest.config, manifest.dtype, "fused parity",
        kind=fused.parity.kind, tolerance=fused.parity.tolerance, provider=provider,
    )  # fmt: skip
    if not report.passed:
        raise ParityError(report.summary())
    return report.proof()
