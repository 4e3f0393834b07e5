"""The TensorRT backend: `prefill` and `decode_one_token` over an engine built by `starcast build-engine`.

UNRUN: TensorRT is not installable on the machines this was written on (see README). Written against TensorRT
10's and 11's Python APIs and cuda-python's runtime bindings:
- one execution context per optimization profile (prompt, decode), each set once, instead of switching the
  profile every step (which makes TensorRT update layer resources on the next enqueue);
- the limits come from the engine itself (`get_tensor_profile_shape`): a request beyond them is a one-line error
  before anything runs, and buffers are sized from them, not from the model's n_positions;
- every `set_input_shape` / `set_tensor_address` result is checked (they return False, they do not raise);
- device buffers for the inputs, the logits (batch x longest prompt x vocab) and the ping-pong merged cache
  are allocated once.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from starcast.contract import interfaces as io
from starcast.contract.config import GPTBigCodeConfig
from starcast.contract.errors import MissingExtra, UserError
from starcast.contract.interfaces import positions_from_mask
from starcast.runtime.tensorrt.builder import DECODE_PROFILE, PROMPT_PROFILE, require_tensorrt


def cuda_runtime():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise MissingExtra("the TensorRT backend", "tensorrt", "cuda-python") from None
    return cudart


def checked(result):
    error, *values = result
    if int(error) != 0:
        raise RuntimeError(f"CUDA error {error}")
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class EngineLimits:
    max_batch: int
    max_prompt: int
    max_length: int

    @classmethod
    def of(cls, engine) -> EngineLimits:
        prompt_max = engine.get_tensor_profile_shape(io.INPUT_IDS, PROMPT_PROFILE)[2]
        decode_max = engine.get_tensor_profile_shape(io.ATTENTION_MASK, DECODE_PROFILE)[2]
        return cls(int(prompt_max[0]), int(prompt_max[1]), int(decode_max[1]))

    def check(self, batch: int, prompt: int, max_length: int) -> None:
        if batch > self.max_batch or prompt > self.max_prompt or max_length > self.max_length:
            raise UserError(
                f"the TensorRT engine was built for batch <= {self.max_batch}, prompt <= {self.max_prompt} and "
                f"prompt + new tokens <= {self.max_length}; this request needs batch {batch}, prompt {prompt}, "
                f"length {max_length} (rebuild with starcast build-engine)"
            )


LOADED: dict[tuple[str, int, int], object] = {}  # (path, mtime_ns, size) -> engine: one engine on the GPU per file


def load_engine(engine_path: Path):
    """The engine in `engine_path`, deserialized once per file version: the Generator reads its limits and every
    batch size's TrtSteps runs it, from the one copy (an engine is the model's size in GPU memory)."""
    stat = engine_path.stat()
    key = (str(engine_path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in LOADED:
        trt = require_tensorrt()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise UserError(f"{engine_path}: TensorRT cannot load this engine (built by another TensorRT or GPU?)")
        for old in [k for k in LOADED if k[0] == key[0]]:  # a rebuilt file: the old engine goes
            del LOADED[old]
        LOADED[key] = engine
    return LOADED[key]


class TrtSteps:
    def __init__(self, engine_path: Path, config: GPTBigCodeConfig, batch: int, max_length: int, dtype: np.dtype):
        self.cudart = cuda_runtime()
        self.engine = load_engine(engine_path)
        self.limits = EngineLimits.of(self.engine)
        self.limits.check(batch, 1, max_length)
        self.config, self.batch, self.max_length, self.dtype = config, batch, max_length, np.dtype(dtype)
        self.stream = checked(self.cudart.cudaStreamCreate())
        self.contexts = []
        for profile in (PROMPT_PROFILE, DECODE_PROFILE):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(profile, self.stream)
            self.contexts.append(context)
        checked(self.cudart.cudaStreamSynchronize(self.stream))
        cache_elements = prod(config.cache_shape(batch, max_length))
        self.cache = [self.malloc(cache_elements * self.dtype.itemsize) for _ in range(2 * config.n_layer)]
        longest_prompt = min(self.limits.max_prompt, max_length)
        self.logits = self.malloc(batch * longest_prompt * config.vocab_size * self.dtype.itemsize)
        self.ids = self.malloc(batch * longest_prompt * 8)
        self.positions = self.malloc(batch * longest_prompt * 8)
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

    def bind(self, context, name: str, address: int, shape: tuple[int, ...] | None = None) -> None:
        if shape is not None and not context.set_input_shape(name, shape):
            raise UserError(f"TensorRT refused shape {tuple(shape)} for {name} (outside the engine's profile)")
        if not context.set_tensor_address(name, address):
            raise RuntimeError(f"TensorRT refused the address of {name}")

    def run(self, ids: np.ndarray, positions: np.ndarray, profile: int) -> np.ndarray:
        cfg, context = self.config, self.contexts[profile]
        seq = ids.shape[1]
        for name, address, array in (
            (io.INPUT_IDS, self.ids, ids),
            (io.POSITION_IDS, self.positions, positions),
            (io.ATTENTION_MASK, self.mask_buffer, self.mask),
        ):
            self.upload(address, array.astype(np.int64))
            self.bind(context, name, address, array.shape)
        for i, (past, present) in enumerate(io.merged_cache_names(cfg.n_layer)):
            self.bind(context, past, self.cache[self.side * cfg.n_layer + i], cfg.cache_shape(self.batch, self.length))
            self.bind(context, present, self.cache[(1 - self.side) * cfg.n_layer + i])
        self.bind(context, io.LOGITS, self.logits)
        if not context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execution failed")
        last = np.empty((self.batch, seq, cfg.vocab_size), self.dtype)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        checked(self.cudart.cudaMemcpyAsync(last.ctypes.data, self.logits, last.nbytes, kind, self.stream))
        checked(self.cudart.cudaStreamSynchronize(self.stream))
        self.side, self.length = 1 - self.side, self.length + seq
        return last[:, -1]

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.limits.check(input_ids.shape[0], input_ids.shape[1], self.max_length)
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
