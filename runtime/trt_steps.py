"""The TensorRT backend: `prefill` and `decode_one_token` over an engine built by `starcast build-engine`.

UNRUN: TensorRT is not installable on the machines this was written on (see README). Written against TensorRT
10's documented Python API and cuda-python's runtime bindings: device buffers for the inputs, the logits and
the ping-pong merged cache are allocated once; each step sets input shapes and tensor addresses, selects the
prompt (0) or decode (1) optimization profile and calls `execute_async_v3` on one CUDA stream.
"""

from __future__ import annotations

from math import prod
from pathlib import Path

import numpy as np

from starcast.errors import UserError
from starcast.exporter.config import GPTBigCodeConfig
from starcast.exporter.tensorrt import require_tensorrt
from starcast.runtime.steps import positions_from_mask

PROMPT_PROFILE, DECODE_PROFILE = 0, 1


def cuda_runtime():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise UserError("the TensorRT backend needs cuda-python: pip install 'starcast[tensorrt]'") from None
    return cudart


def checked(result):
    error, *values = result
    if int(error) != 0:
        raise RuntimeError(f"CUDA error {error}")
    return values[0] if len(values) == 1 else values


class TrtSteps:
    def __init__(self, engine_path: Path, config: GPTBigCodeConfig, batch: int, max_length: int, dtype: np.dtype):
        trt = require_tensorrt()
        self.cudart = cuda_runtime()
        self.config, self.batch, self.max_length, self.dtype = config, batch, max_length, np.dtype(dtype)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        self.context = self.engine.create_execution_context()
        self.stream = checked(self.cudart.cudaStreamCreate())
        cache_elements = prod(config.cache_shape(batch, max_length))
        self.cache = [self.malloc(cache_elements * self.dtype.itemsize) for _ in range(2 * config.n_layer)]
        self.logits = self.malloc(batch * max_length * config.vocab_size * self.dtype.itemsize)
        self.ids = self.malloc(batch * max_length * 8)
        self.positions = self.malloc(batch * max_length * 8)
        self.mask_buffer = self.malloc(batch * max_length * 8)
        self.side, self.length = 0, 0
        self.mask = np.zeros((batch, 0), np.int64)
        self.next_position = np.zeros(batch, np.int64)

    def malloc(self, nbytes: int) -> int:
        return int(checked(self.cudart.cudaMalloc(max(nbytes, 256))))

    def upload(self, address: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        checked(self.cudart.cudaMemcpyAsync(address, array.ctypes.data, array.nbytes, kind, self.stream))
        checked(self.cudart.cudaStreamSynchronize(self.stream))

    def run(self, ids: np.ndarray, positions: np.ndarray, profile: int) -> np.ndarray:
        cfg, ctx = self.config, self.context
        seq = ids.shape[1]
        ctx.set_optimization_profile_async(profile, self.stream)
        for name, address, array in (
            ("input_ids", self.ids, ids),
            ("position_ids", self.positions, positions),
            ("attention_mask", self.mask_buffer, self.mask),
        ):
            self.upload(address, array.astype(np.int64))
            ctx.set_input_shape(name, array.shape)
            ctx.set_tensor_address(name, address)
        for i in range(cfg.n_layer):
            past = f"past_key_values.{i}.key_value"
            ctx.set_input_shape(past, self.config.cache_shape(self.batch, self.length))
            ctx.set_tensor_address(past, self.cache[self.side * cfg.n_layer + i])
            ctx.set_tensor_address(f"present.{i}.key_value", self.cache[(1 - self.side) * cfg.n_layer + i])
        ctx.set_tensor_address("logits", self.logits)
        if not ctx.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execution failed")
        logits = np.empty((self.batch, seq, cfg.vocab_size), self.dtype)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        checked(self.cudart.cudaMemcpyAsync(logits.ctypes.data, self.logits, logits.nbytes, kind, self.stream))
        checked(self.cudart.cudaStreamSynchronize(self.stream))
        self.side, self.length = 1 - self.side, self.length + seq
        return logits[:, -1]

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.side, self.length = 0, 0
        self.mask = attention_mask.astype(np.int64)
        positions = positions_from_mask(self.mask)
        self.next_position = positions[:, -1] + 1
        return self.run(input_ids, positions, PROMPT_PROFILE)

    def decode_one_token(self, next_ids: np.ndarray) -> np.ndarray:
        self.mask = np.concatenate([self.mask, np.ones((self.batch, 1), np.int64)], axis=1)
        positions = self.next_position[:, None].copy()
        self.next_position += 1
        return self.run(next_ids[:, None], positions, DECODE_PROFILE)
