"""Weight-only quantization: every linear layer becomes MatMulNBits, accuracy is measured, bad input is refused."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import CORPUS, left_padded_batch, save_checkpoint_with_tokenizer

from starcast.contract.errors import UserError
from starcast.contract.manifest import file_hashes
from starcast.pipeline.derive import quantize_export
from starcast.pipeline.export import export
from starcast.pipeline.progress import QUIET
from starcast.runtime.generator import Generator


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    folder, _ = save_checkpoint_with_tokenizer(root / "ckpt")
    export(str(folder), root / "out", fuse_target="cuda")
    export(str(folder), root / "out-cpu", fuse_target="cpu")
    (root / "eval.txt").write_text("".join(CORPUS) * 8)
    return root


@pytest.mark.parametrize("quantization", ["int8", "int4", "int8-dynamic"])
def test_quantized_graphs_run_and_record_accuracy(source, tmp_path, quantization):
    folder = source / ("out-cpu" if quantization == "int8-dynamic" else "out")  # a kernel without CUDA: cpu-fused
    before = file_hashes(folder)
    manifest = quantize_export(folder, tmp_path / "q", quantization, 32, source / "eval.txt", False, QUIET)
    assert file_hashes(folder) == before  # the source export is untouched
    quant = manifest.quantization
    n_layer = manifest.config.n_layer
    assert quant["graphs"] == {  # every linear layer; the biases the fused graph did not take into its own ops
        "model.onnx": {"quantized_matmuls": 4 * n_layer + 1, "biases_folded": 4 * n_layer},
        "fused.onnx": {"quantized_matmuls": 4 * n_layer + 1, "biases_folded": n_layer},
    }
    accuracy = quant["accuracy"]
    assert accuracy["eval_tokens"] >= 128 and accuracy["perplexity_float"] > 1
    assert accuracy["agreement_steps"] > 32 and 0 <= accuracy["top1_agreement"] <= 1
    assert quant["format"] == ("DynamicQuantizeMatMul" if quantization == "int8-dynamic" else "MatMulNBits")
    if quantization == "int8":
        assert accuracy["top1_agreement"] >= 0.95 and abs(accuracy["perplexity_increase"]) < 0.01
    if quantization == "int8-dynamic":  # activations per tensor: coarser on this random model's outliers
        assert accuracy["top1_agreement"] >= 0.75 and abs(accuracy["perplexity_increase"]) < 0.05
    recorded = json.loads((tmp_path / "q" / "starcast.json").read_text())["quantization"]
    assert recorded == json.loads(json.dumps(quant))
    proto = onnx.load(str(tmp_path / "q" / "model.onnx"))
    weights = {i.name for i in proto.graph.initializer}
    assert not [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    ids, mask = left_padded_batch(manifest.config.vocab_size, [6, 3])
    for graph in ("plain", "fused"):
        out = Generator.from_pretrained(tmp_path / "q", graph=graph).generate(ids, mask, max_new_tokens=8)
        assert out.shape == (2, 14)
    plain = Generator.from_pretrained(tmp_path / "q", graph="plain").generate(ids, mask, max_new_tokens=8)
    fused = Generator.from_pretrained(tmp_path / "q", graph="fused").generate(ids, mask, max_new_tokens=8)
    np.testing.assert_array_equal(plain, fused)


def test_bad_quantization_requests_are_refused(source, tmp_path):
    with pytest.raises(UserError, match="quantization 'int3'"):
        quantize_export(source / "out", tmp_path / "a", "int3", 32, None, False, QUIET)
    with pytest.raises(UserError, match="CPU only"):
        quantize_export(source / "out", tmp_path / "a", "int8-dynamic", 32, None, False, QUIET)
    with pytest.raises(UserError, match="block size 48"):
        quantize_export(source / "out", tmp_path / "a", "int4", 48, None, False, QUIET)
    (tmp_path / "short.txt").write_text("x = 1\n")
    with pytest.raises(UserError, match="too short"):
        quantize_export(source / "out", tmp_path / "a", "int4", 32, tmp_path / "short.txt", False, QUIET)
    assert not (tmp_path / "a").exists()
    quantize_export(source / "out", tmp_path / "q", "int4", 32, None, False, QUIET)
    with pytest.raises(UserError, match="already quantized"):
        quantize_export(tmp_path / "q", tmp_path / "b", "int8", 32, None, False, QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "short.txt"]
