"""The shipped demo model: its files load, the ONNX export computes its held-out perplexity and its greedy
output exactly as the PyTorch reference does."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from starcast.contract.builtin import builtin_model_path, held_out_text
from starcast.exporter.checkpoint import load_model, open_checkpoint
from starcast.pipeline.accuracy import window_nll
from starcast.pipeline.export import export
from starcast.runtime.generator import Generator
from starcast.runtime.session import create_session
from starcast.runtime.text import Tokenizer

EVAL_TOKENS = 512


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin") / "out"
    export("builtin:tiny-python", out, fuse_target="cpu")
    return out


def test_shipped_files_load():
    folder = builtin_model_path("tiny-python")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "MODEL_CARD.md"):
        assert (folder / name).is_file(), name
    checkpoint = open_checkpoint("builtin:tiny-python")
    assert (
        checkpoint.config.multi_query
        and checkpoint.config.vocab_size == Tokenizer(folder / "tokenizer.json").inner.get_vocab_size()
    )
    tokenizer = Tokenizer(folder / "tokenizer.json")
    for token in ("<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"):
        assert tokenizer.token_id(token) is not None
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == tokenizer.token_id(
        "<|endoftext|>"
    )


def test_held_out_perplexity_through_onnx_equals_pytorch(shipped):
    tokenizer = Tokenizer(shipped / "tokenizer.json")
    tokens = np.asarray(tokenizer.encode(held_out_text())[:EVAL_TOKENS], dtype=np.int64)
    assert len(tokens) == EVAL_TOKENS
    model = load_model(open_checkpoint("builtin:tiny-python"))
    with torch.no_grad():
        ids = torch.from_numpy(tokens[None, :-1])
        logits = model(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], *model.empty_past(1))[0]
        nll = torch.nn.functional.cross_entropy(logits[0].double(), torch.from_numpy(tokens[1:])).item()
    reference = math.exp(nll)
    total, count = window_nll(create_session(shipped / "model.onnx"), model.config, tokens, np.float32, EVAL_TOKENS)
    ours = math.exp(total / count)
    assert count == EVAL_TOKENS - 1
    assert abs(ours - reference) / reference < 1e-3, (ours, reference)
    assert reference < 400  # a trained model: a uniform guess over the 4096 tokens scores 4096


def test_fused_greedy_equals_pytorch_reference(shipped):
    tokenizer = Tokenizer(shipped / "tokenizer.json")
    prompt = tokenizer.encode("import os\n\n\ndef list_files(path):\n")
    model = load_model(open_checkpoint("builtin:tiny-python"))
    ids = torch.tensor([prompt])
    past, expected = model.empty_past(1), []
    with torch.no_grad():
        for _ in range(40):
            total = len(prompt) + len(expected)
            positions = torch.arange(total - ids.shape[1], total)[None]
            logits, *past = model(ids, torch.ones((1, total), dtype=torch.int64), positions, *past)
            expected.append(int(logits[0, -1].argmax()))
            ids = torch.tensor([[expected[-1]]])
    generator = Generator.from_pretrained(shipped, graph="fused")
    assert generator.graph_file == "fused.onnx"
    out = generator.generate(np.array([prompt]), max_new_tokens=40, eos_token_id=None)
    assert out[0, len(prompt) :].tolist() == expected
