"""Trains a byte-level BPE tokenizer of a given size on the Python standard library and saves it into a
checkpoint folder, so that converters (and `starcast serve`) accept a random-weight checkpoint.
usage: mktok.py CKPT_DIR VOCAB_SIZE"""

import sys
import sysconfig
import tempfile
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2TokenizerFast


def texts():
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        yield path.read_text(encoding="utf-8", errors="replace")


out, size = sys.argv[1], int(sys.argv[2])
tokenizer = ByteLevelBPETokenizer()
tokenizer.train_from_iterator(texts(), vocab_size=size, min_frequency=1, special_tokens=["<|endoftext|>"])
with tempfile.TemporaryDirectory() as scratch:
    tokenizer.save_model(scratch)
    fast = GPT2TokenizerFast(
        vocab_file=f"{scratch}/vocab.json",
        merges_file=f"{scratch}/merges.txt",
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.save_pretrained(out)
print("tokenizer of", len(fast), "entries saved in", out)
