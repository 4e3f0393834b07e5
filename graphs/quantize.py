"""Quantization of every linear layer's weight, in one of two ONNX Runtime kernels:

  int8, int4      MatMulNBits: block-wise symmetric weights (blocks of 32, 64 or 128), activations quantized
                  per block inside the kernel (accuracy_level 4); the block quantization kernel that ONNX
                  Runtime's MatMulNBitsQuantizer calls, applied here a weight (and a few columns) at a time.
  int8-dynamic    DynamicQuantizeMatMul: per-output-channel symmetric int8 weights, activations quantized per
                  tensor at run time; ONNX Runtime's int8 GEMM (CPU only). Faster than 8-bit MatMulNBits on
                  AVX2 CPUs, prefill above all, at a measured accuracy cost (benchmarks/RESULTS.md).

starcast makes the tied lm_head visible to the quantizers (the plain graph reads the embedding through
Gemm(transB=1), which they skip): the head gets its own MatMul weight, quantized, while the embedding lookup
stays float. Embeddings, LayerNorms and attention stay in float. The bias Add after each quantized MatMul folds
into the kernel's bias input. What quantization cost is measured by the pipeline (starcast/pipeline/accuracy.py).
Weights are read from the float graph's mapped weights file and written to the quantized graph's one by one
(graphs/tensor_store.py): a 15.5B model quantizes in the memory of its largest weight's few columns.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from starcast.contract import interfaces as io
from starcast.contract.errors import UserError
from starcast.contract.graph_files import (
    EXTERNAL_DATA_THRESHOLD,
    IR_VERSION,
    check_graph_file,
    external_entries,
    load_header,
    weights_file,
)
from starcast.graphs.tensor_store import TensorWriter, pieces_of, source_array

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


HEAD = "lm_head.weight_t"  # the tied head's weight as the quantizers see it: the embedding, transposed
COLUMNS = 16 << 20  # bytes of float weight quantized at a time: whole columns of MatMul's B
INLINE_BELOW = 1024


def untie_lm_head(proto: onnx.ModelProto) -> str | None:
    """Gemm(x, embedding, transB=1) -> MatMul(x, HEAD), so that the quantizer sees the head's weight; returns the
    embedding's name (HEAD is read from it, transposed), or None for an untied head."""
    graph = proto.graph
    embedding_name = next(
        (n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[1] == io.INPUT_IDS), None
    )
    for index, node in enumerate(graph.node):
        if node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] == embedding_name:
            graph.node.remove(node)
            matmul = onnx.helper.make_node("MatMul", [node.input[0], HEAD], list(node.output), name="lm_head/MatMul")
            graph.node.insert(index, matmul)
            return embedding_name
    return None


def check_options(quantization: str, block_size: int) -> int:
    """The bit width of `quantization` ("int8", "int4" or "int8-dynamic"), after checking the block size."""
    if quantization not in QUANTIZATIONS:
        raise UserError(f"unsupported quantization {quantization!r} (supported: {', '.join(QUANTIZATIONS)})")
    if block_size not in BLOCK_SIZES:
        raise UserError(f"unsupported block size {block_size} (supported: {', '.join(map(str, BLOCK_SIZES))})")
    return QUANTIZATIONS[quantization]


def quantize_graph(
    source: Path, target: Path, quantization: str, block_size: int, share_with: Path | None = None,
    accuracy_level: int = 4,
) -> dict[str, int]:
    """Quantize the graph at `source` into `target`, one weight at a time (read from the mapped weights file,
    quantized a few columns at a time, written to `target`'s weights file); tensors equal to `share_with`'s
    are stored once."""
    check_graph_file(source)  # its external data stays in its folder, before anything reads it
    proto = load_header(source)
    if any(node.op_type in KERNELS for node in proto.graph.node):
        raise UserError(f"{source}: already quantized")
    graph, folder = proto.graph, source.parent
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    embedding = untie_lm_head(proto)
    writer = TensorWriter(target, share_with)
    made: list[onnx.TensorProto] = []
    try:
        for index, node in enumerate(list(graph.node)):
            if node.op_type != "MatMul":
                continue
            name = node.input[1]
            if name == HEAD and embedding is not None:
                weight = source_array(initializers[embedding], folder).T
            elif name in initializers and len(initializers[name].dims) == 2:
                weight = source_array(initializers[name], folder)
            else:
                continue
            if quantization == DYNAMIC:
                kernel, tensors = dynamic_int8(node, name, weight, writer)
            else:
                bits = QUANTIZATIONS[quantization]
                kernel, tensors = matmul_nbits(node, name, weight, writer, bits, block_size, accuracy_level)
            made.extend(tensors)
            graph.node.remove(node)
            graph.node.insert(index, kernel)
        read = {name for node in graph.node for name in node.input}
        kept = [copy(tensor, folder, writer) for tensor in graph.initializer if tensor.name in read]
    finally:
        writer.close()
    del graph.initializer[:]
    graph.initializer.extend(kept + made)
    if not any(opset.domain == "com.microsoft" for opset in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    proto.ir_version = IR_VERSION
    folded = fold_biases(proto)
    inline_if_small(proto, target)
    onnx.save_model(proto, str(target))
    count = sum(node.op_type in KERNELS for node in graph.node)
    return {"quantized_matmuls": count, "biases_folded": folded}


def copy(tensor: onnx.TensorProto, folder: Path, writer: TensorWriter) -> onnx.TensorProto:
    """A float tensor the quantized graph keeps (embeddings, norms, biases): inline as it is, or streamed."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return tensor
    array = source_array(tensor, folder)
    return writer.write(tensor.name, tensor.data_type, tensor.dims, pieces_of(array))


def small(array: np.ndarray, name: str, writer: TensorWriter) -> onnx.TensorProto:
    if array.nbytes < INLINE_BELOW:
        return numpy_helper.from_array(array, name)
    return writer.write(name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape, [array])


def column_chunks(weight: np.ndarray) -> range:
    step = max(1, COLUMNS // max(1, weight.shape[0] * weight.itemsize))
    return range(0, weight.shape[1], step)


def matmul_nbits(
    node: onnx.NodeProto, name: str, weight: np.ndarray, writer: TensorWriter, bits: int, block_size: int,
    accuracy_level: int = 4,
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """MatMul(x, W) -> MatMulNBits(x, W_Q, scales): ONNX Runtime's own block quantization kernel (the one its
    MatMulNBitsQuantizer calls), symmetric, column by column: each block lies within one column."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    quantize = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    rows, cols = weight.shape
    k_blocks = -(-rows // block_size)
    blob = block_size * bits // 8
    kpack = 8 // bits
    scales = np.zeros((cols, k_blocks), dtype=weight.dtype)
    step = column_chunks(weight).step

    def packed() -> Iterator[np.ndarray]:
        for start in column_chunks(weight):
            part = np.ascontiguousarray(weight[:, start : start + step])
            width = part.shape[1]
            if k_blocks * block_size > rows:
                part = np.pad(part, ((0, k_blocks * block_size - rows), (0, 0)))
            out = np.zeros((width, k_blocks, blob), dtype=np.uint8)
            part_scales = np.zeros((width, k_blocks), dtype=weight.dtype)
            zero_points = np.zeros((width, -(-k_blocks // kpack)), dtype=np.uint8)
            quantize(out, part, part_scales, zero_points, block_size, width, rows, SETTINGS["symmetric"])
            scales[start : start + width] = part_scales
            yield out

    quantized = writer.write(f"{name}_Q{bits}", onnx.TensorProto.UINT8, (cols, k_blocks, blob), packed())
    scale_tensor = small(scales, f"{name}_scales", writer)
    kernel = onnx.helper.make_node(
        "MatMulNBits", [node.input[0], quantized.name, scale_tensor.name], list(node.output),
        name=f"{node.name}_Q{bits}", domain="com.microsoft", K=rows, N=cols, bits=bits, block_size=block_size,
        accuracy_level=accuracy_level,
    )  # fmt: skip
    return kernel, [quantized, scale_tensor]


def dynamic_int8(
    node: onnx.NodeProto, name: str, weight: np.ndarray, writer: TensorWriter
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """MatMul(x, W) -> DynamicQuantizeMatMul(x, round(W / scale), scale), scale = max |W| of each output / 127;
    two passes over the rows of W: the scales, then the int8 weights."""
    peak = np.zeros(weight.shape[1], dtype=np.float32)
    for rows in pieces_of(weight):
        peak = np.maximum(peak, np.abs(rows.astype(np.float32)).max(axis=0))
    scale = np.maximum(peak, np.finfo(np.float32).tiny) / 127.0
    pieces = (np.clip(np.round(rows / scale), -127, 127).astype(np.int8) for rows in pieces_of(weight))
    quantized = writer.write(f"{name}/int8", onnx.TensorProto.INT8, weight.shape, pieces)
    scale_tensor = small(scale.astype(weight.dtype), f"{name}/scale", writer)
    kernel = onnx.helper.make_node(
        "DynamicQuantizeMatMul", [node.input[0], quantized.name, scale_tensor.name], list(node.output),
        name=f"{node.name}/int8", domain="com.microsoft",
    )  # fmt: skip
    return kernel, [quantized, scale_tensor]


def inline_if_small(proto: onnx.ModelProto, target: Path) -> None:
    """A small quantized graph stays one file, as small float graphs do (contract/graph_files.py)."""
    own = weights_file(target.name)
    path = target.parent / own
    if not path.is_file() or path.stat().st_size >= EXTERNAL_DATA_THRESHOLD:
        return
    data = path.read_bytes()
    for tensor in proto.graph.initializer:
        entries = external_entries(tensor) if tensor.data_location == onnx.TensorProto.EXTERNAL else {}
        if entries.get("location") == own:
            offset, length = int(entries["offset"]), int(entries["length"])
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
            tensor.raw_data = data[offset : offset + length]
    path.unlink()


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
