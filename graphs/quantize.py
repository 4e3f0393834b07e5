"""Quantization of every linear layer's weight, in one of two ONNX Runtime kernels:

  int8, int4      MatMulNBits: block-wise symmetric weights (blocks of 32, 64 or 128), activations quantized
                  per block inside the kernel (accuracy_level 4); ONNX Runtime's own MatMulNBitsQuantizer.
  int8-dynamic    DynamicQuantizeMatMul: per-output-channel symmetric int8 weights, activations quantized per
                  tensor at run time; ONNX Runtime's int8 GEMM (CPU only). Faster than 8-bit MatMulNBits on
                  AVX2 CPUs, prefill above all, at a measured accuracy cost (benchmarks/RESULTS.md).

starcast makes the tied lm_head visible to the quantizers (the plain graph reads the embedding through
Gemm(transB=1), which they skip): the head gets its own MatMul weight, quantized, while the embedding lookup
stays float. Embeddings, LayerNorms and attention stay in float. The bias Add after each quantized MatMul folds
into the kernel's bias input. What quantization cost is measured by the pipeline (starcast/pipeline/accuracy.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from starcast.contract import interfaces as io
from starcast.contract.errors import UserError
from starcast.contract.graph_files import IR_VERSION, check_graph_file, save_model

QUANTIZATIONS = {"int8": 8, "int4": 4, "int8-dynamic": 8}
BLOCK_SIZES = (32, 64, 128)
SETTINGS = {"format": "MatMulNBits", "symmetric": True, "accuracy_level": 4}
DYNAMIC = "int8-dynamic"
KERNELS = {"MatMulNBits": 5, "DynamicQuantizeMatMul": 4}  # op type -> the index of its bias input


def settings(quantization: str) -> dict:
    """What the manifest records about the kernel a quantization uses."""
    if quantization == DYNAMIC:
        return {"format": "DynamicQuantizeMatMul", "symmetric": True, "per_channel": True}
    return dict(SETTINGS)


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
    """The bit width of `quantization` ("int8", "int4" or "int8-dynamic"), after checking the block size."""
    if quantization not in QUANTIZATIONS:
        raise UserError(f"unsupported quantization {quantization!r} (supported: {', '.join(QUANTIZATIONS)})")
    if block_size not in BLOCK_SIZES:
        raise UserError(f"unsupported block size {block_size} (supported: {', '.join(map(str, BLOCK_SIZES))})")
    return QUANTIZATIONS[quantization]


def quantize_graph(
    source: Path, target: Path, quantization: str, block_size: int, share_with: Path | None = None
) -> dict[str, int]:
    """Quantize the graph at `source` into `target`; tensors equal to `share_with`'s are stored once."""
    check_graph_file(source)  # its external data stays in its folder, before onnx reads any of it
    proto = onnx.load(str(source), load_external_data=True)
    if any(node.op_type in KERNELS for node in proto.graph.node):
        raise UserError(f"{source}: already quantized")
    untie_lm_head(proto)
    if quantization == DYNAMIC:
        quantized = dynamic_int8(proto)
    else:
        quantized = matmul_nbits(proto, QUANTIZATIONS[quantization], block_size)
    quantized.ir_version = IR_VERSION
    folded = fold_biases(quantized)
    count = sum(node.op_type in KERNELS for node in quantized.graph.node)
    save_model(quantized, target, share_with=share_with)
    return {"quantized_matmuls": count, "biases_folded": folded}


def matmul_nbits(proto: onnx.ModelProto, bits: int, block_size: int) -> onnx.ModelProto:
    import logging

    from onnxruntime.quantization import matmul_nbits_quantizer
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    matmul_nbits_quantizer.logger.setLevel(logging.WARNING)  # it logs every node it looks at
    options = dict(
        block_size=block_size,
        is_symmetric=SETTINGS["symmetric"],
        accuracy_level=SETTINGS["accuracy_level"],
        bits=bits,
        op_types_to_quantize=("MatMul",),
    )
    quantizer = MatMulNBitsQuantizer(proto, algo_config=DefaultWeightOnlyQuantConfig(**options), **options)
    quantizer.process()
    return quantizer.model.model


def dynamic_int8(proto: onnx.ModelProto) -> onnx.ModelProto:
    """MatMul(x, W) -> DynamicQuantizeMatMul(x, round(W / scale), scale), scale = max |W| of each output / 127."""
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    for index, node in enumerate(list(graph.node)):
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if weight.ndim != 2:
            continue
        scale = np.maximum(np.abs(weight.astype(np.float32)).max(axis=0), np.finfo(np.float32).tiny) / 127.0
        quantized = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
        name = node.input[1]
        graph.initializer.remove(initializers[name])
        graph.initializer.extend([
            numpy_helper.from_array(quantized, f"{name}/int8"),
            numpy_helper.from_array(scale.astype(weight.dtype), f"{name}/scale"),
        ])  # fmt: skip
        kernel = onnx.helper.make_node(
            "DynamicQuantizeMatMul", [node.input[0], f"{name}/int8", f"{name}/scale"], list(node.output),
            name=f"{node.name}/int8", domain="com.microsoft",
        )  # fmt: skip
        graph.node.remove(node)
        graph.node.insert(index, kernel)
    if not any(opset.domain == "com.microsoft" for opset in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return proto


def fold_biases(proto: onnx.ModelProto) -> int:
    """Add(kernel(x), bias) -> kernel(x, bias=bias), for MatMulNBits and DynamicQuantizeMatMul: one node less
    per biased layer."""
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {value.name for value in graph.output}
    folded = 0
    for node in list(graph.node):
        position = KERNELS.get(node.op_type)
        if position is None or len(node.input) > position or node.output[0] in outputs:
            continue
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        bias = next((name for name in add.input if name != node.output[0]), None)
        if bias not in initializers or list(initializers[bias].dims) != [output_size(node, initializers)]:
            continue
        node.input.extend([""] * (position - len(node.input)) + [bias])  # optional inputs between stay absent
        node.output[0] = add.output[0]
        graph.node.remove(add)
        folded += 1
    return folded


def output_size(node: onnx.NodeProto, initializers: dict) -> int:
    if node.op_type == "MatMulNBits":
        return next(a.i for a in node.attribute if a.name == "N")
    return int(initializers[node.input[2]].dims[0])  # DynamicQuantizeMatMul: one scale per output
