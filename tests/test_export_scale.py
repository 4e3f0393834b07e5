"""Export at scale: the exporter never holds the model, so its memory does not grow with the weights.

- The trace of StarCoder-15.5B's shape (31 GB of fp16 weights) runs in a subprocess in well under 1 GiB of
  anonymous memory: the graph is traced without the weights.
- A 100M-parameter fp32 export (410 MB of weights), plain + fused + int4, stays within issue 23's bound and
  peaks at most half its weights above what the same export of a 2-layer test model peaks at (imports, ONNX
  Runtime, PyTorch): a copy of the model anywhere in the pipeline (a protobuf, onnx_ir, the quantizer, an ONNX
  Runtime session) would exceed it.
- The streamed weights and reference equal the in-memory ones (the tiny-model proofs elsewhere stay as they were).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import assert_one_line, starcast

from starcast.contract.config import PRESETS, GPTBigCodeConfig
from starcast.exporter.checkpoint import load_model, open_checkpoint
from starcast.exporter.random_checkpoint import write_random_shards
from starcast.exporter.reference import StreamedReference
from starcast.runtime.memory import run_measured

MIB = 2**20
HUNDRED_M = GPTBigCodeConfig(vocab_size=8192, n_positions=1024, n_embd=768, n_layer=16, n_head=12)


def peak_of(*args: str) -> int:
    measured = run_measured([sys.executable, "-m", "starcast", *args])
    assert measured.returncode == 0, args
    return measured.peak_anon_bytes


def test_the_trace_of_a_15b_model_holds_none_of_its_weights():
    code = (
        "import torch; from starcast.contract.config import PRESETS; from starcast.exporter.trace import trace_graph;"
        "proto, refs = trace_graph(PRESETS['starcoder'], torch.float16);"
        "print(len(refs), sum(len(n.input) for n in proto.graph.node))"
    )
    measured = run_measured([sys.executable, "-c", code])
    assert measured.returncode == 0
    weights = 2 * PRESETS["starcoder"].parameter_count()
    assert weights > 30e9
    assert measured.peak_anon_bytes < 1024 * MIB, f"{measured.peak_anon_bytes / MIB:.0f} MiB"


@pytest.fixture(scope="module")
def hundred_m(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    write_random_shards(folder / "small", PRESETS["test"], torch.float32)
    write_random_shards(folder / "100m", HUNDRED_M, torch.float32, shard_bytes=150 * MIB)
    return folder


def test_a_100m_export_peaks_within_a_quarter_of_its_weights_above_a_tiny_one(hundred_m):
    weights = 4 * HUNDRED_M.parameter_count()
    assert weights > 390 * MIB
    for extra in ([], ["--quantize", "int4"]):
        baseline = peak_of("export", str(hundred_m / "small"), str(hundred_m / "small-out"), "--overwrite", *extra)
        peak = peak_of("export", str(hundred_m / "100m"), str(hundred_m / "out"), "--overwrite", *extra)
        assert peak <= 0.25 * weights + 1024 * MIB  # issue 23's bound
        # stricter: above the tiny export, a copy of the model (`weights`) anywhere would exceed half of it; what
        # may be there is a quantized graph's prepacked weights (an eighth of fp32 ones) and activations
        assert peak - baseline <= 0.5 * weights, f"{extra}: {(peak - baseline) / MIB:.0f} MiB above the tiny export"
        manifest = json.loads((hundred_m / "out" / "starcast.json").read_text())
        if not extra:  # large enough for the low-memory proof form, and the manifest says it ran
            assert manifest["parity"]["session"] == manifest["fused"]["parity"]["session"] == "low-memory"
    # int8 activations (the fast kernel) fit the bound here, so the quantized graphs are proven as they run
    assert manifest["quantization"]["accuracy_level"] == 4 and manifest["fused"]["parity"]["session"] == "default"
    assert manifest["quantization"]["accuracy"]["agreement_form"] == "teacher-forced"


def test_the_streamed_reference_computes_what_the_loaded_model_computes(hundred_m):
    checkpoint = open_checkpoint(str(hundred_m / "small"))
    loaded = load_model(checkpoint)
    streamed = StreamedReference(checkpoint, torch.float32)
    ids = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = loaded(ids, mask, positions, *loaded.empty_past(2))
    ours = streamed(ids, mask, positions, *streamed.empty_past(2))
    for a, b in zip(ours, expected, strict=True):
        assert torch.equal(a, b)


def test_a_quantized_checkpoint_is_refused_before_anything_is_written(tmp_path):
    """Integer weights (a GPTQ-style checkpoint) are refused from the safetensors header, with one line."""
    from safetensors.torch import save_file

    folder = write_random_shards(tmp_path / "ckpt", PRESETS["test"], torch.float32)
    shard = next(folder.glob("*.safetensors"))
    save_file({"transformer.h.0.attn.c_attn.qweight": torch.zeros(4, 4, dtype=torch.int32)}, str(shard))
    assert_one_line(starcast("export", folder, tmp_path / "out"), 2, "is I32", "quantized checkpoint")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name != "ckpt"] == []
