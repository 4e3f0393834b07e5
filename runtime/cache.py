"""The KV cache: one allocation for every layer, on the device the model runs on, bound by address.

Nothing is allocated per step and nothing of the cache ever crosses to the host: each step binds per-layer
views (a base address plus an offset) into the one buffer with IOBinding.

- Concat-cache graphs (the plain graph, the cpu-fused graph): present = Concat(past, new) has a different
  length every step, so the buffer holds two sides; a step reads side A (shape [batch, past, ...]) and writes
  side B ([batch, past + seq, ...]), then the sides swap.
- Static-cache graphs (the cuda-fused graph, GroupQueryAttention): per layer a key and a value buffer of the
  maximum length; past and present are bound to the same address and the op writes the new positions in place.

Every OrtValue and every bind by device goes through `Device`, which carries the session's GPU index
(`device_id_of(session)`): memory of GPU 0 bound to a session on GPU 1 would be wrong, not slow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod

import numpy as np
import onnxruntime as ort

from starcast.contract import interfaces as io
from starcast.contract.errors import UserError


def check_fits_in_memory(nbytes: int, what: str, device: str) -> None:
    """Refuse, before allocating, a host buffer larger than the machine's memory (an oversized allocation would
    otherwise be granted lazily and the process killed while the buffer is zeroed)."""
    if device != "cpu":
        return
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > 0.9 * total:
        raise UserError(
            f"{what} needs {nbytes / 2**30:.1f} GiB, more than this machine's {total / 2**30:.1f} GiB of memory: "
            f"lower the batch or the maximum length"
        )


@dataclass(frozen=True)
class Device:
    """Where memory lives: "cpu" or "cuda", and the GPU index. The only place starcast creates OrtValues or binds
    by device (tests check both)."""

    kind: str = "cpu"
    id: int = 0

    def empty(self, elements: int, dtype: np.dtype) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type([elements], np.dtype(dtype), self.kind, self.id)

    def value(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(array, self.kind, self.id)

    def bind(self, binding: ort.IOBinding, name: str, dtype: np.dtype, shape: Sequence[int], address: int,
             output: bool = False) -> None:  # fmt: skip
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self.kind, self.id, np.dtype(dtype), list(shape), address)

    def bind_new_output(self, binding: ort.IOBinding, name: str) -> None:
        """An output ONNX Runtime allocates (its shape varies) on this device."""
        binding.bind_output(name, self.kind, self.id)


HOST = Device("cpu", 0)


class DeviceBuffer:
    """`parts` equal, contiguous regions of `part_elements` each, in one OrtValue on `device` (GPU `device_id`)."""

    def __init__(
        self, parts: int, part_elements: int, dtype: np.dtype, device: str, what: str = "a buffer", device_id: int = 0
    ):
        self.dtype = np.dtype(dtype)
        check_fits_in_memory(parts * part_elements * self.dtype.itemsize, what, device)
        self.device, self.place = device, Device(device, device_id)
        self.part_elements = part_elements
        self.value = self.place.empty(parts * part_elements, self.dtype)
        self.value.update_inplace(np.zeros(parts * part_elements, self.dtype))  # no stale memory, ever
        self.base = self.value.data_ptr()

    def address(self, part: int) -> int:
        return self.base + part * self.part_elements * self.dtype.itemsize

    def bind_input(self, binding: ort.IOBinding, name: str, part: int, shape: Sequence[int]) -> None:
        assert prod(shape) <= self.part_elements, (name, shape)
        self.place.bind(binding, name, self.dtype, shape, self.address(part))

    def bind_output(self, binding: ort.IOBinding, name: str, part: int, shape: Sequence[int]) -> None:
        assert prod(shape) <= self.part_elements, (name, shape)
        self.place.bind(binding, name, self.dtype, shape, self.address(part), output=True)


class ConcatCache:
    """Ping-pong buffers for graphs whose present = Concat(past, new). `names` pairs each past input with its
    present output: one merged `key_value` pair per layer for starcast graphs, a key and a value pair per layer
    for optimum's exports."""

    def __init__(
        self, names: list[tuple[str, str]], shape_at, max_length: int, dtype: np.dtype, device: str, device_id: int = 0
    ):
        self.names, self.shape_at, self.max_length = names, shape_at, max_length
        elements = prod(shape_at(max_length))
        self.buffer = DeviceBuffer(2 * len(names), elements, dtype, device, "the KV cache", device_id)
        self.side = 0
        self.length = 0

    @classmethod
    def merged(cls, n_layer: int, shape_at, max_length: int, dtype: np.dtype, device: str, device_id: int = 0):
        return cls(io.merged_cache_names(n_layer), shape_at, max_length, dtype, device, device_id)

    @classmethod
    def split(cls, n_layer: int, shape_at, max_length: int, dtype: np.dtype, device: str, device_id: int = 0):
        return cls(io.split_cache_names(n_layer), shape_at, max_length, dtype, device, device_id)

    def reset(self) -> None:
        self.side, self.length = 0, 0

    def bind(self, binding: ort.IOBinding, new_tokens: int) -> None:
        past, present = self.shape_at(self.length), self.shape_at(self.length + new_tokens)
        count = len(self.names)
        for i, (past_name, present_name) in enumerate(self.names):
            self.buffer.bind_input(binding, past_name, self.side * count + i, past)
            self.buffer.bind_output(binding, present_name, (1 - self.side) * count + i, present)

    def advance(self, new_tokens: int) -> None:
        self.side, self.length = 1 - self.side, self.length + new_tokens


class StaticCache:
    """In-place key and value buffers of the maximum length, for GroupQueryAttention graphs."""

    def __init__(self, n_layer: int, shape: tuple[int, ...], dtype: np.dtype, device: str, device_id: int = 0):
        self.names, self.shape = io.split_cache_names(n_layer), shape
        self.buffer = DeviceBuffer(2 * n_layer, prod(shape), dtype, device, "the KV cache", device_id)

    def bind(self, binding: ort.IOBinding) -> None:
        for part, (past, present) in enumerate(self.names):
            self.buffer.bind_input(binding, past, part, self.shape)
            self.buffer.bind_output(binding, present, part, self.shape)
