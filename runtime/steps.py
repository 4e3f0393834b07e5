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

from starcast.contract import interfaces as io
from starcast.contract.config import GPTBigCodeConfig
from starcast.contract.errors import UserError
from starcast.contract.interfaces import positions_from_mask
from starcast.runtime.cache import ConcatCache, Device, DeviceBuffer, StaticCache
from starcast.runtime.session import device_id_of


def last_logits(logits: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
    """[rows, vocab] from a graph's logits: [rows, 1, vocab] already (the fused graphs' lm_head ran on each row's
    last token only), or every position's (the plain graph: the last column, or each row's `lengths - 1`)."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    if lengths is None:
        return logits[:, -1]
    return logits[np.arange(logits.shape[0]), lengths - 1]


class Steps:
    """What both drivers hold: the session, its IO binding, and the decode-logits buffer reused every step. Every
    buffer and binding names the session's GPU (`device_id`, by default read from the session)."""

    def __init__(
        self, session: ort.InferenceSession, config: GPTBigCodeConfig, batch: int, dtype: np.dtype, device: str,
        device_id: int | None = None,
    ):  # fmt: skip
        self.session, self.config, self.batch, self.device = session, config, batch, device
        self.device_id = device_id_of(session) if device_id is None else device_id
        self.place = Device(device, self.device_id)
        self.binding = session.io_binding()
        self.logits = DeviceBuffer(1, batch * config.vocab_size, dtype, device, "the logits", self.device_id)


class ConcatCacheSteps(Steps):
    def __init__(
        self,
        session: ort.InferenceSession,
        config: GPTBigCodeConfig,
        batch: int,
        max_length: int,
        dtype: np.dtype,
        device: str,
        device_id: int | None = None,
    ):
        super().__init__(session, config, batch, dtype, device, device_id)
        inputs = {value.name for value in session.get_inputs()}
        if io.past_key_value(0) in inputs:
            self.cache = ConcatCache.merged(
                config.n_layer, lambda n: config.cache_shape(batch, n), max_length, dtype, device, self.device_id
            )
        else:  # optimum's layout: separate key and value, [batch, kv_heads, past, head_dim]

            def split_shape(length: int) -> tuple[int, ...]:
                return (batch, config.kv_heads, length, config.head_dim)

            self.cache = ConcatCache.split(config.n_layer, split_shape, max_length, dtype, device, self.device_id)
        self.takes_positions = io.POSITION_IDS in inputs
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
        b.bind_cpu_input(io.INPUT_IDS, ids)
        b.bind_cpu_input(io.ATTENTION_MASK, self.mask)
        if self.takes_positions:
            b.bind_cpu_input(io.POSITION_IDS, positions)
        # logits first: get_outputs() lists outputs in the order they were bound
        if prompt:
            self.place.bind_new_output(b, io.LOGITS)  # [batch, prompt or 1, vocab]: allocated once per generate()
        else:
            self.logits.bind_output(b, io.LOGITS, 0, (self.batch, 1, self.config.vocab_size))
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
        device_id: int | None = None,
    ):
        super().__init__(session, config, batch, dtype, device, device_id)
        shape = (batch, config.kv_heads, max_length, config.head_dim)
        self.cache = StaticCache(config.n_layer, shape, dtype, device, self.device_id)
        self.lengths = np.zeros(batch, np.int64)  # tokens in the cache, per row
        self.decode_binding: ort.IOBinding | None = None
        self.decode_inputs = {
            io.INPUT_IDS: self.place.value(np.zeros((batch, 1), np.int64)),
            io.POSITION_IDS: self.place.value(np.zeros((batch, 1), np.int64)),
            io.SEQLENS_K: self.place.value(np.zeros(batch, np.int32)),
            # on the host: GroupQueryAttention reads it on the CPU (OrtMemTypeCPUInput)
            io.TOTAL_SEQUENCE_LENGTH: Device("cpu", 0).value(np.array(max_length, np.int32)),
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
        b.bind_cpu_input(io.INPUT_IDS, ids)
        b.bind_cpu_input(io.POSITION_IDS, positions)
        b.bind_cpu_input(io.SEQLENS_K, (lengths - 1).astype(np.int32))
        # The prompt step is recognised by total_sequence_length == sequence length: the padded width, even when
        # every row is shorter (each row's own length comes from seqlens_k).
        b.bind_cpu_input(io.TOTAL_SEQUENCE_LENGTH, np.array(width, np.int32))
        self.place.bind_new_output(b, io.LOGITS)  # first: get_outputs() lists outputs in the order they were bound
        self.cache.bind(b)
        self.session.run_with_iobinding(b, self.prefill_options)
        self.lengths = lengths
        return last_logits(b.get_outputs()[0].numpy(), lengths)

    def decode_one_token(self, next_ids: np.ndarray) -> np.ndarray:
        inputs = self.decode_inputs
        inputs[io.INPUT_IDS].update_inplace(next_ids[:, None].astype(np.int64))
        inputs[io.POSITION_IDS].update_inplace(self.lengths[:, None].copy())
        inputs[io.SEQLENS_K].update_inplace(self.lengths.astype(np.int32))  # cache length after this step - 1
        if self.decode_binding is None:  # bound once: every address stays the same for the life of the buffers
            b = self.decode_binding = self.session.io_binding()
            for name, value in inputs.items():
                b.bind_ortvalue_input(name, value)
            self.logits.bind_output(b, io.LOGITS, 0, (self.batch, 1, self.config.vocab_size))
            self.cache.bind(b)
        self.session.run_with_iobinding(self.decode_binding, self.decode_options)
        self.lengths = self.lengths + 1
        return self.logits.value.numpy().reshape(self.batch, self.config.vocab_size)


def check_interface(session: ort.InferenceSession, interface: str, config: GPTBigCodeConfig, dtype: np.dtype) -> None:
    """The graph's inputs and outputs are those of `interface` for this config and dtype: a graph from another
    tool, or one that does not match its manifest, is a one-line error instead of a failure inside a step."""
    inputs = {value.name: value for value in session.get_inputs()}
    outputs = {value.name: value for value in session.get_outputs()}
    if interface == io.SPLIT_CACHE:
        expected_in = [io.INPUT_IDS, io.ATTENTION_MASK] + [past for past, _ in io.split_cache_names(config.n_layer)]
        expected_out = [io.LOGITS] + [present for _, present in io.split_cache_names(config.n_layer)]
    else:
        expected_in, expected_out = (
            io.expected_inputs(interface, config.n_layer),
            io.expected_outputs(interface, config.n_layer),
        )
    missing = [name for name in expected_in if name not in inputs] + [n for n in expected_out if n not in outputs]
    extra = [name for name in inputs if name not in expected_in and name != io.POSITION_IDS]
    if missing or extra:
        what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected input {extra[0]}"
        raise UserError(f"the graph is not a {interface} GPTBigCode graph with {config.n_layer} layers ({what})")
    vocab = outputs[io.LOGITS].shape[-1]
    if isinstance(vocab, int) and vocab != config.vocab_size:
        raise UserError(f"the graph's logits have {vocab} entries, the config's vocabulary {config.vocab_size}")
    cache_type = {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)"}[np.dtype(dtype)]
    past = inputs[expected_in[-1]]
    if past.type != cache_type:
        raise UserError(f"the graph's cache is {past.type}, but the manifest says {np.dtype(dtype).name}")


def make_steps(
    session: ort.InferenceSession,
    interface: str,
    config: GPTBigCodeConfig,
    batch: int,
    max_length: int,
    dtype: np.dtype,
    device: str,
    cuda_graph: bool = False,
    device_id: int | None = None,
) -> ConcatCacheSteps | StaticCacheSteps:
    """The driver for a graph of `interface` (concat-cache, split-cache or static-cache); its buffers are on GPU
    `device_id` (by default the session's)."""
    check_interface(session, interface, config, dtype)
    if interface == io.STATIC_CACHE:
        return StaticCacheSteps(session, config, batch, max_length, dtype, device, cuda_graph, device_id)
    return ConcatCacheSteps(session, config, batch, max_length, dtype, device, device_id)
