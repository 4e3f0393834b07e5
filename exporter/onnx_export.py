"""Trace the reference model into one plain ONNX graph that serves the prompt step and every decode step.

The graph has the concat-cache interface (`starcast/contract/interfaces.py`) with logits for every position.
Batch, sequence and past are dynamic. The prompt step passes past length 0.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from starcast.contract import interfaces as io
from starcast.contract.config import GPTBigCodeConfig
from starcast.contract.graph_files import IR_VERSION, OPSET, save_model
from starcast.exporter.model import GPTBigCode


def dynamic_axes(config: GPTBigCodeConfig) -> dict[str, dict[int, str]]:
    seq_axis = 1 if config.multi_query else 2
    axes = {
        io.INPUT_IDS: {0: "batch", 1: "sequence"},
        io.ATTENTION_MASK: {0: "batch", 1: "total_sequence"},
        io.POSITION_IDS: {0: "batch", 1: "sequence"},
        io.LOGITS: {0: "batch", 1: "sequence"},
    }
    for past, present in io.merged_cache_names(config.n_layer):
        axes[past] = {0: "batch", seq_axis: "past_sequence"}
        axes[present] = {0: "batch", seq_axis: "total_sequence"}
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
                input_names=io.concat_inputs(cfg.n_layer),
                output_names=io.concat_outputs(cfg.n_layer),
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
    embedding = next(n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[1] == io.INPUT_IDS)
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
