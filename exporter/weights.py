"""Stream a checkpoint's tensors into the plain graph's weights, one tensor at a time.

Each tensor is read from its shard (memory-mapped safetensors, or `torch.load(mmap=True)`), checked (its
shape, a floating-point dtype, finite values, finite after the cast), cast to the export's dtype, transposed
where the graph reads it transposed, and written at a 64 KiB-aligned offset of `model.onnx.data`, so that ONNX
Runtime can map it instead of copying it. At no point is more than one tensor in memory: the export's anonymous
memory does not grow with the model (benchmarks/export_large.py measures it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

from starcast.contract.errors import UserError
from starcast.contract.graph_files import EXTERNAL_DATA_THRESHOLD, INLINE_LIMIT, set_external, weights_file
from starcast.exporter.checkpoint import IGNORED_SUFFIXES, Checkpoint, check_all_used, iter_tensors
from starcast.exporter.trace import WeightRef

ALIGNMENT = 64 << 10  # ONNX Runtime maps external data whose offset is a multiple of the allocation granularity
ONNX_TYPES = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16}
CHECK_ROWS = 1 << 22  # elements per chunk of the finiteness checks: their temporaries stay a few MB


def graph_bytes(refs: list[WeightRef], dtype: torch.dtype) -> int:
    """What the weights take in `dtype`, as the graph stores them."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(size * _count(r.shape) for r in refs)


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def all_finite(tensor: torch.Tensor) -> bool:
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(CHECK_ROWS))


def checked(checkpoint: Checkpoint, raw_name: str, tensor: torch.Tensor, want: tuple[int, ...], dtype) -> torch.Tensor:
    """The tensor cast to `dtype`, after the checks that make a wrong checkpoint an error instead of a graph."""
    where = checkpoint.folder
    if tuple(tensor.shape) != want:
        raise UserError(f"{where}: tensor {raw_name} has shape {tuple(tensor.shape)}, expected {want}")
    if not tensor.is_floating_point():
        raise UserError(f"{where}: tensor {raw_name} has dtype {tensor.dtype}, expected floating point")
    if not all_finite(tensor):
        raise UserError(f"{where}: the checkpoint contains NaN or infinite values (tensor {raw_name})")
    converted = tensor.to(dtype)
    if converted is not tensor and not all_finite(converted):
        raise UserError(f"{where}: tensor {raw_name} overflows {str(dtype).removeprefix('torch.')}")
    return converted


def parameter_name(raw_name: str, expected: set[str]) -> str:
    """Hub checkpoints name parameters with or without the `transformer.` prefix."""
    return raw_name if raw_name in expected or raw_name == "lm_head.weight" else f"transformer.{raw_name}"


def write_weights(
    proto: onnx.ModelProto, refs: list[WeightRef], checkpoint: Checkpoint, dtype: torch.dtype, model_path: Path,
    tied: bool, on_bytes: Callable[[int, int], None] | None = None,
) -> None:  # fmt: skip
    """Fill the graph's weights from the checkpoint: initializers in `model_path`'s weights file (inline for a
    model under EXTERNAL_DATA_THRESHOLD), and the weight inputs removed. `on_bytes(done, total)` reports progress."""
    by_parameter: dict[str, list[WeightRef]] = {}
    for ref in refs:
        by_parameter.setdefault(ref.parameter, []).append(ref)
    shapes = {p: (rs[0].shape[::-1] if rs[0].transposed else rs[0].shape) for p, rs in by_parameter.items()}
    total = graph_bytes(refs, dtype)
    external = total >= EXTERNAL_DATA_THRESHOLD
    location = weights_file(model_path.name)
    initializers: dict[str, onnx.TensorProto] = {}
    filled: set[str] = set()
    unused: list[str] = []
    done = 0
    with (model_path.parent / location).open("wb") if external else contextlib.nullcontext() as handle:
        for raw_name, tensor in iter_tensors(checkpoint.weight_files):
            name = parameter_name(raw_name, set(shapes))
            if name not in shapes:
                tied_copy = name == "lm_head.weight" and tied
                if not (tied_copy or name.endswith(IGNORED_SUFFIXES)):
                    unused.append(raw_name)
                continue
            if name in filled:
                raise UserError(f"{checkpoint.folder}: tensor {raw_name} appears twice")
            value = checked(checkpoint, raw_name, tensor, tuple(shapes[name]), dtype)
            filled.add(name)
            for ref in by_parameter[name]:
                data = (value.t() if ref.transposed else value).contiguous()
                raw = data.reshape(-1).view(torch.uint8).numpy()
                initializer = onnx.TensorProto(name=ref.name, data_type=ONNX_TYPES[dtype], dims=list(ref.shape))
                if external and len(raw) >= INLINE_LIMIT:
                    offset = -handle.tell() % ALIGNMENT + handle.tell()
                    handle.seek(offset)
                    handle.write(memoryview(raw))
                    set_external(initializer, location, offset, len(raw))
                else:
                    initializer.raw_data = bytes(raw)
                initializers[ref.name] = initializer
                done += len(raw)
                if on_bytes is not None:
                    on_bytes(done, total)
            del tensor, value
        if external:
            handle.flush()
            os.fsync(handle.fileno())
    check_all_used(checkpoint, unused, sorted(set(shapes) - filled))
    graph = proto.graph
    graph.initializer.extend(initializers[ref.name] for ref in refs)
    kept = [value for value in graph.input if value.name not in initializers]
    del graph.input[:]
    graph.input.extend(kept)

