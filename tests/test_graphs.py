"""The fused graphs compute what the plain graph computes, and the passes fuse every layer or fail loudly."""

from __future__ import annotations

import json

import onnx
import pytest
from conftest import VARIANTS, assert_one_line, save_hf_checkpoint, starcast

from starcast.contract.config import GPTBigCodeConfig
from starcast.contract.errors import UserError
from starcast.contract.manifest import file_hashes
from starcast.pipeline.derive import optimize_export
from starcast.pipeline.export import export
from starcast.pipeline.proof import greedy_side_by_side as side_by_side

DECODE_STEPS = 32


def greedy_side_by_side(folder, interface, dtype, lengths=(7, 4, 1)):
    """Prompt + 32 greedy steps through plain and fused graph; returns the max error (relative for fp16)."""
    config = GPTBigCodeConfig.from_file(folder / "config.json")
    report = side_by_side(
        (folder / "model.onnx", "concat-cache"), (folder / "fused.onnx", interface), config, dtype, "fused",
        steps=DECODE_STEPS, lengths=lengths,
    )  # fmt: skip
    assert report.same_tokens, "greedy tokens differ"
    return report.max_error


@pytest.fixture(scope="module")
def plain_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    exports = {}
    for variant, overrides in VARIANTS.items():
        folder, _ = save_hf_checkpoint(root / f"ckpt-{variant}", **overrides)
        export(str(folder), root / variant, fuse_target=None)
        exports[variant] = root / variant
    return exports


@pytest.mark.parametrize("target", ["cpu", "cuda"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_matches_plain_fp32(plain_exports, tmp_path, variant, target):
    manifest = optimize_export(plain_exports[variant], tmp_path / "fused", target, overwrite=False)
    fused = manifest.fused
    n_layer = manifest.config.n_layer
    ops = fused.report["histogram_after"]
    assert ops["SkipLayerNormalization"] == 2 * n_layer + 1
    if "relu" not in variant:
        assert ops.get("FastGelu", 0) + ops.get("BiasGelu", 0) == n_layer
    if target == "cuda":
        assert ops["GroupQueryAttention"] == n_layer and "Softmax" not in ops
    else:
        assert "GroupQueryAttention" not in ops and ops["Softmax"] == n_layer
    assert fused.report["nodes"]["after"] < fused.report["nodes"]["before"]
    assert greedy_side_by_side(tmp_path / "fused", fused.interface, "fp32") < 1e-4


@pytest.mark.parametrize("target", ["cpu", "cuda"])
@pytest.mark.parametrize("multi_query", [True, False])
def test_fused_matches_plain_fp16(tmp_path, target, multi_query):
    folder, _ = save_hf_checkpoint(tmp_path / "ckpt", multi_query=multi_query)
    manifest = export(str(folder), tmp_path / "out", dtype="fp16", fuse_target=target)
    assert greedy_side_by_side(tmp_path / "out", manifest.fused.interface, "fp16") < 2e-2


def test_fused_interface_recorded_in_manifest(plain_exports, tmp_path):
    manifest = optimize_export(plain_exports["mq-tanh-tied"], tmp_path / "fused", "cuda", overwrite=False)
    recorded = json.loads((tmp_path / "fused" / "starcast.json").read_text())["fused"]
    assert recorded == json.loads(json.dumps(manifest.fused.to_json()))
    inputs = {v["name"]: v for v in recorded["io"]["inputs"]}
    assert inputs["seqlens_k"]["dtype"] == "int32" and inputs["total_sequence_length"]["shape"] == []
    assert inputs["past_key_values.0.key"]["shape"] == ["batch", 1, "max_sequence_length", 8]
    assert "attention_mask" not in inputs and "past_key_values.0.key_value" not in inputs
    outputs = {v["name"] for v in recorded["io"]["outputs"]}
    assert {"logits", "present.0.key", "present.1.value"} <= outputs
    assert recorded["nodes_per_layer"]["after"] < recorded["nodes_per_layer"]["before"]
    proto = onnx.load(str(tmp_path / "fused" / "fused.onnx"))
    gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}["kv_num_heads"] == 1


def test_optimize_refuses_fused_and_non_exports_without_touching_them(plain_exports, tmp_path, checkpoint):
    source = plain_exports["mq-tanh-tied"]
    before = file_hashes(source)
    optimize_export(source, tmp_path / "fused", "cpu", overwrite=False)
    assert file_hashes(source) == before
    with pytest.raises(UserError, match="already has a fused graph"):
        optimize_export(tmp_path / "fused", tmp_path / "again", "cpu", overwrite=False)
    with pytest.raises(UserError, match="not a starcast export"):
        optimize_export(checkpoint[0], tmp_path / "x", "cpu", overwrite=False)
    assert not (tmp_path / "again").exists() and not (tmp_path / "x").exists()


def test_a_graph_that_does_not_match_is_an_error(plain_exports, tmp_path):
    import onnx_ir as ir

    from starcast.graphs.fuse import FusionError, fuse

    config = GPTBigCodeConfig.from_file(plain_exports["mq-tanh-tied"] / "config.json")
    model = ir.load(plain_exports["mq-tanh-tied"] / "model.onnx")
    tanh = next(node for node in model.graph if node.op_type == "Tanh")
    tanh.op_type = "Sigmoid"  # one layer's GELU no longer has the pattern's shape
    with pytest.raises(FusionError, match="matched 1 times, expected 2"):
        fuse(model, config, "cpu", "fp32")


def test_optimize_cli_prints_node_counts_and_refuses_fp32_for_cuda(plain_exports, tmp_path):
    result = starcast("optimize", plain_exports["mq-tanh-tied"], tmp_path / "f", "--target", "cpu")
    assert result.returncode == 0, result.stderr
    assert "per layer" in result.stdout and "FastGelu" in result.stdout
    assert "fused parity ok" in result.stderr
    refused = starcast("optimize", plain_exports["mq-tanh-tied"], tmp_path / "g", "--target", "cuda")
    assert_one_line(refused, 2, "--dtype fp16")
    assert not (tmp_path / "g").exists()
