"""Weight-only block-wise int8/int4 quantization of every linear layer into ONNX Runtime's MatMulNBits.

ONNX Runtime's own quantizer (`MatMulNBitsQuantizer`) does the work; starcast only makes the tied lm_head
visible to it: the plain graph reads the embedding through Gemm(transB=1), which the quantizer skips, so the
head gets its own MatMul weight, quantized, while the embedding lookup stays float. Embeddings, LayerNorms and
attention stay in float. What quantization cost is measured by the pipeline (starcast/pipeline/accuracy.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from starcast.contract import interfaces as io
from starcast.contract.errors import UserError
from starcast.contract.graph_files import IR_VERSION, save_model

QUANTIZATIONS = {"int8": 8, "int4": 4}
BLOCK_SIZES = (32, 64, 128)
SETTINGS = {"format": "MatMulNBits", "symmetric": True, "accuracy_level": 4}


def untie_lm_head(proto: onnx.ModelProto) -> None:
    """Gemm(x, embedding, transB=1) -> MatMul(x, embedding^T), so that the quantizer sees the head's weight."""
    graph = proto.graph
    embedding_name = next(
        (n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[1] == io.INPUT_IDS), None
    )
    for index, node in enumerate(graph.node):
        if node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] == embedding_name:
            embedding = next(init for init in graph.initializer if init.name == embedding_name)
            head = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(embedding).T), "lm_head.weight_t")
            graph.initializer.append(head)
            graph.node.remove(node)
            matmul = onnx.helper.make_node(
                "MatMul", [node.input[0], head.name], list(node.output), name="lm_head/MatMul"
            )
            graph.node.insert(index, matmul)
            return


def check_options(quantization: str, block_size: int) -> int:
    """The bit width of `quantization` ("int8" or "int4"), after checking the block size."""
    if quantization not in QUANTIZATIONS:
        raise UserError(f"unsupported quantization {quantization!r} (supported: {', '.join(QUANTIZATIONS)})")
    if block_size not in BLOCK_SIZES:
        raise UserError(f"unsupported block size {block_size} (supported: {', '.join(map(str, BLOCK_SIZES))})")
    return QUANTIZATIONS[quantization]


def quantize_graph(
    source: Path, target: Path, bits: int, block_size: int, share_with: Path | None = None
) -> dict[str, int]:
    """Quantize the graph at `source` into `target`; tensors equal to `share_with`'s are stored once."""
    import logging

    from onnxruntime.quantization import matmul_nbits_quantizer
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    matmul_nbits_quantizer.logger.setLevel(logging.WARNING)  # it logs every node it looks at

    proto = onnx.load(str(source), load_external_data=True)
    if any(node.op_type == "MatMulNBits" for node in proto.graph.node):
        raise UserError(f"{source}: already quantized")
    untie_lm_head(proto)
    options = dict(
        block_size=block_size,
        is_symmetric=SETTINGS["symmetric"],
        accuracy_level=SETTINGS["accuracy_level"],
        bits=bits,
        op_types_to_quantize=("MatMul",),
    )
    quantizer = MatMulNBitsQuantizer(proto, algo_config=DefaultWeightOnlyQuantConfig(**options), **options)
    quantizer.process()
    quantized = quantizer.model.model
    quantized.ir_version = IR_VERSION
    folded = fold_bias_into_matmul_nbits(quantized)
    count = sum(node.op_type == "MatMulNBits" for node in quantized.graph.node)
    save_model(quantized, target, share_with=share_with)
    return {"matmul_nbits": count, "biases_folded": folded}


def fold_bias_into_matmul_nbits(proto: onnx.ModelProto) -> int:
    """Add(MatMulNBits(x), bias) -> MatMulNBits(x, bias=bias) (its sixth input): one node less per biased layer."""
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {value.name for value in graph.output}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "MatMulNBits" or len(node.input) > 5 or node.output[0] in outputs:
            continue
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        bias = next((name for name in add.input if name != node.output[0]), None)
        n = next(a.i for a in node.attribute if a.name == "N")
        if bias not in initializers or list(initializers[bias].dims) != [n]:
            continue
        node.input.extend([""] * (5 - len(node.input)) + [bias])  # zero points and g_idx stay absent
        node.output[0] = add.output[0]
        graph.node.remove(add)
        folded += 1
    return folded
