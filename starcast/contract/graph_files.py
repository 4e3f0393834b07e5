"""An ONNX graph file from a folder, checked before anything loads it: that it is ONNX, and that every
external-data location inside it names a file in the folder, with an offset and length that fit that file."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

from starcast.contract.errors import UserError
from starcast.contract.paths import confine, os_reason

OPSET = 17  # LayerNormalization is opset 17; TensorRT's parser and every recent ONNX Runtime read it
IR_VERSION = 10  # onnx 1.23 writes IR 14 by default, which ONNX Runtime 1.31 refuses
# Weights go to external data above this size: protobuf caps a message at 2 GiB, and ONNX Runtime maps external
# weights instead of holding a protobuf copy while it loads (tiny_starcoder fp32, measured: peak RSS 895 MiB with
# external data against 1,224 MiB inline). Small models stay one file.
EXTERNAL_DATA_THRESHOLD = 16 << 20
# The export folder: both graphs side by side, so that the fused graph can read the plain graph's weights file
# (ONNX Runtime refuses external data outside the graph's own folder).
PLAIN_MODEL = "model.onnx"
FUSED_MODEL = "fused.onnx"


def weights_file(model_file: str) -> str:
    """Where a graph's own external weights go: `model.onnx` -> `model.onnx.data`."""
    return model_file + ".data"


def load_header(path: Path) -> onnx.ModelProto:
    """The graph without its external weights; a file that is not ONNX is a one-line error."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({os_reason(exc)})") from None
    except Exception as exc:  # protobuf's DecodeError and friends
        raise UserError(f"{path}: not an ONNX model ({type(exc).__name__})") from None


def all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and constant attributes of the graph and of every subgraph."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield attribute.sparse_tensor.values
                yield attribute.sparse_tensor.indices
            for subgraph in [attribute.g] if attribute.HasField("g") else []:
                yield from all_tensors(subgraph)
            for subgraph in attribute.graphs:
                yield from all_tensors(subgraph)


def external_data_files(proto: onnx.ModelProto, model_path: Path) -> set[Path]:
    """The files the graph's external data lives in, each confined to the graph's own folder (ONNX Runtime's
    rule too) and each tensor's span checked against its file's size."""
    where = f"{model_path}: external data"
    folder = model_path.parent
    sizes: dict[Path, int] = {}
    for tensor in all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries: dict[str, Any] = {entry.key: entry.value for entry in tensor.external_data}
        path = confine(folder, entries.get("location"), where)
        if path not in sizes:
            try:
                sizes[path] = path.stat().st_size
            except OSError as exc:
                raise UserError(f"{where}: {entries['location']} ({os_reason(exc)})") from None
        try:
            offset = int(entries.get("offset", 0))
            length = int(entries.get("length", sizes[path] - offset))  # no length: to the end of the file
        except ValueError:
            raise UserError(f"{where}: tensor {tensor.name!r} has a non-integer offset or length") from None
        if offset < 0 or length < 0 or offset + length > sizes[path]:
            raise UserError(
                f"{where}: tensor {tensor.name!r} spans bytes {offset}..{offset + length} of {entries['location']}, "
                f"which has {sizes[path]}"
            )
    return set(sizes)


def check_graph_file(model_path: Path) -> onnx.ModelProto:
    """The graph's header, after checking that all its external data is inside the graph's folder (the caller
    has confined `model_path` itself to the folder it came from)."""
    proto = load_header(model_path)
    external_data_files(proto, model_path)
    return proto


def io_signature(proto: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Names, element types and shapes (dimension names for dynamic axes) of the graph's inputs and outputs."""

    def describe(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [dim.dim_param or dim.dim_value for dim in tensor.shape.dim]
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        except (KeyError, TypeError, ValueError):
            dtype = f"onnx-type-{tensor.elem_type}"
        return {"name": value.name, "dtype": dtype, "shape": shape}

    return {"inputs": [describe(v) for v in proto.graph.input], "outputs": [describe(v) for v in proto.graph.output]}


# -- writing graphs: weights stored once ------------------------------------------------------------------------

INLINE_LIMIT = 1024  # tensors smaller than this stay inside the .onnx file


def external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def tensor_index(model_path: Path) -> dict[tuple[int, str], tuple[str, int, int]]:
    """(length, sha256) -> (location, offset, length) of every external tensor of the graph at `model_path`."""
    proto = load_header(model_path)
    index = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = external_entries(tensor)
        location, offset, length = entries["location"], int(entries.get("offset", 0)), int(entries["length"])
        with (model_path.parent / location).open("rb") as handle:
            handle.seek(offset)
            digest = hashlib.sha256(handle.read(length)).hexdigest()
        index[length, digest] = (location, offset, length)
    return index


def save_model(proto: onnx.ModelProto, path: Path, share_with: Path | None = None) -> None:
    """Save a graph; its weights are stored once.

    Tensors that are already external data in this folder stay where they are (a fused graph keeps reading the
    plain graph's `model.onnx.data`). A tensor with the same bytes as one of `share_with`'s external tensors
    points at that one. What is left goes into this graph's own `.onnx.data` file when it is large, or inline.
    """
    index = tensor_index(share_with) if share_with is not None else {}
    own: list[onnx.TensorProto] = []
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.raw_data) < INLINE_LIMIT:
            continue
        data = tensor.raw_data
        match = index.get((len(data), hashlib.sha256(data).hexdigest())) if index else None
        if match is not None:
            set_external(tensor, *match)
        else:
            own.append(tensor)
    if sum(len(t.raw_data) for t in own) >= EXTERNAL_DATA_THRESHOLD:
        location = weights_file(path.name)
        with (path.parent / location).open("wb") as handle:
            for tensor in own:
                offset = handle.tell()
                handle.write(tensor.raw_data)
                set_external(tensor, location, offset, handle.tell() - offset)
            handle.flush()
            os.fsync(handle.fileno())
    onnx.save_model(proto, str(path))
