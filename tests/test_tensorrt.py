"""TensorRT: the readiness check and the missing-TensorRT errors run everywhere; engine tests where it imports."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from conftest import left_padded_batch, save_hf_checkpoint, starcast
from onnx import TensorProto, helper

from starcast.contract.config import GPTBigCodeConfig
from starcast.contract.errors import UserError
from starcast.pipeline.export import export
from starcast.runtime.tensorrt.builder import Limits
from starcast.runtime.tensorrt.ready import check_trt_ready

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    folder, _ = save_hf_checkpoint(root / "ckpt")
    export(str(folder), root / "out", fuse_target="cuda")
    return root


def test_plain_graph_is_trt_ready_and_fused_graph_is_not(exported):
    plain = check_trt_ready(exported / "out" / "model.onnx")
    assert plain.ready, plain.lines()
    fused = check_trt_ready(exported / "out" / "fused.onnx")
    assert not fused.ready
    assert any("com.microsoft::GroupQueryAttention" in p for p in fused.problems)
    result = starcast("check", "--trt-ready", exported / "out")
    assert result.returncode == 0 and result.stdout.startswith("ready for TensorRT")


def test_control_flow_and_unknown_axes_are_reported(tmp_path):
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y1"])],
        "then",
        [],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["n"])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y2"])],
        "else",
        [],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["n"])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "g",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    report = check_trt_ready(tmp_path / "m.onnx")
    assert not report.ready
    assert any("control flow: If" in p for p in report.problems)
    assert any("dynamic axes no optimization profile covers: n" in p for p in report.problems)


def test_profiles_cover_prompt_and_decode():
    config = GPTBigCodeConfig(vocab_size=96, n_positions=128, n_embd=32, n_layer=2, n_head=4)
    profiles = Limits(max_batch=4, max_prompt=32, max_length=100).profiles(config)
    prompt, decode = profiles["prompt"], profiles["decode"]
    assert prompt["input_ids"] == [[1, 1], [4, 32], [4, 32]]
    assert prompt["past_key_values.0.key_value"] == [[1, 0, 16], [4, 0, 16], [4, 0, 16]]
    assert decode["input_ids"] == [[1, 1], [4, 1], [4, 1]]
    assert decode["attention_mask"][2] == [4, 100] and decode["past_key_values.1.key_value"][2] == [4, 99, 16]
    with pytest.raises(UserError, match="max prompt"):
        Limits(1, 200, 100).check(config)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_format_trt_without_tensorrt_fails_before_any_work(exported, tmp_path):
    result = starcast("export", exported / "ckpt", tmp_path / "out", "--format", "trt")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "starcast: error: TensorRT needs starcast's 'tensorrt' extra (tensorrt is not installed): "
        "in a starcast clone, pip install '.[tensorrt]'"
    ]
    assert not (tmp_path / "out").exists()
    assert starcast("build-engine", exported / "out").returncode == 2
    assert not (exported / "out" / "trt").exists()


@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installable on this machine (see README)")
def test_engine_greedy_ids_match_onnxruntime(exported):  # pragma: no cover - needs TensorRT and a GPU
    from starcast.runtime.generator import Generator

    result = starcast(
        "build-engine",
        exported / "out",
        "--max-batch",
        "2",
        "--max-prompt",
        "16",
        "--max-length",
        "64",
    )
    assert result.returncode == 0, result.stderr
    ids, mask = left_padded_batch(96, [7, 3])
    expected = Generator.from_pretrained(exported / "out", graph="plain").generate(ids, mask, max_new_tokens=20)
    ours = Generator.from_pretrained(exported / "out", provider="tensorrt", max_length=64)
    np.testing.assert_array_equal(ours.generate(ids, mask, max_new_tokens=20), expected)
