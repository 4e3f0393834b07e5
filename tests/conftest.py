"""Tiny random GPTBigCode checkpoints, written by transformers itself, for every test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
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


# -- running the command line as a user would ---------------------------------------------------------------

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def starcast(*args, env=None, cwd=None, prefix=(), timeout=300, input=None):
    """`python -m starcast ARGS` in a subprocess (with `prefix`, e.g. ["unshare", "-r"], in front)."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "starcast", *map(str, args)],
        capture_output=True,
        text=True,
        env=env or OFFLINE,
        cwd=cwd,
        timeout=timeout,
        input=input,
    )


def assert_one_line(result, code: int = 2, *words: str) -> str:
    """Exit `code`, stderr ends in exactly one `starcast: ...` line (stage lines may come before it), no
    traceback; returns that line."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("starcast: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def run_in_process(*args) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr). Any exception starcast does not turn into an exit
    code propagates, failing the test (that is a traceback a user would see)."""
    import contextlib
    import io

    from starcast.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


class Canary:
    """A file outside the folders under test: its bytes and mtime must never change, and it must never vanish."""

    def __init__(self, path: Path):
        self.path = path
        path.write_bytes(b"precious user data\n")
        self.stat = path.stat()

    def intact(self) -> bool:
        return (
            self.path.is_file()
            and self.path.read_bytes() == b"precious user data\n"
            and self.path.stat().st_mtime_ns == self.stat.st_mtime_ns
        )


@pytest.fixture(scope="session")
def small_export(tmp_path_factory) -> Path:
    """A fused fp32 export with a tokenizer, made once; tests copy it before changing anything."""
    from starcast.pipeline.export import export

    root = tmp_path_factory.mktemp("small")
    folder, _ = save_checkpoint_with_tokenizer(root / "ckpt")
    export(str(folder), root / "export", fuse_target="cpu")
    return root / "export"


def copy_export(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def rewrite_manifest(folder: Path, change) -> None:
    """Edit starcast.json as an attacker or a careless hand would (hashes are not updated unless `change` does)."""
    path = folder / "starcast.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def rehash(folder: Path) -> None:
    """Update the manifest's sha256 of every listed file (what someone tampering with an export would do)."""
    from starcast.contract.manifest import sha256

    rewrite_manifest(folder, lambda m: m["files"].update({n: sha256(folder / n) for n in m["files"]}))


# -- servers started by tests: loopback only, bounded waits, stopped by their process ids ------------------------


def free_ports(count: int = 1) -> list[int]:
    """Ports free on 127.0.0.1 right now (all held open together, so they differ)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for probe in sockets:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in sockets]
    for probe in sockets:
        probe.close()
    return ports


@contextmanager
def started(command: list[str], ready_url: str, env=None, timeout: float = 120):
    """A server process, once `ready_url` answers 200; SIGTERM (then SIGKILL) by its pid at the end. Its stderr
    goes to a file (a pipe nobody reads can fill and stall a chatty server); `process.log()` reads it."""
    import tempfile

    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env or OFFLINE)
        process.log = lambda: (log.seek(0), log.read())[1]
        yield from serve_until_stopped(process, ready_url, timeout)


def serve_until_stopped(process, ready_url: str, timeout: float):
    import time
    import urllib.request

    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert process.poll() is None, process.log()[-3000:]
            try:
                if urllib.request.urlopen(ready_url, timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError(f"{process.args[0]} did not become ready within {timeout} s")
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="module")
def long_export(tmp_path_factory):
    """A model with a long context and no end-of-sequence token it could generate: a request runs seconds."""
    from starcast.pipeline.export import export

    root = tmp_path_factory.mktemp("long")
    vocab = write_tokenizer(root / "ckpt")
    save_hf_checkpoint(root / "ckpt", vocab_size=vocab, n_positions=4096, n_embd=64, n_layer=4)
    export(str(root / "ckpt"), root / "export", fuse_target="cpu")
    return root / "export"
