"""The running batch of a continuously batching engine: rows that join and leave between decode steps.

Two layouts, one per graph interface:

SlotRows (static-cache graphs: the cuda-fused graph, GroupQueryAttention). Each row owns a slot of the
    [max_batch, kv_heads, max_length, head_dim] key and value buffers and its own length (seqlens_k). A new row
    is prefilled alone, bound to its slot's addresses; a finished row just frees its slot. Joining and leaving
    copy nothing. A decode step runs the slots up to the highest one in use (a free slot in between decodes a
    dummy token into its own slot, which the next row to take it overwrites).

ConcatRows (concat-cache graphs: the plain and cpu-fused graphs, on the CPU). present = Concat(past, new), so
    every row shares one past length L (shorter rows are left-padded, masked out) and every decode step already
    rewrites the whole cache. Between steps:
      - a new row with a prompt no longer than L is prefilled alone and written into a free row (a hole left
        by a finished row, or a new last row), left-padded to L: no other row's cache is copied;
      - a finished row becomes a hole (masked, fed a dummy token) until a new row takes it; trailing holes are
        dropped;
      - only a prompt longer than L, or a cache that reached its maximum length, re-lays the rows out once (a
        copy of the cache, about what one decode step's Concat copies anyway; benchmarks/RESULTS.md measures
        it), trimming the padding all rows share.
"""

from __future__ import annotations

from math import prod

import numpy as np
import onnxruntime as ort

from starcast.contract import interfaces as io
from starcast.contract.config import GPTBigCodeConfig
from starcast.runtime.cache import HOST, Device, DeviceBuffer, check_fits_in_memory
from starcast.runtime.session import device_id_of
from starcast.runtime.steps import last_logits


def bind_array(binding: ort.IOBinding, name: str, array: np.ndarray, output: bool = False) -> None:
    """Bind a host array by address (no copy)."""
    HOST.bind(binding, name, array.dtype, array.shape, array.ctypes.data, output)


class ConcatRows:
    """Rows of a concat-cache graph in host memory: two sides per layer, the step reads one and writes the other."""

    def __init__(self, session, config: GPTBigCodeConfig, max_batch: int, max_length: int, dtype: np.dtype):
        self.session, self.config = session, config
        self.max_batch, self.max_length, self.dtype = max_batch, max_length, np.dtype(dtype)
        self.per_token = config.cache_elements_per_token() // config.n_layer  # one layer, one row, one position
        self.chunk = max_batch * max_length * self.per_token  # one layer's region of a side
        check_fits_in_memory(2 * config.n_layer * self.chunk * self.dtype.itemsize, "the batch's KV cache", "cpu")
        self.sides = [np.zeros(config.n_layer * self.chunk, self.dtype) for _ in range(2)]
        self.side, self.length = 0, 0
        self.mask = np.zeros((0, 0), np.int64)  # [rows, length]
        self.next_position = np.zeros(0, np.int64)
        self.live = np.zeros(0, bool)  # False: a hole
        self.relayouts = 0  # how often rows were re-laid out (a copy of the cache), for the benchmark

    @property
    def rows(self) -> int:
        return len(self.live)

    def view(self, side: int, layer: int, rows: int, length: int) -> np.ndarray:
        start = layer * self.chunk
        return self.sides[side][start : start + rows * length * self.per_token].reshape(
            self.config.cache_shape(rows, length)
        )

    def run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list, present: list) -> np.ndarray:
        binding = self.session.io_binding()
        bind_array(binding, io.INPUT_IDS, np.ascontiguousarray(ids, np.int64))
        bind_array(binding, io.ATTENTION_MASK, np.ascontiguousarray(mask, np.int64))
        bind_array(binding, io.POSITION_IDS, np.ascontiguousarray(positions, np.int64))
        HOST.bind_new_output(binding, io.LOGITS)
        for (past_name, present_name), past_view, present_view in zip(
            io.merged_cache_names(self.config.n_layer), past, present, strict=True
        ):
            bind_array(binding, past_name, past_view)
            bind_array(binding, present_name, present_view, output=True)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def free_rows(self) -> list[int]:
        return [int(i) for i in np.nonzero(~self.live)[0]]

    def capacity(self) -> int:
        return self.max_batch - int(self.live.sum())

    def admit(self, prompt: np.ndarray) -> tuple[int, np.ndarray]:
        """Prefill one prompt ([tokens]) into a free row; returns (row, its next-token logits [vocab])."""
        p = len(prompt)
        if p > self.length or self.length + 1 > self.max_length:
            self.relayout(min_length=p)
        holes = self.free_rows()
        row = holes[0] if holes else self.rows
        if row == self.rows:  # a new last row: the arrays grow, the cache's existing rows stay where they are
            self.mask = np.concatenate([self.mask, np.zeros((1, self.length), np.int64)])
            self.next_position = np.append(self.next_position, 0)
            self.live = np.append(self.live, False)
        other = 1 - self.side
        scratch = [self.view(other, layer, 1, p) for layer in range(self.config.n_layer)]
        empty = [self.view(self.side, layer, 1, 0) for layer in range(self.config.n_layer)]
        logits = self.run(prompt[None], np.ones((1, p)), np.arange(p)[None], empty, scratch)
        for layer, present in enumerate(scratch):  # into this row, left-padded to the common length
            target = self.view(self.side, layer, self.rows, self.length)
            if self.config.multi_query:
                target[row, self.length - p :] = present[0]
            else:
                target[row, :, self.length - p :] = present[0]
        self.mask[row] = 0
        self.mask[row, self.length - p :] = 1
        self.next_position[row] = p
        self.live[row] = True
        return row, last_logits(logits)[0]

    def release(self, row: int) -> None:
        self.live[row] = False
        self.mask[row] = 0
        while self.rows and not self.live[-1]:  # trailing holes cost nothing to drop
            self.live, self.mask, self.next_position = self.live[:-1], self.mask[:-1], self.next_position[:-1]
        if not self.rows:
            self.length, self.mask = 0, np.zeros((0, 0), np.int64)

    def relayout(self, min_length: int) -> None:
        """Re-lay the rows out at a new common length: the padding every row shares is trimmed, and the length
        grows to at least `min_length` (a copy of the cache into the other side, which becomes current)."""
        shared_padding = int(np.argmax(self.mask.any(axis=0))) if self.rows and self.mask.any() else self.length
        used = self.length - shared_padding
        new_length = max(used, min_length)
        if new_length + 1 > self.max_length:
            raise RuntimeError("the batch's cache is full")  # callers admit only rows that fit (engine.py)
        other, pad = 1 - self.side, new_length - used
        for layer in range(self.config.n_layer):
            source = self.view(self.side, layer, self.rows, self.length)
            target = self.view(other, layer, self.rows, new_length)
            if self.config.multi_query:
                target[:, pad:] = source[:, shared_padding:]
            else:
                target[:, :, pad:] = source[:, :, shared_padding:]
        mask = np.zeros((self.rows, new_length), np.int64)
        mask[:, pad:] = self.mask[:, shared_padding:]
        self.mask, self.side, self.length = mask, other, new_length
        self.relayouts += 1

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """One step for every row ([rows] tokens; holes get anything); returns [rows, vocab] logits."""
        if self.length + 1 > self.max_length:
            self.relayout(min_length=0)
        rows, other = self.rows, 1 - self.side
        mask = np.concatenate([self.mask, self.live[:, None].astype(np.int64)], axis=1)
        past = [self.view(self.side, layer, rows, self.length) for layer in range(self.config.n_layer)]
        present = [self.view(other, layer, rows, self.length + 1) for layer in range(self.config.n_layer)]
        logits = self.run(tokens[:, None], mask, self.next_position[:, None], past, present)
        self.mask, self.side, self.length = mask, other, self.length + 1
        self.next_position = self.next_position + self.live
        return last_logits(logits)


class SlotRows:
    """Rows of a static-cache graph: one slot per row in the key/value buffers, written in place, on the session's
    GPU (`device_id`, by default read from the session)."""

    def __init__(
        self, session, config: GPTBigCodeConfig, max_batch: int, max_length: int, dtype, device: str,
        device_id: int | None = None,
    ):  # fmt: skip
        self.session, self.config, self.device = session, config, device
        self.place = Device(device, device_id_of(session) if device_id is None else device_id)
        self.max_batch, self.max_length, self.dtype = max_batch, max_length, np.dtype(dtype)
        self.slot_shape = (config.kv_heads, max_length, config.head_dim)
        self.cache = DeviceBuffer(
            2 * config.n_layer, max_batch * prod(self.slot_shape), self.dtype, device, "the batch's KV cache",
            self.place.id,
        )  # fmt: skip
        self.lengths = np.zeros(max_batch, np.int64)  # tokens in each slot's cache
        self.live = np.zeros(max_batch, bool)

    @property
    def rows(self) -> int:
        """Slots a decode step runs: up to the highest one in use."""
        used = np.nonzero(self.live)[0]
        return int(used[-1]) + 1 if used.size else 0

    def capacity(self) -> int:
        return self.max_batch - int(self.live.sum())

    def bind_cache(self, binding: ort.IOBinding, first: int, count: int) -> None:
        """Bind slots first..first+count-1 of every layer's key and value buffer, by address."""
        shape = [count, *self.slot_shape]
        offset = first * prod(self.slot_shape) * self.dtype.itemsize
        for part, (past, present) in enumerate(io.split_cache_names(self.config.n_layer)):
            address = self.cache.address(part) + offset
            self.place.bind(binding, past, self.dtype, shape, address)
            self.place.bind(binding, present, self.dtype, shape, address, output=True)

    def step(self, ids: np.ndarray, positions: np.ndarray, seqlens: np.ndarray, total: int, first: int):
        binding = self.session.io_binding()
        binding.bind_cpu_input(io.INPUT_IDS, np.ascontiguousarray(ids, np.int64))
        binding.bind_cpu_input(io.POSITION_IDS, np.ascontiguousarray(positions, np.int64))
        binding.bind_cpu_input(io.SEQLENS_K, seqlens.astype(np.int32))
        binding.bind_cpu_input(io.TOTAL_SEQUENCE_LENGTH, np.array(total, np.int32))
        self.place.bind_new_output(binding, io.LOGITS)
        self.bind_cache(binding, first, ids.shape[0])
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def admit(self, prompt: np.ndarray) -> tuple[int, np.ndarray]:
        slot = int(np.nonzero(~self.live)[0][0])
        p = len(prompt)
        logits = self.step(prompt[None], np.arange(p)[None], np.array([p - 1]), p, slot)
        self.lengths[slot], self.live[slot] = p, True
        return slot, last_logits(logits, np.array([p]))[0]

    def release(self, row: int) -> None:
        self.live[row], self.lengths[row] = False, 0

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        rows = self.rows
        lengths = np.where(self.live[:rows], self.lengths[:rows], 0)  # a free slot decodes into its own slot
        logits = self.step(tokens[:, None], lengths[:, None], lengths, self.max_length, 0)
        self.lengths[:rows] += self.live[:rows]
        return last_logits(logits)
