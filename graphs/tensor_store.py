"""Tensors of a graph read from, and written to, external data files one at a time.

`source_array` maps a tensor of a graph on disk as a read-only numpy array (inline tensors are small and come
from the protobuf). `TensorWriter` appends tensors to a graph's own weights file at aligned offsets, and points a
tensor at an identical one of another graph's instead of writing it twice (the fused graph and the plain graph
of a quantized export share every quantized weight). Nothing holds more than one tensor, so the graph passes
that use these (quantization) run in memory that does not grow with the model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from starcast.contract.graph_files import external_entries, load_header, set_external, weights_file
from starcast.contract.paths import confine

ALIGNMENT = 64 << 10  # ONNX Runtime maps external data whose offset is a multiple of the allocation granularity
PIECE = 16 << 20  # bytes read at a time when hashing or copying


def source_array(tensor: onnx.TensorProto, folder: Path) -> np.ndarray:
    """The tensor's values: a read-only map of its external data in `folder`, or its inline data."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    entries = external_entries(tensor)
    path = confine(folder, entries["location"], str(folder))
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(tensor.dims)
    return np.memmap(path, dtype=dtype, mode="r", offset=int(entries.get("offset", 0)), shape=shape)


def digest_file(path: Path, offset: int, length: int) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(offset)
        left = length
        while left:
            piece = handle.read(min(PIECE, left))
            if not piece:
                break
            sha.update(piece)
            left -= len(piece)
    return sha.hexdigest()


def shared_index(model_path: Path | None) -> dict[tuple[int, str], tuple[str, int, int]]:
    """(length, sha256) -> (location, offset, length) of every external tensor of the graph at `model_path`."""
    if model_path is None:
        return {}
    index = {}
    for tensor in load_header(model_path).graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = external_entries(tensor)
            location, offset, length = entries["location"], int(entries.get("offset", 0)), int(entries["length"])
            index[length, digest_file(model_path.parent / location, offset, length)] = (location, offset, length)
    return index


class TensorWriter:
    """Appends tensors to `model_path`'s weights file; a tensor equal to one of `share_with`'s points at it."""

    def __init__(self, model_path: Path, share_with: Path | None = None):
        self.location = weights_file(model_path.name)
        self.path = model_path.parent / self.location
        self.index = shared_index(share_with)
        self.handle = self.path.open("wb")

    def write(self, name: str, data_type: int, dims: Iterable[int], pieces: Iterable[np.ndarray]) -> onnx.TensorProto:
        """A tensor `name` whose bytes are `pieces` in order (C-contiguous arrays), written or shared."""
        tensor = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims))
        handle = self.handle
        start = handle.tell() + -handle.tell() % ALIGNMENT
        handle.seek(start)
        sha = hashlib.sha256()
        for piece in pieces:
            view = memoryview(np.ascontiguousarray(piece)).cast("B")
            sha.update(view)
            handle.write(view)
        length = handle.tell() - start
        match = self.index.get((length, sha.hexdigest()))
        if match is not None:
            handle.seek(start)
            handle.truncate()
            set_external(tensor, *match)
        else:
            set_external(tensor, self.location, start, length)
        return tensor

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        empty = self.handle.tell() == 0
        self.handle.close()
        if empty:
            self.path.unlink()


def pieces_of(array: np.ndarray, rows: int = 0) -> Iterable[np.ndarray]:
    """`array` in pieces of about PIECE bytes along its first axis, each read (from a map) when it is written."""
    if array.ndim == 0 or array.nbytes <= PIECE:
        yield np.ascontiguousarray(array)
        return
    rows = rows or max(1, PIECE // max(1, array[0].nbytes))
    for start in range(0, array.shape[0], rows):
        yield np.ascontiguousarray(array[start : start + rows])
