"""The measurements `starcast selftest` makes on each model, and the checks that judge them.

Each check reads only the report, so that a test can hand it a bad report and see it fail:
  - parity of the plain graph against PyTorch and of the fused graph against the plain one (the export's proofs);
  - every node of the fused graph on the provider (ONNX Runtime's placement record) and no Memcpy node in the
    optimized graph the session itself writes (`optimized_model_filepath`: Memcpy nodes are inserted after
    placement is recorded, so only that file can show them);
  - greedy tokens under teacher forcing, with ties within the tolerance allowed (`greedy_side_by_side`, the one
    proof harness), for four batch shapes (one with every row padded);
  - the fused graph with its decode step captured as a CUDA graph against the same session uncaptured: the same
    decode steps, logits within the dtype's tolerance (on the CPU both sides run uncaptured);
  - the engine serving `ENGINE_ROWS` rows at once;
  - TensorRT's logits against the plain graph's, where TensorRT imports.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from starcast.contract.manifest import Manifest
from starcast.pipeline.proof import TOLERANCES, error, greedy_side_by_side
from starcast.runtime.generator import Generator
from starcast.runtime.session import SessionOptions, create_session

STEPS = 64
CAPTURE_STEPS = 16
ENGINE_ROWS, ENGINE_TOKENS = 8, 16
# name -> (prompt lengths, padded width): the last pads every row, as a server's batch of short prompts does
BATCHES = {
    "batch 1": ((9,), None),
    "left-padded batch of 3": ((9, 5, 2), None),
    "a 1-token row in a padded batch": ((6, 3, 1), None),
    "every row padded": ((5, 3), 8),
}


def batch_of(lengths: tuple[int, ...] | list[int], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts of `lengths` (token ids 1..vocab-1)."""
    width = max(lengths)
    rng = np.random.default_rng(3)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = rng.integers(1, vocab, length)
        mask[row, width - length :] = 1
    return ids, mask


def count_memcpy(optimized: Path) -> int:
    """Memcpy nodes (MemcpyFromHost, MemcpyToHost) in an ONNX file, subgraphs included."""
    import onnx

    def count(graph) -> int:
        total = 0
        for node in graph.node:
            total += node.op_type.startswith("Memcpy")
            total += sum(count(a.g) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
        return total

    return count(onnx.load(str(optimized), load_external_data=False).graph)


def placement(path: Path, provider: str, device_id: int, optimized: Path) -> dict[str, Any]:
    """Nodes per execution provider (ONNX Runtime's record) and Memcpy nodes (the optimized graph it writes)."""
    options = SessionOptions(provider, device_id=device_id, record_placement=True, optimized_model=optimized)
    session = create_session(path, options)
    per_provider: dict[str, int] = {}
    for assignment in session.get_provider_graph_assignment_info():
        count = len(assignment.get_nodes())
        per_provider[assignment.ep_name] = per_provider.get(assignment.ep_name, 0) + count
    return {"nodes": per_provider, "memcpy_nodes": count_memcpy(optimized), "providers": session.get_providers()}


def greedy_checks(
    reference: tuple[Path, str], candidate: tuple[Path, str], manifest: Manifest, provider: str, device_id: int = 0
) -> dict[str, dict]:
    """The candidate graph against the reference graph, teacher-forced with the reference's tokens."""
    parity = manifest.fused.parity if manifest.fused else None
    kind, tolerance = (parity.kind, parity.tolerance) if parity else TOLERANCES[manifest.dtype]
    results = {}
    for name, (lengths, pad_to) in BATCHES.items():
        report = greedy_side_by_side(
            reference, candidate, manifest.config, manifest.dtype, "fused vs plain", steps=STEPS, lengths=lengths,
            kind=kind, tolerance=tolerance, provider=provider, pad_to=pad_to, device_id=device_id,
        )  # fmt: skip
        results[name] = {"passed": report.passed, "detail": report.summary(), **report.proof().measured}
    return results


def decode_side_by_side(drivers: list, ids: np.ndarray, mask: np.ndarray, steps: int) -> list[tuple]:
    """(first's logits, second's logits) for the prompt and `steps` decode steps, both fed the first's greedy
    tokens (the same steps on both sides)."""
    first, second = (np.array(driver.prefill(ids, mask), copy=True) for driver in drivers)
    pairs = [(first, second)]
    for _ in range(steps):
        tokens = first.argmax(-1)
        first, second = (np.array(driver.decode_one_token(tokens), copy=True) for driver in drivers)
        pairs.append((first, second))
    return pairs


def logits_agree(pairs: list[tuple], kind: str, tolerance: float) -> dict[str, Any]:
    """The worst error over every pair (proof.error: NaN or infinity is a failure), against `tolerance`."""
    worst = max(error(kind, ours, reference) for reference, ours in pairs)
    passed = bool(np.isfinite(worst)) and worst <= tolerance
    return {"passed": passed, "max_error": worst, "kind": kind, "tolerance": tolerance, "steps": len(pairs) - 1}


def capture_check(folder: Path, provider: str, device_id: int, dtype: str, vocab: int) -> dict[str, Any]:
    """The fused graph with CUDA graphs on and off: the same decode steps, logits within the tolerance."""
    generators = [
        Generator.from_pretrained(folder, provider=provider, graph="fused", cuda_graph=flag, device_id=device_id,
                                  max_length=16 + CAPTURE_STEPS)  # fmt: skip
        for flag in (False, True)
    ]
    ids, mask = batch_of((9, 5, 2), vocab)
    pairs = decode_side_by_side([g.steps(ids.shape[0]) for g in generators], ids, mask, CAPTURE_STEPS)
    kind, tolerance = TOLERANCES[dtype]
    return {**logits_agree(pairs, kind, tolerance), "captured": generators[1].cuda_graph}


def engine_check(folder: Path, provider: str, device_id: int, vocab: int) -> dict[str, Any]:
    """ENGINE_ROWS requests at once through the engine: each must finish with ENGINE_TOKENS tokens, no error."""
    import time

    from starcast.runtime.engine import Engine
    from starcast.runtime.requests import Request

    engine = Engine.from_export(folder, max_batch=ENGINE_ROWS, provider=provider, max_length=64, device_id=device_id)
    finished: dict[int, Any] = {}
    done = threading.Event()

    def on_event(row: int):
        def record(event) -> None:
            if event.finish_reason is not None:
                finished[row] = event
                if len(finished) == ENGINE_ROWS:
                    done.set()

        return record

    ids, _ = batch_of(tuple(range(2, 2 + ENGINE_ROWS)), vocab)
    engine.start()
    start = time.perf_counter()
    try:
        for row in range(ENGINE_ROWS):
            prompt = ids[row][ids[row] > 0]
            engine.submit(Request(prompt, max_tokens=ENGINE_TOKENS, on_event=on_event(row)))
        done.wait(timeout=300)
    finally:
        elapsed = time.perf_counter() - start
        engine.stop(grace=1)
    events = [finished.get(row) for row in range(ENGINE_ROWS)]
    return engine_verdict(events, elapsed) | {"steps": engine.steps}


def engine_verdict(events: list, seconds: float) -> dict[str, Any]:
    """Passed when every row finished without error: at its length, or earlier at an end-of-sequence token."""
    tokens = [event.completion_tokens if event else 0 for event in events]
    errors = [event.error if event else "never finished" for event in events if not event or event.error]
    complete = all(event and (event.finish_reason == "length" and event.completion_tokens == ENGINE_TOKENS
                              or event.finish_reason == "stop") for event in events)  # fmt: skip
    passed = len(events) == ENGINE_ROWS and complete and not errors
    return {"passed": bool(passed), "completion_tokens": tokens, "errors": errors[:3],
            "tokens_per_s": sum(tokens) / max(seconds, 1e-9)}  # fmt: skip


def tensorrt_check(folder: Path, dtype: str, vocab: int) -> dict[str, Any] | None:
    """With TensorRT importable: an engine for the export, its logits against the plain graph's (batch 1)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None
    from starcast.pipeline.engine import build_engine_in_place
    from starcast.runtime.tensorrt.builder import Limits

    build_engine_in_place(folder, Limits(max_batch=3, max_prompt=128, max_length=128 + STEPS + 8), True)
    engine = Generator.from_pretrained(folder, provider="tensorrt")
    reference = Generator.from_pretrained(folder, provider="cuda", graph="plain", max_length=96)
    ids, mask = batch_of((9,), vocab)
    pairs = decode_side_by_side([reference.steps(1), engine.steps(1)], ids, mask, STEPS)
    return logits_agree(pairs, *TOLERANCES[dtype])


def checks(report: dict, provider: str) -> list[dict[str, Any]]:
    """Every check of the report, each passed or not with what it measured."""
    ep = "CUDAExecutionProvider" if provider == "cuda" else "CPUExecutionProvider"
    found = []

    def add(name: str, check: str, passed: bool, detail: str) -> None:
        found.append({"check": f"{name}: {check}", "passed": bool(passed), "detail": detail})

    for name, model in report["models"].items():
        for stage, problem in model.get("errors", {}).items():
            add(name, f"{stage} ran", False, problem)
        for key, what in (("parity", "plain graph vs PyTorch"), ("fused_parity", "fused graph vs plain")):
            if key in model:
                add(name, what, model[key]["passed"], model[key]["summary"])
        if "placement" in model:
            nodes, memcpy = model["placement"]["nodes"], model["placement"]["memcpy_nodes"]
            add(name, f"every node on {ep}", set(nodes) == {ep}, str(nodes))
            add(name, "no Memcpy node in the optimized graph", memcpy == 0, f"{memcpy} Memcpy nodes")
        for batch, result in model.get("greedy", {}).items():
            add(name, f"greedy {STEPS} steps teacher-forced, {batch}", result["passed"], result["detail"])
        if "capture" in model:
            result = model["capture"]
            detail = f"{result['kind']} error {result['max_error']:.2e} (tolerance {result['tolerance']:.0e})"
            detail += "" if result["captured"] else f", capture off on {provider}: both sides uncaptured"
            add(name, "CUDA graph replay vs uncaptured logits", result["passed"], detail)
        if "engine" in model:
            result = model["engine"]
            detail = f"{result['completion_tokens']} tokens, {result['tokens_per_s']:.0f} tokens/s {result['errors']}"
            add(name, f"engine serving {ENGINE_ROWS} rows", result["passed"], detail)
        if model.get("tensorrt"):
            result = model["tensorrt"]
            add(name, "TensorRT vs plain graph logits", result["passed"], f"error {result['max_error']:.2e}")
    return found
