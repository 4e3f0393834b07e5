"""Each fusion rule on a micro-graph of its own, the way onnxscript's ort_fusions/*_test.py test theirs: build
the ops the exporter emits, apply the rule, check the fused op is there and ONNX Runtime computes the same; and
a rule that does not match says which rule and why."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import save_hf_checkpoint
from onnx import TensorProto, helper, numpy_helper
from onnxscript.optimizer import optimize

from starcast.contract.config import GPTBigCodeConfig
from starcast.exporter.model import activation
from starcast.graphs.attention import attention_rules
from starcast.graphs.fuse import FusionError, apply, fuse
from starcast.graphs.gelu import gelu_bias_rules, gelu_rules
from starcast.graphs.last_logits import last_logits_rules
from starcast.graphs.static_cache import add_static_cache_inputs


def traced(module: torch.nn.Module, *inputs: torch.Tensor) -> ir.Model:
    """A micro-graph as the exporter writes one: TorchScript tracing at opset 17, constants folded."""
    path = Path_tmp() / "micro.onnx"
    names = [f"x{i}" for i in range(len(inputs))]
    torch.onnx.export(module, inputs, str(path), input_names=names, opset_version=17, dynamo=False)
    model = ir.load(path)
    optimize(model)  # as `fuse` does before its rules
    return model


def Path_tmp():  # noqa: N802 - a module-level scratch folder for traced micro-graphs
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="micro-"))


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.to_proto(model)
    proto.ir_version = 10
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


class Activation(torch.nn.Module):
    def __init__(self, name: str, bias: bool):
        super().__init__()
        self.name = name
        self.linear = torch.nn.Linear(8, 16, bias=bias)

    def forward(self, x):
        return activation(self.name, self.linear(x))


@pytest.mark.parametrize(
    "name, fused",
    [("gelu_pytorch_tanh", "FastGelu"), ("gelu_new", "FastGelu"), ("gelu_fast", "FastGelu"), ("gelu", "Gelu")],
)
def test_each_gelu_form_becomes_one_fused_op(name, fused):
    torch.manual_seed(0)
    model = traced(Activation(name, bias=False), torch.randn(2, 3, 8))
    feeds = {"x0": np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)}
    before = run(model, feeds)[0]
    assert gelu_rules.apply_to_model(model) == 1
    assert fused in ops(model) and "Tanh" not in ops(model) and "Erf" not in ops(model)
    np.testing.assert_allclose(run(model, feeds)[0], before, atol=1e-5)


@pytest.mark.parametrize("name, fused", [("gelu_pytorch_tanh", "FastGelu"), ("gelu", "BiasGelu")])
def test_the_c_fc_bias_folds_into_the_gelu(name, fused):
    torch.manual_seed(0)
    model = traced(Activation(name, bias=True), torch.randn(2, 3, 8))
    feeds = {"x0": np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)}
    before = run(model, feeds)[0]
    assert gelu_rules.apply_to_model(model) == 1
    assert gelu_bias_rules.apply_to_model(model) == 1
    assert fused in ops(model) and "Add" not in ops(model)
    np.testing.assert_allclose(run(model, feeds)[0], before, atol=1e-5)


def lm_head_graph(tied: bool) -> ir.Model:
    """hidden [b, s, 4] -> Reshape [b*s, 4] -> Gemm(transB=1) or MatMul -> Reshape [b, s, 6], as traced."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 4) if tied else (4, 6)).astype(np.float32)
    nodes = [
        helper.make_node("Reshape", ["hidden", "flat"], ["rows"]),
        helper.make_node("Gemm", ["rows", "W"], ["scores"], transB=1)
        if tied
        else helper.make_node("MatMul", ["rows", "W"], ["scores"]),
        helper.make_node("Reshape", ["scores", "shape"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["b", "s", 4]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 6])],
        [
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(np.array([-1, 4], np.int64), "flat"),
            numpy_helper.from_array(np.array([2, -1, 6], np.int64), "shape"),
        ],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))


@pytest.mark.parametrize("tied", [True, False])
def test_the_lm_head_runs_on_the_last_position_of_left_padded_rows(tied):
    model = lm_head_graph(tied)
    feeds = {
        "hidden": np.random.default_rng(2).standard_normal((2, 5, 4)).astype(np.float32),
        "position_ids": np.zeros((2, 5), np.int64),
        "seqlens_k": np.zeros(2, np.int32),
    }
    before = run(model, feeds)[0]
    assert last_logits_rules(model, "concat-cache", 4).apply_to_model(model) == 1
    after = run(model, feeds)[0]
    assert after.shape == (2, 1, 6)
    np.testing.assert_allclose(after, before[:, -1:], atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_the_lm_head_runs_on_the_last_real_token_of_right_padded_rows(tied):
    model = lm_head_graph(tied)
    positions = np.array([[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]], np.int64)  # row 0: 3 tokens, then padding
    feeds = {
        "hidden": np.random.default_rng(3).standard_normal((2, 5, 4)).astype(np.float32),
        "position_ids": positions,
        "seqlens_k": np.array([2, 4], np.int32),
    }
    before = run(model, feeds)[0]
    assert last_logits_rules(model, "static-cache", 4).apply_to_model(model) == 1
    assert "Shape" not in ops(model)  # no shape arithmetic on the CPU: CUDA graphs capture the step whole
    after = run(model, feeds)[0]
    np.testing.assert_allclose(after[:, 0], before[[0, 1], [2, 4]], atol=1e-5)
    one_row = {**feeds, "position_ids": np.array([[7], [9]]), "seqlens_k": np.array([7, 9], np.int32)}
    one_row["hidden"] = feeds["hidden"][:, :1]
    np.testing.assert_allclose(run(model, one_row)[0], run(lm_head_graph(tied), one_row)[0], atol=1e-5)


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    """The plain graph of a one-layer model, shape chains folded as `fuse` folds them first."""
    from starcast.pipeline.export import export

    root = tmp_path_factory.mktemp("one-layer")
    folder, _ = save_hf_checkpoint(root / "ckpt", n_layer=1)
    export(str(folder), root / "out", fuse_target=None)

    def load():
        model = ir.load(root / "out" / "model.onnx")
        optimize(model)
        return model, GPTBigCodeConfig.from_file(folder / "config.json")

    return load


def test_multi_query_attention_becomes_group_query_attention(one_layer):
    model, config = one_layer()
    layers = add_static_cache_inputs(model, config, "fp32")
    assert attention_rules(config, layers, "fp32").apply_to_model(model) == 1
    gqa = [node for node in model.graph if node.op_type == "GroupQueryAttention"]
    assert len(gqa) == 1 and gqa[0].attributes["kv_num_heads"].value == 1


def test_a_rule_that_does_not_match_names_itself_and_the_reason(one_layer):
    model, config = one_layer()
    layers = add_static_cache_inputs(model, config, "fp32")
    wrong = config.with_(n_head=2)  # the graph scales by 1/sqrt(8); a config with 2 heads expects 1/sqrt(16)
    with pytest.raises(FusionError) as failure:
        apply("attention", attention_rules(wrong, layers, "fp32"), model, 1, report=type("R", (), {"matches": {}})())
    message = str(failure.value)
    assert "matched 0 times" in message and "MultiQueryAttentionToGQA" in message
    assert "condition_failed: attention scale" in message


def test_fuse_reports_the_gelu_rule_when_a_layer_differs(one_layer):
    model, config = one_layer()
    next(node for node in model.graph if node.op_type == "Tanh").op_type = "Sigmoid"
    with pytest.raises(FusionError, match="pass gelu matched 0 times.*closest: rule"):
        fuse(model, config, "cpu", "fp32")


def test_onnx_micro_graphs_are_valid():
    onnx.checker.check_model(ir.to_proto(lm_head_graph(True)))
