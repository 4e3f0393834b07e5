"""The GPU path, proven where it can be without a GPU: every config variant fuses for both targets in fp16 and
fp32, a batch in which every row is padded generates what transformers generates through every graph, fp32
static-cache graphs are refused for CUDA, and sessions are created with the options asked for."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import assert_one_line, save_hf_checkpoint, starcast

from starcast.contract.errors import UserError
from starcast.pipeline.derive import optimize_export
from starcast.pipeline.export import export
from starcast.runtime.generator import Generator
from starcast.runtime.session import SessionOptions, available_cores, create_session, cuda_provider_options

SOFTMAX_FLAGS = list(itertools.product([True, False], repeat=2))  # attention_softmax_in_fp32, scale_..._in_fp32


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Plain exports keyed by (flags, multi_query, activation, dtype), made on first use."""
    root = tmp_path_factory.mktemp("gpu-path")
    made = {}

    def get(softmax_fp32: bool, scale_fp32: bool, multi_query: bool, activation: str, dtype: str):
        key = (softmax_fp32, scale_fp32, multi_query, activation, dtype)
        if key not in made:
            name = "-".join(map(str, key))
            folder, _ = save_hf_checkpoint(
                root / f"ckpt-{name}", multi_query=multi_query, activation_function=activation,
                attention_softmax_in_fp32=softmax_fp32, scale_attention_softmax_in_fp32=scale_fp32,
            )  # fmt: skip
            made[key] = root / f"plain-{name}"
            export(str(folder), made[key], dtype=dtype, fuse_target=None)
        return made[key]

    return get


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("multi_query", [True, False])
@pytest.mark.parametrize("softmax_fp32, scale_fp32", SOFTMAX_FLAGS)
def test_every_softmax_flag_combination_fuses_for_both_targets(
    plain, tmp_path, softmax_fp32, scale_fp32, multi_query, dtype
):
    source = plain(softmax_fp32, scale_fp32, multi_query, "gelu_pytorch_tanh", dtype)
    for target in ("cpu", "cuda"):
        manifest = optimize_export(source, tmp_path / target, target, overwrite=False)  # proves fused == plain
        assert manifest.fused.parity.passed and manifest.fused.parity.measured["same_tokens"]
        ops = manifest.fused.report["histogram_after"]
        assert ops.get("GroupQueryAttention", 0) == (2 if target == "cuda" else 0)


@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu", "relu"])
def test_every_activation_fuses_in_fp16_for_both_targets(plain, tmp_path, activation):
    source = plain(True, True, True, activation, "fp16")
    for target in ("cpu", "cuda"):
        manifest = optimize_export(source, tmp_path / target, target, overwrite=False)
        assert manifest.fused.parity.passed


def all_rows_padded(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch padded to a fixed width longer than every prompt (tokenizers' padding="max_length")."""
    rng = np.random.default_rng(5)
    lengths, width = [6, 3, 1], 9
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), np.int64)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = rng.integers(1, vocab, size=length)
        mask[row, width - length :] = 1
    return ids, mask


@pytest.mark.parametrize("multi_query", [True, False])
def test_a_batch_where_every_row_is_padded_equals_transformers_through_every_graph(tmp_path, multi_query):
    folder, hf = save_hf_checkpoint(tmp_path / "ckpt", multi_query=multi_query)
    ids, mask = all_rows_padded(96)
    with torch.no_grad():
        expected = hf.generate(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=24, do_sample=False,
            pad_token_id=0,
        ).numpy()  # fmt: skip
    for target in ("cpu", "cuda"):
        export(str(folder), tmp_path / target, fuse_target=target)
        for graph in ("plain", "fused"):
            out = Generator.from_pretrained(tmp_path / target, graph=graph).generate(ids, mask, max_new_tokens=24)
            np.testing.assert_array_equal(out, expected, err_msg=f"{target} {graph}")


def test_fp32_static_cache_graphs_are_refused_for_cuda(tmp_path):
    folder, _ = save_hf_checkpoint(tmp_path / "ckpt")
    assert_one_line(starcast("export", folder, tmp_path / "out", "--target", "cuda"), 2, "--dtype fp16")
    assert not (tmp_path / "out").exists()
    export(str(folder), tmp_path / "test-only", fuse_target="cuda")  # the Python API makes one, for tests on CPU
    with pytest.raises(UserError, match="fp16 and bf16 only"):
        Generator.from_pretrained(tmp_path / "test-only", provider="cuda", graph="fused")


def test_the_graph_that_runs_is_named(tmp_path):
    folder, _ = save_hf_checkpoint(tmp_path / "ckpt")
    export(str(folder), tmp_path / "out", fuse_target="cpu")
    result = starcast("generate", tmp_path / "out", "--ids", "1,2", "--max-new-tokens", "2", "--graph", "plain")
    assert result.returncode == 0 and "[graph] plain graph model.onnx" in result.stderr, result.stderr
    result = starcast("generate", tmp_path / "out", "--ids", "1,2", "--max-new-tokens", "2")
    assert "[graph] fused graph fused.onnx (cpu, concat-cache)" in result.stderr


def test_sessions_are_created_with_the_options_asked_for(tmp_path):
    folder, _ = save_hf_checkpoint(tmp_path / "ckpt")
    export(str(folder), tmp_path / "out", fuse_target=None)
    session = create_session(tmp_path / "out" / "model.onnx", SessionOptions("cpu", threads=10_000, spinning=False))
    options = session.get_session_options()
    assert options.intra_op_num_threads == available_cores()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    cuda = cuda_provider_options(SessionOptions("cuda", device_id=3, cuda_graph=True))
    assert cuda == {
        "device_id": "3",
        "arena_extend_strategy": "kSameAsRequested",
        "enable_skip_layer_norm_strict_mode": "1",
        "use_tf32": "0",
        "enable_cuda_graph": "1",
    }
    with pytest.raises(UserError, match="device"):
        SessionOptions("cuda", device_id=-1)


def test_selftest_runs_its_whole_flow_on_the_cpu_and_refuses_cuda_where_there_is_none(tmp_path):
    import json

    from starcast.runtime.session import cuda_problem

    report_path = tmp_path / "report.json"
    report_path.write_text("an earlier report")
    result = starcast("selftest", "--provider", "cpu", "--small", "--report", report_path, "--overwrite",
                      "--output", tmp_path / "work", timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["passed"] and len(report["checks"]) == 20 and all(c["passed"] for c in report["checks"])
    names = " | ".join(check["check"] for check in report["checks"])
    expected = ("plain graph vs PyTorch", "fused graph vs plain", "every node on", "no Memcpy node",
                "teacher-forced, a 1-token row", "CUDA graph replay vs uncaptured", "engine serving 8 rows")
    for what in expected:
        assert names.count(what) == 2, what  # both models
    timings = report["models"]["test"]["decode_ms"]
    assert set(timings) == {"fused", "plain", "transformers eager"}  # no CUDA graph timing on the CPU (#27)
    assert all(value > 0 for value in timings.values())
    again = starcast("selftest", "--provider", "cpu", "--small", "--report", tmp_path / "r2.json",
                     "--output", tmp_path / "work", timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr  # a folder an earlier selftest made may be reused
    if cuda_problem() is None:
        return  # a machine with a usable GPU: nothing to refuse
    assert_one_line(starcast("selftest", "--report", tmp_path / "cuda.json"), 2, "CUDA cannot be loaded here")
