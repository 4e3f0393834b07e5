"""The generation runtime: greedy ids equal transformers' generate(), sampling, stop strings, streaming, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import left_padded_batch, save_checkpoint_with_tokenizer, save_hf_checkpoint

from starcast.contract.errors import UserError
from starcast.pipeline.export import export
from starcast.runtime.generator import Generator
from starcast.runtime.text import StreamDecoder, Tokenizer

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(multi_query, target) -> (export folder, transformers model)."""
    root = tmp_path_factory.mktemp("runtime")
    made = {}
    for multi_query in (True, False):
        folder, hf = save_hf_checkpoint(root / f"ckpt-{multi_query}", multi_query=multi_query)
        for target in ("cpu", "cuda"):
            out = root / f"export-{multi_query}-{target}"
            export(str(folder), out, fuse_target=target)
            made[multi_query, target] = out, hf
    return made


def transformers_greedy(hf, ids, mask):
    with torch.no_grad():
        return hf.generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        ).numpy()


@pytest.mark.parametrize("graph", ["plain", "fused"])
@pytest.mark.parametrize("target", ["cpu", "cuda"])
@pytest.mark.parametrize("multi_query", [True, False])
def test_greedy_ids_equal_transformers_generate(exports, multi_query, target, graph):
    folder, hf = exports[multi_query, target]
    generator = Generator.from_pretrained(folder, graph=graph)
    expected_interface = "static-cache" if (graph, target) == ("fused", "cuda") else "concat-cache"
    assert generator.interface == expected_interface
    for lengths in ([9], [7, 4, 2]):
        ids, mask = left_padded_batch(96, lengths)
        out = generator.generate(ids, mask, max_new_tokens=NEW_TOKENS)
        assert out.dtype == np.int64 and out.shape == (len(lengths), max(lengths) + NEW_TOKENS)
        np.testing.assert_array_equal(out, transformers_greedy(hf, ids, mask))


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_cache_is_allocated_once_and_written_in_place(exports, target):
    folder, _ = exports[True, target]
    generator = Generator.from_pretrained(folder, graph="fused")
    ids, mask = left_padded_batch(96, [5, 3])
    steps = generator.steps(2)
    base, value = steps.cache.buffer.base, steps.cache.buffer.value
    assert not value.numpy().any()
    bound = []
    original_bind = steps.cache.buffer.bind_output

    def spy(binding, name, part, shape):
        bound.append(steps.cache.buffer.address(part))
        original_bind(binding, name, part, shape)

    steps.cache.buffer.bind_output = spy
    generator.generate(ids, mask, max_new_tokens=10)
    generator.generate(ids, mask, max_new_tokens=10)
    assert generator.steps(2) is steps and steps.cache.buffer.base == base and value.data_ptr() == base
    assert value.numpy().any()  # ONNX Runtime wrote the cache into our buffer, not into memory of its own
    end = base + value.numpy().nbytes
    assert bound and all(base <= address < end for address in bound)


def test_sampling_is_reproducible_with_a_seed(exports):
    generator = Generator.from_pretrained(exports[True, "cpu"][0])
    ids, mask = left_padded_batch(96, [6, 3])
    options = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2)
    first = generator.generate(ids, mask, max_new_tokens=20, seed=7, **options)
    assert np.array_equal(first, generator.generate(ids, mask, max_new_tokens=20, seed=7, **options))
    others = [generator.generate(ids, mask, max_new_tokens=20, seed=s, **options) for s in (8, 9)]
    assert any(not np.array_equal(first, other) for other in others)
    greedy = generator.generate(ids, mask, max_new_tokens=20)
    assert not np.array_equal(first, greedy)


def test_eos_ends_rows_like_transformers(exports):
    folder, hf = exports[True, "cpu"]
    generator = Generator.from_pretrained(folder)
    ids, mask = left_padded_batch(96, [7, 4, 2])
    greedy = generator.generate(ids, mask, max_new_tokens=12)
    eos = int(greedy[1, ids.shape[1] + 3])  # a token row 1 produces at its 4th step
    out = generator.generate(ids, mask, max_new_tokens=12, eos_token_id=eos)
    with torch.no_grad():
        expected = hf.generate(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        ).numpy()
    np.testing.assert_array_equal(out, expected)


@pytest.fixture(scope="module")
def text_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    folder, _ = save_checkpoint_with_tokenizer(root / "ckpt")
    export(str(folder), root / "out", fuse_target="cuda")
    return root / "out"


def test_stream_joined_equals_text_and_stop_strings_cut_before(text_export):
    generator = Generator.from_pretrained(text_export)
    prompt = "def add(a, b):\n"
    pieces = list(generator.stream(prompt, max_new_tokens=40))
    full = generator.generate_text(prompt, max_new_tokens=40)
    assert "".join(pieces) == full and len(pieces) > 1
    ids = generator.generate(np.array([generator.tokenizer.encode(prompt)]), max_new_tokens=40)[0]
    eos = generator.eos_token_id
    new = [t for t in ids[len(generator.tokenizer.encode(prompt)) :]]
    new = new[: new.index(eos)] if eos in new else new
    assert full == generator.tokenizer.decode(new)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop and len(stop) == 2
    cut = generator.generate_text(prompt, max_new_tokens=40, stop_strings=[stop])
    assert cut == full[: full.find(stop)] and stop not in cut
    assert "".join(generator.stream(prompt, max_new_tokens=40, stop_strings=[stop])) == cut
    assert generator.generate_texts([prompt, "class"], max_new_tokens=40, stop_strings=[stop])[0] == cut


def test_stream_decoder_never_splits_multibyte_characters(text_export):
    tokenizer = Tokenizer(text_export / "tokenizer.json")
    text = "print('héllo wörld, 中文, naïve café 😀')"
    ids = tokenizer.encode(text)
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_fill_in_the_middle_prompt(text_export):
    generator = Generator.from_pretrained(text_export)
    prefix, suffix = "def add(a, b):\n", "\n    return c\n"
    prompt = generator.tokenizer.fim_prompt(prefix, suffix)
    assert prompt == f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
    ids = generator.tokenizer.encode(prompt)
    assert ids[0] == generator.tokenizer.token_id("<fim_prefix>")
    greedy = generator.generate([ids], max_new_tokens=8)[0, len(ids) :].tolist()
    greedy = greedy[: greedy.index(generator.eos_token_id)] if generator.eos_token_id in greedy else greedy
    assert generator.fill_in_the_middle(prefix, suffix, max_new_tokens=8) == generator.tokenizer.decode(greedy)


def test_santacoder_spelling_of_the_fim_tokens(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    specials = ["<|endoftext|>", "<fim-prefix>", "<fim-middle>", "<fim-suffix>", "<fim-pad>"]
    inner = HFTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.add_special_tokens(specials)
    inner.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer(tmp_path / "tokenizer.json")
    assert tokenizer.fim_prompt("a", "b") == "<fim-prefix>a<fim-suffix>b<fim-middle>"
    inner = HFTokenizer(models.BPE())
    inner.add_special_tokens(["<|endoftext|>"])
    inner.save(str(tmp_path / "plain.json"))
    with pytest.raises(UserError, match="no fill-in-the-middle tokens"):
        Tokenizer(tmp_path / "plain.json").fim_prompt("a", "b")


def test_bad_inputs_are_clear_errors(exports, tmp_path):
    folder, _ = exports[True, "cuda"]
    generator = Generator.from_pretrained(folder, max_length=32)
    with pytest.raises(UserError, match="maximum length 32"):
        generator.generate(np.zeros((1, 40), np.int64), max_new_tokens=1)
    with pytest.raises(UserError, match="the cache would overflow"):
        generator.generate(np.zeros((1, 10), np.int64), max_new_tokens=30)
    with pytest.raises(UserError, match="non-empty"):
        generator.generate(np.zeros((1, 0), np.int64))
    with pytest.raises(UserError, match="outside the vocabulary"):
        generator.generate(np.array([[1, 2, 96]]))
    with pytest.raises(UserError, match="all zeros"):
        generator.generate(np.array([[1, 2]]), np.array([[0, 0]]))
    with pytest.raises(UserError, match="no tokenizer"):
        generator.generate_text("hello")
    with pytest.raises(UserError, match="max_length"):
        Generator.from_pretrained(folder, max_length=10_000)
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(folder), str(broken)], check=True)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(UserError, match="does not match"):
        Generator.from_pretrained(broken)
    (broken / "fused.onnx").unlink()
    with pytest.raises(UserError, match="fused.onnx is missing"):
        Generator.from_pretrained(broken)


def test_cuda_provider_that_cannot_load_is_an_error_not_a_fallback(exports):
    import onnxruntime as ort

    from starcast.runtime.session import SessionOptions, create_session

    folder, _ = exports[True, "cuda"]
    try:
        session = create_session(folder / "model.onnx", SessionOptions("cuda"))
    except UserError as exc:
        assert "provider 'cuda'" in str(exc) and "\n" not in str(exc)
        return
    assert "CUDAExecutionProvider" in session.get_providers(), ort.get_device()  # a real GPU: it must be used


def test_generate_cli(text_export):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "starcast", "generate", str(text_export), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    plain = run("--prompt", "def add(a, b):\n", "--max-new-tokens", "16")
    streamed = run("--prompt", "def add(a, b):\n", "--max-new-tokens", "16", "--stream")
    assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
    assert plain.stdout == streamed.stdout
    ids = run("--ids", "5,6,7", "--max-new-tokens", "4")
    assert ids.returncode == 0 and len(ids.stdout.strip().split(",")) == 7
    fim = run("--prompt", "def f(", "--fim-suffix", "):\n", "--max-new-tokens", "4")
    assert fim.returncode == 0, fim.stderr
    bad = run("--ids", "5,x")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("starcast: error:")


def test_runtime_drives_an_optimum_export(tmp_path):
    pytest.importorskip("optimum.onnxruntime")
    from optimum.onnxruntime import ORTModelForCausalLM

    folder, hf = save_hf_checkpoint(tmp_path / "ckpt")
    ORTModelForCausalLM.from_pretrained(folder, export=True).save_pretrained(tmp_path / "optimum")
    generator = Generator.from_pretrained(tmp_path / "optimum")
    ids, mask = left_padded_batch(96, [7, 4, 2])
    np.testing.assert_array_equal(
        generator.generate(ids, mask, max_new_tokens=NEW_TOKENS), transformers_greedy(hf, ids, mask)
    )
