"""The TensorRT code against both API generations, without TensorRT (it cannot be installed here).

Each fake below offers exactly the names the builder and backend may touch in that generation (from TensorRT's
own Python bindings, 10.16 and 11.1: weak-typing flags such as BuilderFlag.FP16 and
OBEY_PRECISION_CONSTRAINTS exist in 10 and are gone in 11; NetworkDefinitionCreationFlag.STRONGLY_TYPED is
bit 1 in 10 and bit 0 in 11). A name the code uses that a generation lacks fails the test. What stays unrun:
building and running a real engine, which needs TensorRT and a GPU.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from conftest import save_hf_checkpoint

from starcast.contract.config import GPTBigCodeConfig
from starcast.contract.errors import InvalidValue, UserError
from starcast.pipeline.engine import build_engine_in_place
from starcast.pipeline.export import export
from starcast.runtime.tensorrt.builder import Limits, build_engine


class Strict:
    """An object with exactly the given attributes: anything else is an AttributeError, as a removed API is."""

    def __init__(self, **names):
        self.__dict__.update(names)


def fake_tensorrt(major: int, calls: dict) -> types.ModuleType:
    flags = {"STRONGLY_TYPED": 1, "EXPLICIT_BATCH": 0} if major == 10 else {"STRONGLY_TYPED": 0}
    builder_flags = {"FP16": 0, "BF16": 1, "OBEY_PRECISION_CONSTRAINTS": 2} if major == 10 else {"DIRECT_IO": 3}

    def create_network(flags: int):
        calls["network_flags"] = flags
        return Strict()

    def create_optimization_profile():
        profile = {}
        calls.setdefault("profiles", []).append(profile)
        return Strict(set_shape=lambda name, low, opt, high: profile.__setitem__(name, (low, opt, high)))

    def create_timing_cache(data: bytes):
        calls.setdefault("timing_caches_given", []).append(bytes(data))
        return Strict(serialize=lambda: b"cache:" + bytes(data)[-8:] + b"+new")

    config = Strict(
        add_optimization_profile=lambda profile: None,
        create_timing_cache=create_timing_cache,
        set_timing_cache=lambda cache, ignore_mismatch: True,
    )
    builder = Strict(
        create_network=create_network,
        create_builder_config=lambda: config,
        create_optimization_profile=create_optimization_profile,
        build_serialized_network=lambda network, build: b"engine bytes",
    )

    def parser(network, logger):
        return Strict(parse_from_file=lambda path: calls.__setitem__("parsed", path) or True, num_errors=0)

    def engine_profile_shape(name, profile):
        shapes = {("input_ids", 0): [(1, 1), (2, 16), (2, 16)], ("attention_mask", 1): [(1, 2), (2, 32), (2, 64)]}
        return shapes[name, profile]

    engine = Strict(get_tensor_profile_shape=engine_profile_shape, num_optimization_profiles=2)
    module = types.ModuleType("tensorrt")
    module.__dict__.update(
        __version__=f"{major}.1.0.1",
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Builder=lambda logger: builder,
        OnnxParser=parser,
        NetworkDefinitionCreationFlag=Strict(**flags),
        BuilderFlag=Strict(**builder_flags),
        Runtime=lambda logger: Strict(deserialize_cuda_engine=lambda data: engine),
    )
    return module


@pytest.fixture
def plain_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-api")
    folder, _ = save_hf_checkpoint(root / "ckpt")
    export(str(folder), root / "out", fuse_target=None)
    return root / "out"


@pytest.mark.parametrize("major, flags", [(10, 1 << 1), (11, 1 << 0)])
def test_the_builder_uses_a_strongly_typed_network_in_both_generations(
    monkeypatch, plain_export, tmp_path, major, flags
):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(major, calls))
    config = GPTBigCodeConfig.from_file(plain_export / "config.json")
    entry = build_engine(plain_export / "model.onnx", config, tmp_path / "trt", Limits(2, 16, 64), b"")
    assert calls["network_flags"] == flags  # STRONGLY_TYPED, looked up by name
    prompt, decode = calls["profiles"]
    assert prompt["input_ids"] == ([1, 1], [2, 16], [2, 16]) and decode["attention_mask"][2] == [2, 64]
    assert (tmp_path / "trt" / "model.plan").read_bytes() == b"engine bytes"
    assert entry["strongly_typed"] and entry["tensorrt"] == f"{major}.1.0.1"


def test_other_tensorrt_versions_are_refused_in_one_line(monkeypatch, plain_export, tmp_path):
    module = fake_tensorrt(10, {})
    module.__version__ = "9.3.0"
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    with pytest.raises(UserError, match=r"TensorRT 9.3.0 is not supported"):
        build_engine(plain_export / "model.onnx", GPTBigCodeConfig(), tmp_path / "trt", Limits(1, 8, 16))


def test_a_rebuild_starts_from_the_previous_timing_cache(monkeypatch, plain_export):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(11, calls))
    build_engine_in_place(plain_export, Limits(2, 16, 64), overwrite=False)
    first = (plain_export / "trt" / "timing.cache").read_bytes()
    with pytest.raises(UserError, match="already has a TensorRT engine"):
        build_engine_in_place(plain_export, Limits(2, 16, 64), overwrite=False)
    build_engine_in_place(plain_export, Limits(2, 16, 64), overwrite=True)
    assert calls["timing_caches_given"] == [b"", first]
    manifest = json.loads((plain_export / "starcast.json").read_text())
    assert manifest["tensorrt"]["engine"] == "trt/model.plan" and "trt/timing.cache" in manifest["files"]


def test_generation_is_sized_by_the_engines_limits(monkeypatch, plain_export):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(10, {}))
    build_engine_in_place(plain_export, Limits(2, 16, 64), overwrite=False)
    from starcast.runtime.generator import Generator
    from starcast.runtime.tensorrt.steps import EngineLimits

    generator = Generator.from_pretrained(plain_export, provider="tensorrt")
    assert generator.max_length == 64  # the engine's, not the model's n_positions (128)
    with pytest.raises(InvalidValue, match="maximum length 64"):
        generator.generate(np.ones((1, 40), np.int64), max_new_tokens=30)
    limits = EngineLimits(2, 16, 64)
    with pytest.raises(UserError, match="batch <= 2, prompt <= 16"):
        limits.check(batch=3, prompt=8, max_length=32)
    with pytest.raises(UserError, match="prompt <= 16"):
        limits.check(batch=1, prompt=17, max_length=32)


def test_the_engine_is_deserialized_once_per_file(monkeypatch, plain_export):
    """The Generator reads the engine's limits and each batch size's TrtSteps runs it: one copy on the GPU."""
    calls: dict = {}
    module = fake_tensorrt(10, calls)
    runtime = module.Runtime(None)
    loads = []
    module.Runtime = lambda logger: Strict(deserialize_cuda_engine=lambda data: loads.append(data) or runtime
                                           .deserialize_cuda_engine(data))  # fmt: skip
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    build_engine_in_place(plain_export, Limits(2, 16, 64), overwrite=False)
    from starcast.contract.manifest import read_manifest
    from starcast.runtime.generator import Generator
    from starcast.runtime.tensorrt.steps import load_engine

    generator = Generator.from_pretrained(plain_export, provider="tensorrt")
    path = plain_export / read_manifest(plain_export).engine_file
    assert load_engine(path) is load_engine(path) and len(loads) == 1, generator.graph_note
