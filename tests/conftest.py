"""Tiny random GPTBigCode checkpoints, written by transformers itself, for every test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPTBigCodeConfig as HFConfig
from transformers import GPTBigCodeForCausalLM

TINY = dict(vocab_size=96, n_positions=128, n_embd=32, n_layer=2, n_head=4)

# name -> GPTBigCodeConfig overrides; together they cover every field that changes the math.
VARIANTS = {
    "mq-tanh-tied": dict(multi_query=True, activation_function="gelu_pytorch_tanh"),
    "mh-tanh-tied": dict(multi_query=False, activation_function="gelu_pytorch_tanh"),
    "mq-untied": dict(multi_query=True, tie_word_embeddings=False),
    "mh-untied": dict(multi_query=False, tie_word_embeddings=False),
    "mq-gelu": dict(activation_function="gelu"),
    "mq-gelu_new": dict(activation_function="gelu_new"),
    "mq-gelu_fast": dict(activation_function="gelu_fast"),
    "mq-relu": dict(activation_function="relu"),
    "mq-unscaled-inner-eps": dict(scale_attn_weights=False, n_inner=48, layer_norm_epsilon=1e-3),
}


def make_hf_model(seed: int = 0, **overrides) -> GPTBigCodeForCausalLM:
    """A transformers GPTBigCode with weights large enough that the logits are O(1), not O(0.01)."""
    torch.manual_seed(seed)
    config = HFConfig(**{**TINY, **overrides}, attn_implementation="eager")
    model = GPTBigCodeForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model


def save_hf_checkpoint(folder: Path, seed: int = 0, **overrides) -> tuple[Path, GPTBigCodeForCausalLM]:
    model = make_hf_model(seed, **overrides)
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, GPTBigCodeForCausalLM]:
    return save_hf_checkpoint(tmp_path / "ckpt")


def left_padded_batch(vocab: int, lengths: list[int], seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of the given lengths, left-padded to the longest: (input_ids, attention_mask)."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    mask = np.zeros((len(lengths), width), dtype=np.int64)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = rng.integers(1, vocab, size=length)
        mask[row, width - length :] = 1
    return ids, mask


SPECIAL_TOKENS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "print('héllo wörld, 中文, naïve café 😀')\n",
    "for i in range(10):\n    print(i * i)\n",
]


def write_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer with StarCoder's special tokens; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer.get_vocab_size()


def save_checkpoint_with_tokenizer(folder: Path, **overrides) -> tuple[Path, GPTBigCodeForCausalLM]:
    vocab = write_tokenizer(folder)
    return save_hf_checkpoint(folder, vocab_size=vocab, bos_token_id=0, eos_token_id=0, **overrides)
