"""Trace the reference model into one plain ONNX graph that serves the prompt step and every decode step.

The graph contract (also in the README and each export's `starcast.json`):
  inputs   input_ids int64 [batch, sequence], attention_mask int64 [batch, past+sequence],
           position_ids int64 [batch, sequence], past_key_values.{i}.key_value [batch, past, 2*head_dim]
           (multi-query; [batch, n_head, past, 2*head_dim] otherwise)
  outputs  logits [batch, sequence, vocab], present.{i}.key_value [batch, past+sequence, 2*head_dim]
Batch, sequence and past are dynamic. The prompt step passes past length 0.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from starcast.exporter.config import GPTBigCodeConfig
from starcast.exporter.model import GPTBigCode

OPSET = 17  # LayerNormalization is opset 17; TensorRT's parser and every recent ONNX Runtime read it
IR_VERSION = 10  # onnx 1.23 writes IR 14 by default, which ONNX Runtime 1.31 refuses
# Weights go to one external `model.onnx.data` file above this size: protobuf caps a message at 2 GiB, and
# ONNX Runtime maps external weights instead of holding a protobuf copy while it loads (tiny_starcoder fp32,
# measured: peak RSS 895 MiB with external data against 1,224 MiB inline). Small models stay one file.
EXTERNAL_DATA_THRESHOLD = 16 << 20


def input_names(config: GPTBigCodeConfig) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.key_value" for i in range(config.n_layer)
    ]


def output_names(config: GPTBigCodeConfig) -> list[str]:
    return ["logits"] + [f"present.{i}.key_value" for i in range(config.n_layer)]


def dynamic_axes(config: GPTBigCodeConfig) -> dict[str, dict[int, str]]:
    seq_axis = 1 if config.multi_query else 2
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    for i in range(config.n_layer):
        axes[f"past_key_values.{i}.key_value"] = {0: "batch", seq_axis: "past_sequence"}
        axes[f"present.{i}.key_value"] = {0: "batch", seq_axis: "total_sequence"}
    return axes


def sample_inputs(model: GPTBigCode, batch: int = 2, seq: int = 3, past: int = 4) -> tuple[torch.Tensor, ...]:
    """Inputs for tracing; every dynamic axis gets a distinct size above 1 so none is baked in as a constant."""
    cfg = model.config
    dtype = model.lm_head.weight.dtype
    ids = torch.zeros((batch, seq), dtype=torch.int64)
    mask = torch.ones((batch, past + seq), dtype=torch.int64)
    positions = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq)
    cache = [torch.zeros(cfg.cache_shape(batch, past), dtype=dtype) for _ in range(cfg.n_layer)]
    return (ids, mask, positions, *cache)


def export_onnx(model: GPTBigCode, path: Path) -> None:
    """Trace `model` to `path` (plus `model.onnx.data` when the weights are large)."""
    cfg = model.config
    scratch = Path(tempfile.mkdtemp(prefix="trace-", dir=path.parent))
    try:
        traced = scratch / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # The TorchScript exporter takes named dynamic axes directly; torch.export cannot express
            # "total = past + sequence" across varargs inputs, and 0-length past would be specialised away.
            torch.onnx.export(
                model,
                sample_inputs(model),
                str(traced),
                input_names=input_names(cfg),
                output_names=output_names(cfg),
                dynamic_axes=dynamic_axes(cfg),
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(str(traced), load_external_data=True)
        if cfg.tie_word_embeddings:
            share_tied_embedding(proto)
        proto.ir_version = IR_VERSION
        proto.producer_name = "starcast"
        proto.graph.name = "gpt_bigcode"
        save_model(proto, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def share_tied_embedding(proto: onnx.ModelProto) -> None:
    """Make the lm_head read the token embedding itself instead of a transposed copy.

    The exporter turns `Linear` into MatMul against a constant-folded transposed weight; for a tied head that
    stores the largest matrix twice. Gemm(transB=1) reads the (vocab, d) embedding as it is.
    """
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    embedding = next(n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    head = next(
        n
        for n in reversed(graph.node)
        if n.op_type == "MatMul"
        and n.input[1] in initializers
        and list(initializers[n.input[1]].dims)[::-1] == list(initializers[embedding].dims)
    )
    copy = head.input[1]
    gemm = onnx.helper.make_node("Gemm", [head.input[0], embedding], list(head.output), name="lm_head/Gemm", transB=1)
    position = list(graph.node).index(head)
    graph.node.remove(head)
    graph.node.insert(position, gemm)
    if not any(copy in n.input for n in graph.node):
        graph.initializer.remove(initializers[copy])


def save_model(proto: onnx.ModelProto, path: Path) -> None:
    """Save one `.onnx` file, with all weights in one `.onnx.data` file beside it when they are large."""
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    if weight_bytes < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(path))
        return
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
