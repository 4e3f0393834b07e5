"""The two steps of generation over an exported graph: `prefill` (the prompt) and `decode_one_token`.

Both return the logits of each row's last real position, [batch, vocab], as a host array: that is all that
crosses from the device each step. Two graph interfaces, one class each:
  ConcatCacheSteps   the plain graph and the cpu-fused graph (attention_mask, merged key_value cache), and
                     optimum's gpt_bigcode exports (separate key and value); prompts are left-padded, as
                     transformers pads them.
  StaticCacheSteps   the cuda-fused graph (GroupQueryAttention, seqlens_k, in-place key/value buffers);
                     each row's tokens start at cache position 0, so a left-padded prompt is moved right.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from starcast.exporter.config import GPTBigCodeConfig
from starcast.runtime.cache import ConcatCache, DeviceBuffer, StaticCache


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids as transformers' generate() makes them for a left-padded batch (padding at 1)."""
    positions = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)


class Steps:
    """What both drivers hold: the session, its IO binding, and the decode-logits buffer reused every step."""

    def __init__(
        self, session: ort.InferenceSession, config: GPTBigCodeConfig, batch: int, dtype: np.dtype, device: str
    ):
        self.session, self.config, self.batch, self.device = session, config, batch, device
        self.binding = session.io_binding()
        self.logits = DeviceBuffer(1, batch * config.vocab_size, dtype, device)


class ConcatCacheSteps(Steps):
    def __init__(
        self,
        session: ort.InferenceSession,
        config: GPTBigCodeConfig,
        batch: int,
        max_length: int,
        dtype: np.dtype,
        device: str,
    ):
        super().__init__(session, config, batch, dtype, device)
        inputs = {value.name for value in session.get_inputs()}
        if "past_key_values.0.key_value" in inputs:
            self.cache = ConcatCache.merged(
                config.n_layer, lambda n: config.cache_shape(batch, n), max_length, dtype, device
            )
        else:  # optimum's layout: separate key and value, [batch, kv_heads, past, head_dim]

            def split_shape(length: int) -> tuple[int, ...]:
                return (batch, config.kv_heads, length, config.head_dim)

            self.cache = ConcatCache.split(config.n_layer, split_shape, max_length, dtype, device)
        self.takes_positions = "position_ids" in inputs
        self.mask = np.zeros((batch, 0), np.int64)
        self.positions = np.zeros(batch, np.int64)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.cache.reset()
        self.mask = attention_mask.astype(np.int64)
        positions = positions_from_mask(self.mask)
        self.positions = positions[:, -1] + 1
        logits = self.run(input_ids, positions, prompt=True)
        return logits[:, -1]

    def decode_one_token(self, next_ids: np.ndarray) -> np.ndarray:
        self.mask = np.concatenate([self.mask, np.ones((self.batch, 1), np.int64)], axis=1)
        positions = self.positions[:, None].copy()
        self.positions += 1
        return self.run(next_ids[:, None].astype(np.int64), positions, prompt=False)[:, -1]

    def run(self, ids: np.ndarray, positions: np.ndarray, prompt: bool) -> np.ndarray:
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", self.mask)
        if self.takes_positions:
            b.bind_cpu_input("position_ids", positions)
        # logits first: get_outputs() lists outputs in the order they were bound
        if prompt:
            b.bind_output("logits", self.device)  # [batch, prompt, vocab]: allocated once per generate()
        else:
            self.logits.bind_output(b, "logits", 0, (self.batch, 1, self.config.vocab_size))
        self.cache.bind(b, ids.shape[1])
        self.session.run_with_iobinding(b)
        self.cache.advance(ids.shape[1])
        return b.get_outputs()[0].numpy()


class StaticCacheSteps(Steps):
    """GroupQueryAttention graphs. The decode step has static shapes and fixed input addresses (its inputs live
    in device buffers updated in place, total_sequence_length is the buffer length, masking comes from
    seqlens_k), which is what CUDA graph capture needs; on CUDA the session replays one captured graph per
    batch size."""

    def __init__(
        self,
        session: ort.InferenceSession,
        config: GPTBigCodeConfig,
        batch: int,
        max_length: int,
        dtype: np.dtype,
        device: str,
        cuda_graph: bool = False,
    ):
        super().__init__(session, config, batch, dtype, device)
        shape = (batch, config.kv_heads, max_length, config.head_dim)
        self.cache = StaticCache(config.n_layer, shape, dtype, device)
        self.lengths = np.zeros(batch, np.int64)  # tokens in the cache, per row
        self.decode_binding: ort.IOBinding | None = None
        self.decode_inputs = {
            "input_ids": ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64), device, 0),
            "position_ids": ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1), np.int64), device, 0),
            "seqlens_k": ort.OrtValue.ortvalue_from_numpy(np.zeros(batch, np.int32), device, 0),
            "total_sequence_length": ort.OrtValue.ortvalue_from_numpy(np.array(max_length, np.int32)),  # host
        }
        self.prefill_options, self.decode_options = ort.RunOptions(), ort.RunOptions()
        if cuda_graph:
            self.prefill_options.add_run_config_entry("gpu_graph_id", "-1")  # prompts vary in shape: no capture
            self.decode_options.add_run_config_entry("gpu_graph_id", str(batch))  # one graph per batch size

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        lengths = attention_mask.sum(axis=1).astype(np.int64)
        width = input_ids.shape[1]
        # Move each row's tokens to the start (right padding): the cache is filled from position 0.
        order = np.argsort(attention_mask == 0, axis=1, kind="stable")
        ids = np.take_along_axis(input_ids, order, axis=1)
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape).copy()
        positions[positions >= lengths[:, None]] = 0
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("position_ids", positions)
        b.bind_cpu_input("seqlens_k", (lengths - 1).astype(np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(int(lengths.max()), np.int32))
        b.bind_output("logits", self.device)  # first: get_outputs() lists outputs in the order they were bound
        self.cache.bind(b)
        self.session.run_with_iobinding(b, self.prefill_options)
        self.lengths = lengths
        return b.get_outputs()[0].numpy()[np.arange(self.batch), lengths - 1]

    def decode_one_token(self, next_ids: np.ndarray) -> np.ndarray:
        inputs = self.decode_inputs
        inputs["input_ids"].update_inplace(next_ids[:, None].astype(np.int64))
        inputs["position_ids"].update_inplace(self.lengths[:, None].copy())
        inputs["seqlens_k"].update_inplace(self.lengths.astype(np.int32))  # cache length after this step - 1
        if self.decode_binding is None:  # bound once: every address stays the same for the life of the buffers
            b = self.decode_binding = self.session.io_binding()
            for name, value in inputs.items():
                b.bind_ortvalue_input(name, value)
            self.logits.bind_output(b, "logits", 0, (self.batch, 1, self.config.vocab_size))
            self.cache.bind(b)
        self.session.run_with_iobinding(self.decode_binding, self.decode_options)
        self.lengths = self.lengths + 1
        return self.logits.value.numpy().reshape(self.batch, self.config.vocab_size)
