"""TensorRT engines from the plain graph: one engine, two optimization profiles (prompt and decode).

UNRUN: TensorRT cannot be installed on the machines this project was built and tested on (its wheels fetch
their libraries from NVIDIA's index), and no GPU machine had it. This module follows TensorRT 10's and 11's
Python APIs as their sources define them; tests check it against both API generations' names without
TensorRT. `require_tensorrt` and the profile arithmetic run everywhere.

The network is strongly typed on both generations (TensorRT 11 has no other kind; 10 has had the flag since
9.0): the graph's own types decide each layer's precision, so an fp16 export builds an fp16 engine whose
softmax runs in fp32 (the exporter's Casts) and whose LayerNormalization keeps fp32 statistics (stash_type 1);
an fp32 export builds an fp32 engine. The removed weak-typing calls (BuilderFlag.FP16/BF16,
OBEY_PRECISION_CONSTRAINTS, ILayer.precision, set_output_type) are not used.

Profiles (min / opt / max), for batch B, prompt P and total length L:
  0 prompt   input_ids [1,1]/[B,P]/[B,P]   attention_mask like input_ids   past_key_values.* [1,0]/[B,0]/[B,0]
  1 decode   input_ids [1,1]/[B,1]/[B,1]   attention_mask [1,2]/[B,L/2]/[B,L]   past [1,1]/[B,L/2-1]/[B,L-1]
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from starcast.contract import interfaces as io
from starcast.contract.config import GPTBigCodeConfig
from starcast.contract.errors import MissingExtra, UserError

ENGINE_DIR = "trt"
ENGINE_FILE = "model.plan"
TIMING_CACHE = "timing.cache"
SUPPORTED_MAJORS = (10, 11)
PROMPT_PROFILE, DECODE_PROFILE = 0, 1


def require_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise MissingExtra("TensorRT", "tensorrt", "tensorrt") from None
    major = int(str(tensorrt.__version__).split(".")[0])
    if major not in SUPPORTED_MAJORS:
        raise UserError(
            f"TensorRT {tensorrt.__version__} is not supported (supported: major versions "
            f"{', '.join(map(str, SUPPORTED_MAJORS))})"
        )
    return tensorrt


@dataclass(frozen=True)
class Limits:
    max_batch: int
    max_prompt: int
    max_length: int

    def check(self, config: GPTBigCodeConfig) -> None:
        if min(self.max_batch, self.max_prompt) < 1 or not self.max_prompt < self.max_length <= config.n_positions:
            raise UserError(
                f"profiles need 1 <= max prompt ({self.max_prompt}) < max length ({self.max_length}) <= "
                f"n_positions ({config.n_positions}) and max batch >= 1"
            )

    def profiles(self, config: GPTBigCodeConfig) -> dict[str, dict[str, list[list[int]]]]:
        """Per profile, per input: [min, opt, max] shapes."""
        b, p, length = self.max_batch, self.max_prompt, self.max_length

        def cache(batch: int, past: int) -> list[int]:
            return list(config.cache_shape(batch, past))

        def shapes(seq: tuple[int, int, int], total: tuple[int, int, int], past: tuple[int, int, int]):
            entry = {
                io.INPUT_IDS: [[1, seq[0]], [b, seq[1]], [b, seq[2]]],
                io.POSITION_IDS: [[1, seq[0]], [b, seq[1]], [b, seq[2]]],
                io.ATTENTION_MASK: [[1, total[0]], [b, total[1]], [b, total[2]]],
            }
            for name, _ in io.merged_cache_names(config.n_layer):
                entry[name] = [cache(1, past[0]), cache(b, past[1]), cache(b, past[2])]
            return entry

        mid = max(length // 2, 2)
        return {
            "prompt": shapes((1, p, p), (1, p, p), (0, 0, 0)),
            "decode": shapes((1, 1, 1), (2, mid, length), (1, mid - 1, length - 1)),
        }


def strongly_typed_flags(trt) -> int:
    """The creation flag by name: its bit moved between TensorRT 10 (1) and 11 (0, and ignored)."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def build_engine(
    onnx_path: Path, config: GPTBigCodeConfig, out: Path, limits: Limits, timing_cache: bytes = b""
) -> dict:
    """Build `out/model.plan` (and its timing cache) from the plain graph; returns the manifest's "tensorrt" entry.
    `timing_cache` is an earlier build's cache, which makes a rebuild skip the kernel timing it already did."""
    trt = require_tensorrt()
    limits.check(config)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT's ONNX parser rejected the graph: {errors[:500]}")
    build = builder.create_builder_config()
    profiles = limits.profiles(config)
    for shapes in profiles.values():
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        build.add_optimization_profile(profile)
    cache = build.create_timing_cache(timing_cache)
    if not build.set_timing_cache(cache, ignore_mismatch=True):  # a cache from another TensorRT is ignored
        cache = build.create_timing_cache(b"")
        build.set_timing_cache(cache, ignore_mismatch=True)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, build)
    if serialized is None:
        raise UserError("TensorRT could not build an engine from the graph (see its log above)")
    out.mkdir(parents=True, exist_ok=True)
    (out / ENGINE_FILE).write_bytes(bytes(serialized))
    (out / TIMING_CACHE).write_bytes(bytes(cache.serialize()))
    return {
        "engine": f"{ENGINE_DIR}/{ENGINE_FILE}",
        "timing_cache": f"{ENGINE_DIR}/{TIMING_CACHE}",
        "tensorrt": str(trt.__version__),
        "strongly_typed": True,
        "limits": asdict(limits),
        "profiles": profiles,
        "build_s": round(time.perf_counter() - start, 1),
    }
