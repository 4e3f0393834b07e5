"""TensorRT engines from the plain graph: one engine, two optimization profiles (prompt and decode).

UNRUN: TensorRT cannot be installed on the machines this project was built and tested on (its wheels fetch
their libraries from NVIDIA's index); this module follows TensorRT 10's documented Python API and is covered
by tests that run only where `tensorrt` imports. `require_tensorrt` and the profile arithmetic run everywhere.

Profiles (min / opt / max), for batch B, prompt P and total length L:
  0 prompt   input_ids [1,1]/[B,P]/[B,P]   attention_mask like input_ids   past_key_values.* [1,0]/[B,0]/[B,0]
  1 decode   input_ids [1,1]/[B,1]/[B,1]   attention_mask [1,2]/[B,L/2]/[B,L]   past [1,1]/[B,L/2-1]/[B,L-1]
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from starcast.errors import UserError
from starcast.exporter.config import GPTBigCodeConfig

ENGINE_DIR = "trt"
ENGINE_FILE = "model.plan"
TIMING_CACHE = "timing.cache"
PRECISIONS = ("fp16", "bf16", "fp32")


def require_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise UserError(
            "TensorRT is not installed: pip install 'starcast[tensorrt]' (its wheels need NVIDIA's package index)"
        ) from None
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
                "input_ids": [[1, seq[0]], [b, seq[1]], [b, seq[2]]],
                "position_ids": [[1, seq[0]], [b, seq[1]], [b, seq[2]]],
                "attention_mask": [[1, total[0]], [b, total[1]], [b, total[2]]],
            }
            for i in range(config.n_layer):
                entry[f"past_key_values.{i}.key_value"] = [cache(1, past[0]), cache(b, past[1]), cache(b, past[2])]
            return entry

        mid = max(length // 2, 2)
        return {
            "prompt": shapes((1, p, p), (1, p, p), (0, 0, 0)),
            "decode": shapes((1, 1, 1), (2, mid, length), (1, mid - 1, length - 1)),
        }


def build_engine(onnx_path: Path, config: GPTBigCodeConfig, out: Path, limits: Limits, precision: str) -> dict:
    """Build `out/model.plan` (and its timing cache) from the plain graph; returns the manifest's "tensorrt" entry."""
    trt = require_tensorrt()
    if precision not in PRECISIONS:
        raise UserError(f"unsupported TensorRT precision {precision!r} (supported: {', '.join(PRECISIONS)})")
    limits.check(config)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT's ONNX parser rejected the graph: {errors[:500]}")
    build = builder.create_builder_config()
    if precision == "fp16":
        build.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        build.set_flag(trt.BuilderFlag.BF16)
    if precision != "fp32":
        # LayerNorm statistics and softmax stay in fp32, as in the ONNX Runtime graphs.
        build.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX):
                layer.precision = trt.float32
                layer.set_output_type(0, trt.float32)
    profiles = limits.profiles(config)
    for shapes in profiles.values():
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        build.add_optimization_profile(profile)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / TIMING_CACHE
    timing_cache = build.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    build.set_timing_cache(timing_cache, ignore_mismatch=False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, build)
    if serialized is None:
        raise UserError("TensorRT could not build an engine from the graph (see its log above)")
    (out / ENGINE_FILE).write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(timing_cache.serialize()))
    return {
        "engine": f"{ENGINE_DIR}/{ENGINE_FILE}",
        "timing_cache": f"{ENGINE_DIR}/{TIMING_CACHE}",
        "tensorrt": trt.__version__,
        "precision": precision,
        "limits": asdict(limits),
        "profiles": profiles,
        "build_s": round(time.perf_counter() - start, 1),
    }


def build_engine_in_place(export_dir: Path, limits: Limits, precision: str, overwrite: bool) -> dict[str, Any]:
    """`starcast build-engine`: add `trt/` to an export. The engine is built in a temporary folder and renamed
    into place, and the manifest is replaced atomically, so a failed build leaves the export as it was."""
    import shutil
    import tempfile

    from starcast.exporter.manifest import read_manifest, verify_files, write_manifest

    require_tensorrt()
    folder = export_dir.expanduser().absolute()
    manifest = read_manifest(folder)
    if (folder / ENGINE_DIR).exists() and not overwrite:
        raise UserError(f"{folder}: already has a TensorRT engine (pass --overwrite to rebuild it)")
    verify_files(folder, manifest)
    config = GPTBigCodeConfig.from_hf_dict(manifest["config"])
    tmp = Path(tempfile.mkdtemp(prefix=".trt.tmp-", dir=folder))
    try:
        entry = build_engine(folder / manifest.get("model", "model.onnx"), config, tmp, limits, precision)
        shutil.rmtree(folder / ENGINE_DIR, ignore_errors=True)
        tmp.rename(folder / ENGINE_DIR)
        manifest["tensorrt"] = entry
        write_manifest(folder, manifest)  # hashes every file, the engine included; replaced atomically
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
