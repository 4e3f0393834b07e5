"""A proof fails when it should: NaN is a failure, a config that does not describe the weights is an error,
`check` re-proves every graph against its recorded tolerance, and options that would produce garbage are
either honoured or refused."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import (
    CORPUS,
    assert_one_line,
    copy_export,
    left_padded_batch,
    rehash,
    save_checkpoint_with_tokenizer,
    save_hf_checkpoint,
    starcast,
)
from safetensors.torch import load_file, save_file

from starcast.contract.errors import InvalidType, InvalidValue
from starcast.pipeline.proof import GreedyReport, ParityReport, error
from starcast.runtime.generator import Generator


def test_nan_and_infinity_are_failures_not_numbers():
    ours, reference = np.ones((2, 3)), np.ones((2, 3))
    assert error("abs", ours, reference) == 0.0
    ours[1, 2] = np.nan
    assert error("abs", ours, reference) == float("inf") and error("rel", reference, ours) == float("inf")
    assert not ParityReport("fp32", "abs", 1e-4, float("nan"), 0.0).passed
    assert not ParityReport("fp32", "abs", 1e-4, error("abs", ours, reference), 0.0).passed
    assert not GreedyReport("fused", "abs", 1e-4, float("inf"), 8, True).passed
    assert "NaN" in ParityReport("fp32", "abs", 1e-4, float("inf"), 0.0).summary()


def test_nan_weights_are_named_as_such(tmp_path):
    folder, _ = save_hf_checkpoint(tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    state["transformer.h.1.mlp.c_fc.bias"][3] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    assert_one_line(starcast("export", folder, tmp_path / "out"), 2, "contains NaN", "h.1.mlp.c_fc.bias")
    assert not (tmp_path / "out").exists()


def test_a_graph_that_computes_nan_fails_check(small_export, tmp_path):
    """Tampered weights (hashes updated to match): the fused graph now yields NaN, and check says so (exit 1)."""
    folder = copy_export(small_export, tmp_path / "export")
    proto = onnx.load(str(folder / "fused.onnx"))
    norm = next(t for t in proto.graph.initializer if t.dims == [32] and "ln_f" in t.name)
    values = np.frombuffer(norm.raw_data, np.float32).copy()
    values[0] = np.nan
    norm.raw_data = values.tobytes()
    onnx.save(proto, str(folder / "fused.onnx"))
    rehash(folder)
    line = assert_one_line(starcast("check", folder), 1, "NaN")
    assert line.startswith("starcast: proof failed")


def test_a_config_with_fewer_layers_than_the_weights_is_refused(tmp_path):
    folder, _ = save_hf_checkpoint(tmp_path / "ckpt", n_layer=3)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": 2}))
    assert_one_line(starcast("export", folder, tmp_path / "out"), 2, "does not use", "transformer.h.2")


def test_older_checkpoints_with_mask_buffers_still_export(tmp_path):
    folder, _ = save_hf_checkpoint(tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    for layer in range(2):
        state[f"transformer.h.{layer}.attn.bias"] = torch.tril(torch.ones(128, 128, dtype=torch.bool))
        state[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    result = starcast("export", folder, tmp_path / "out", "--no-fuse")
    assert result.returncode == 0, result.stderr


def test_check_reproves_the_fused_graph_and_refuses_a_manifest_without_files(small_export, tmp_path):
    folder = copy_export(small_export, tmp_path / "export")
    result = starcast("check", folder)
    assert result.returncode == 0, result.stderr
    assert "fused parity ok" in result.stdout and "reference parity not re-run" in result.stdout
    manifest = json.loads((folder / "starcast.json").read_text())
    del manifest["files"]
    (folder / "starcast.json").write_text(json.dumps(manifest))
    assert_one_line(starcast("check", folder), 2, "files")
    manifest["files"] = {}
    (folder / "starcast.json").write_text(json.dumps(manifest))
    assert_one_line(starcast("check", folder), 2)


def test_check_passes_on_a_quantized_export_it_made(tmp_path):
    folder, _ = save_checkpoint_with_tokenizer(tmp_path / "ckpt")
    (tmp_path / "eval.txt").write_text("".join(CORPUS) * 8)
    assert starcast("export", folder, tmp_path / "out").returncode == 0
    result = starcast(
        "quantize", tmp_path / "out", tmp_path / "q", "--quantize", "int4", "--eval-text", tmp_path / "eval.txt"
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "q" / "starcast.json").read_text())
    # the quantized graph's proof is against its recorded logits; the float graph's proof is kept, with its own
    # tolerance: no tolerance widened by the quantization's distance
    parity = manifest["parity"]
    assert parity["against"] == "recorded logits" and parity["tolerance"] == 2e-2 and parity["quantized_vs_float"] > 0
    assert parity["float_graph_proof"]["tolerance"] == 1e-4 and parity["float_graph_proof"]["passed"]
    assert manifest["quantization"]["recorded_logits"] in manifest["files"]
    assert manifest["quantization"]["accuracy_level"] == 4  # a small model: the fast kernel, proven as it runs
    result = starcast("check", tmp_path / "q", "--source", folder)
    assert result.returncode == 0, result.stderr
    assert "fused parity ok" in result.stdout and "recorded-logits parity" in result.stdout
    assert "reference parity of the float graph before quantization" in result.stdout


def test_check_fails_a_quantized_graph_that_no_longer_computes_its_recorded_logits(tmp_path):
    """The quantized proof can fail: logits 10% off (as a changed graph would give) with a manifest whose hashes
    agree are a failed proof, exit 1; so are recorded decode tokens of the wrong shape."""
    import hashlib

    import numpy as np

    folder, _ = save_checkpoint_with_tokenizer(tmp_path / "ckpt")
    assert starcast("export", folder, tmp_path / "out", "--quantize", "int4").returncode == 0
    export = tmp_path / "out"
    manifest = json.loads((export / "starcast.json").read_text())
    name = manifest["quantization"]["recorded_logits"]
    with np.load(export / name) as archive:
        recorded = dict(archive)
    assert starcast("check", export).returncode == 0
    for logits, next_ids in ((recorded["logits"] * 1.1, recorded["next_ids"]), (recorded["logits"], np.zeros(3))):
        with (export / name).open("wb") as handle:
            np.savez(handle, logits=logits, next_ids=next_ids)
        manifest["files"][name] = hashlib.sha256((export / name).read_bytes()).hexdigest()
        (export / "starcast.json").write_text(json.dumps(manifest))
        result = starcast("check", export)
        assert result.returncode == 1, result.stderr
        assert "recorded-logits parity" in result.stderr and "FAILED" in result.stderr


def test_corrupt_side_files_are_refused_at_export(tmp_path):
    folder, _ = save_checkpoint_with_tokenizer(tmp_path / "ckpt")
    good = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text(good[: len(good) // 2])
    assert_one_line(starcast("export", folder, tmp_path / "out"), 2, "tokenizer.json")
    (folder / "tokenizer.json").write_text(good)
    (folder / "generation_config.json").write_text('{"eos_token_id": "end"')
    assert_one_line(starcast("export", folder, tmp_path / "out"), 2, "generation_config.json")
    (folder / "generation_config.json").write_text('{"eos_token_id": "end"}')
    assert_one_line(starcast("export", folder, tmp_path / "out"), 2, "eos_token_id")
    assert not (tmp_path / "out").exists()


def test_generating_from_ids_needs_no_tokenizer(small_export, tmp_path):
    folder = copy_export(small_export, tmp_path / "export")
    (folder / "tokenizer.json").write_text("{ not json")
    result = starcast("generate", folder, "--ids", "5,6,7", "--max-new-tokens", "3")
    assert result.returncode == 0 and len(result.stdout.strip().split(",")) == 6, result.stderr
    assert_one_line(starcast("generate", folder, "--prompt", "def"), 2, "tokenizer.json")


@pytest.mark.parametrize(
    "option, value",
    [("--temperature", "nan"), ("--temperature", "inf"), ("--repetition-penalty", "nan"), ("--top-p", "nan")],
)
def test_nan_sampling_options_are_refused(small_export, option, value):
    assert_one_line(starcast("generate", small_export, "--ids", "1,2", "--do-sample", option, value), 2)


EXTREMES = [  # every sampling option at both edges of what it accepts
    dict(temperature=1e-39), dict(temperature=5e-324), dict(temperature=1e300), dict(top_p=1e-300),
    dict(top_p=5e-324), dict(top_p=1.0), dict(top_k=1), dict(top_k=10**9), dict(repetition_penalty=1e-300),
    dict(repetition_penalty=5e-324), dict(repetition_penalty=1e300), dict(seed=0), dict(seed=2**128),
    dict(temperature=1e-39, top_p=1e-300, top_k=1, repetition_penalty=1e-300),
]


def test_sampling_at_the_extremes_of_every_option_is_never_nan_nor_token_zero(small_export):
    generator = Generator.from_pretrained(small_export)
    ids = np.asarray([generator.tokenizer.encode("def add(a, b):\n")], np.int64)
    greedy = generator.generate(ids, max_new_tokens=4, eos_token_id=None)[0, ids.shape[1] :]
    assert 0 not in greedy.tolist()  # this prompt does not end at once: a 0 below would be a NaN pick
    with np.errstate(invalid="raise"):  # no NaN made anywhere in sampling
        for options in EXTREMES:
            out = generator.generate(ids, max_new_tokens=4, eos_token_id=None, do_sample=True, **options)
            new = out[0, ids.shape[1] :].tolist()
            assert 0 not in new and all(0 <= t < generator.config.vocab_size for t in new), (options, new)
            edge = options.get("temperature", 1) < 1e-30 or options.get("top_p", 1) < 1e-30 or options.get("top_k") == 1
            if edge and "repetition_penalty" not in options:
                assert new == greedy.tolist(), options  # the limit of these is the likeliest token


def test_nan_or_infinite_logits_are_an_error_never_a_pick():
    from starcast.runtime.sampling import NonFiniteLogits, SamplingOptions, TokenChooser

    logits = np.linspace(-3, 3, 2 * 96, dtype=np.float32).reshape(2, 96)
    for bad in (np.nan, np.inf, -np.inf):
        broken = logits.copy()
        broken[1, 5] = bad
        for options in (SamplingOptions(), SamplingOptions(do_sample=True, seed=1)):
            with pytest.raises(NonFiniteLogits, match="batch row 1"):
                TokenChooser(options)(broken, np.zeros((2, 1), np.int64))


def test_api_refuses_right_padding_and_honours_a_single_stop_string(small_export):
    generator = Generator.from_pretrained(small_export)
    ids, mask = left_padded_batch(generator.config.vocab_size, [5, 3])
    with pytest.raises(InvalidValue, match="pad on the left"):
        generator.generate(ids, mask[:, ::-1].copy())
    with pytest.raises(InvalidValue, match="only 0"):
        generator.generate(ids, mask * 2)
    full = generator.generate_text("def add(a, b):\n", max_new_tokens=24)
    stop = full[len(full) // 2 :][:2]
    assert generator.generate_text("def add(a, b):\n", max_new_tokens=24, stop_strings=stop) == full[: full.find(stop)]
    with pytest.raises(InvalidType, match="stop strings"):
        generator.generate_text("def", stop_strings=[1, 2])


def test_a_different_greedy_token_fails_unless_it_is_a_tie_within_the_tolerance():
    from starcast.pipeline.proof import real_disagreement

    logits = np.array([[0.0, 5.0, 4.99995], [1.0, 0.0, 0.0]])
    assert not real_disagreement(logits, np.array([1, 0]), "abs", 1e-4)
    assert not real_disagreement(logits, np.array([2, 0]), "abs", 1e-4)  # 5e-5 apart: a tie at this tolerance
    assert real_disagreement(logits, np.array([2, 0]), "abs", 1e-6)
    assert real_disagreement(logits, np.array([1, 1]), "abs", 1e-4)  # row 1: 1.0 apart
