"""`starcast selftest`'s checks, each shown failing on bad input (a check that cannot fail proves nothing), and
the files it must not touch. The whole flow runs end to end in tests/test_gpu_path.py."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from conftest import Canary, assert_one_line, save_hf_checkpoint, starcast
from onnx import TensorProto, helper

from starcast.contract import interfaces as io
from starcast.contract.manifest import read_manifest
from starcast.pipeline.export import export
from starcast.selftest_checks import (
    BATCHES,
    ENGINE_ROWS,
    ENGINE_TOKENS,
    checks,
    count_memcpy,
    decode_side_by_side,
    engine_verdict,
    greedy_checks,
    logits_agree,
    placement,
)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two cuda-target exports of the same config with different weights: the second is a wrong 'fused' graph."""
    root = tmp_path_factory.mktemp("selftest")
    for name, seed in (("right", 0), ("wrong", 1)):
        folder, _ = save_hf_checkpoint(root / f"ckpt-{name}", seed=seed)
        export(str(folder), root / name, fuse_target="cuda")
    return root


def fused_and_plain(folder):
    manifest = read_manifest(folder)
    fused = (manifest.path(folder, manifest.fused.model), manifest.fused.interface)
    return manifest, (manifest.path(folder, manifest.plain.model), io.CONCAT_CACHE), fused


def test_teacher_forced_greedy_passes_the_right_graph_and_fails_a_wrong_one(exports):
    manifest, plain, fused = fused_and_plain(exports / "right")
    good = greedy_checks(plain, fused, manifest, "cpu")
    assert set(good) == set(BATCHES) and all(result["passed"] for result in good.values()), good
    _, _, wrong = fused_and_plain(exports / "wrong")
    bad = greedy_checks(plain, wrong, manifest, "cpu")
    assert not any(result["passed"] for result in bad.values()), bad
    assert all("FAILED" in result["detail"] for result in bad.values())


def memcpy_graph(path) -> None:
    """What ONNX Runtime writes for a CUDA session whose shape computation runs on the CPU: Memcpy transfers."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [
        helper.make_node("MemcpyFromHost", ["x"], ["x_gpu"]),
        helper.make_node("Relu", ["x_gpu"], ["r"]),
        helper.make_node("MemcpyToHost", ["r"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "copies", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_the_memcpy_counter_reads_the_optimized_graph_and_counts_transfers(exports, tmp_path):
    memcpy_graph(tmp_path / "copies.onnx")
    assert count_memcpy(tmp_path / "copies.onnx") == 2
    manifest, _, (fused, _) = fused_and_plain(exports / "right")
    optimized = tmp_path / "optimized" / "fused.onnx"
    optimized.parent.mkdir()
    record = placement(fused, "cpu", 0, optimized)
    assert optimized.is_file()  # written by the session itself
    assert record["memcpy_nodes"] == 0 and set(record["nodes"]) == {"CPUExecutionProvider"}
    with_copies = {"models": {"m": {"placement": {"nodes": record["nodes"], "memcpy_nodes": 2}}}}
    [nodes, memcpy] = checks(with_copies, "cpu")
    assert nodes["passed"] and not memcpy["passed"] and "2 Memcpy" in memcpy["detail"]


class Replay:
    """A driver replaying given logits: stands for a session whose replay went wrong (no ONNX Runtime here)."""

    def __init__(self, logits: list[np.ndarray]):
        self.logits = iter(logits)

    def prefill(self, ids, mask):
        return next(self.logits)

    def decode_one_token(self, tokens):
        return next(self.logits)


def test_the_capture_comparison_fails_when_the_logits_differ():
    rng = np.random.default_rng(0)
    steps = [rng.standard_normal((3, 16)).astype(np.float16) for _ in range(5)]
    ids, mask = np.ones((3, 4), np.int64), np.ones((3, 4), np.int64)
    same = decode_side_by_side([Replay(steps), Replay(steps)], ids, mask, 4)
    assert logits_agree(same, "rel", 2e-2)["passed"]
    drifted = [s.copy() for s in steps]
    drifted[3][1, 5] += 1.0  # one logit of one decode step off
    result = logits_agree(decode_side_by_side([Replay(steps), Replay(drifted)], ids, mask, 4), "rel", 2e-2)
    assert not result["passed"] and result["max_error"] > 2e-2 and result["steps"] == 4
    drifted[3][1, 5] = np.nan
    result = logits_agree(decode_side_by_side([Replay(steps), Replay(drifted)], ids, mask, 4), "rel", 2e-2)
    assert not result["passed"] and result["max_error"] == float("inf")


class Finished:
    def __init__(self, reason: str, tokens: int, error: str | None = None):
        self.finish_reason, self.completion_tokens, self.error = reason, tokens, error


def test_the_engine_verdict_fails_a_short_an_errored_or_a_missing_row():
    full = [Finished("length", ENGINE_TOKENS) for _ in range(ENGINE_ROWS)]
    assert engine_verdict(full, 1.0)["passed"]
    assert engine_verdict([*full[:-1], Finished("stop", 3)], 1.0)["passed"]  # an end-of-sequence token
    assert not engine_verdict([*full[:-1], Finished("length", 3)], 1.0)["passed"]
    assert not engine_verdict([*full[:-1], Finished("error", 0, "boom")], 1.0)["passed"]
    assert not engine_verdict([*full[:-1], None], 1.0)["passed"]


GOOD_MODEL = {
    "parity": {"passed": True, "summary": "ok"},
    "fused_parity": {"passed": True, "summary": "ok"},
    "placement": {"nodes": {"CUDAExecutionProvider": 10}, "memcpy_nodes": 0},
    "greedy": {name: {"passed": True, "detail": "ok"} for name in BATCHES},
    "capture": {"passed": True, "max_error": 0.0, "kind": "rel", "tolerance": 2e-2, "captured": True},
    "engine": {"passed": True, "completion_tokens": [16] * 8, "tokens_per_s": 1.0, "errors": []},
    "tensorrt": {"passed": True, "max_error": 0.0},
}
BREAKS = {
    "plain graph vs PyTorch": lambda m: m["parity"].update(passed=False),
    "fused graph vs plain": lambda m: m["fused_parity"].update(passed=False),
    "every node on CUDAExecutionProvider": lambda m: m["placement"]["nodes"].update(CPUExecutionProvider=2),
    "no Memcpy node": lambda m: m["placement"].update(memcpy_nodes=1),
    "teacher-forced, batch 1": lambda m: m["greedy"]["batch 1"].update(passed=False),
    "CUDA graph replay": lambda m: m["capture"].update(passed=False),
    "engine serving": lambda m: m["engine"].update(passed=False),
    "TensorRT": lambda m: m["tensorrt"].update(passed=False),
    "timing ran": lambda m: m.setdefault("errors", {}).update(timing="RuntimeError: boom"),
}


@pytest.mark.parametrize("check", list(BREAKS))
def test_every_check_fails_on_a_bad_measurement(check):
    assert all(found["passed"] for found in checks({"models": {"m": copy.deepcopy(GOOD_MODEL)}}, "cuda"))
    model = copy.deepcopy(GOOD_MODEL)
    BREAKS[check](model)
    failed = [found["check"] for found in checks({"models": {"m": model}}, "cuda") if not found["passed"]]
    assert len(failed) == 1 and check in failed[0], failed


def test_selftest_refuses_to_replace_a_report_or_a_users_folder(tmp_path):
    report = Canary(tmp_path / "report.json")
    for args in (("--report", report.path), ()):  # the default report path, in the current folder
        cwd = tmp_path if not args else None
        default = Canary(tmp_path / "selftest-report.json") if not args else None
        result = starcast("selftest", "--provider", "cpu", "--small", *args, cwd=cwd)
        assert_one_line(result, 2, "the file exists", "--overwrite")
        assert default is None or default.intact()
    assert report.intact()
    user = tmp_path / "mine"
    (user / "test-checkpoint").mkdir(parents=True)
    weights = Canary(user / "test-checkpoint" / "model.safetensors")
    result = starcast("selftest", "--provider", "cpu", "--small", "--output", user, "--report", tmp_path / "r.json")
    assert_one_line(result, 2, "not empty and was not made by selftest")
    assert weights.intact() and not (tmp_path / "r.json").exists()
