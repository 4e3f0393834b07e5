"""Train starcast's built-in demo model, `builtin:tiny-python`: a small GPTBigCode on the Python stdlib.

    python tools/train_demo_model.py [--minutes 55] [--threads 2] [--out starcast/models/tiny-python]

Reproducible (fixed seeds, the machine's own stdlib as data): a byte-level BPE tokenizer with StarCoder's
special tokens, a multi-query GPTBigCode of a few million parameters trained with fill-in-the-middle
augmentation on half of the documents (StarCoder's PSM format, split at character level), some modules held
out for validation. Writes safetensors (fp16), config.json, tokenizer.json, generation_config.json and a
model card with the measured held-out loss. It is a demo, not a useful assistant.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from starcast.contract.builtin import split_stdlib
from starcast.contract.config import GPTBigCodeConfig
from starcast.exporter.random_checkpoint import random_model

SPECIAL_TOKENS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
VOCAB_SIZE = 4096
CONTEXT = 256


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def fim_transform(text: str, rng: random.Random) -> str:
    """StarCoder's PSM format: prefix, suffix, then the middle the model learns to fill in."""
    a, b = sorted(rng.randrange(len(text) + 1) for _ in range(2))
    prefix, middle, suffix = text[:a], text[a:b], text[b:]
    return f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>{middle}"


def token_stream(tokenizer: Tokenizer, texts: list[str], fim_rate: float, seed: int) -> np.ndarray:
    rng = random.Random(seed)
    documents = [fim_transform(t, rng) if t and rng.random() < fim_rate else t for t in texts]
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(documents):
        ids.extend(encoding.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def batches(stream: np.ndarray, batch: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(stream) - CONTEXT - 1, size=batch)
        chunk = np.stack([stream[s : s + CONTEXT + 1] for s in starts])
        yield torch.from_numpy(chunk[:, :-1]), torch.from_numpy(chunk[:, 1:])


def forward_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    b, s = inputs.shape
    mask = torch.ones((b, s), dtype=torch.int64)
    positions = torch.arange(s).expand(b, s)
    logits = model(inputs, mask, positions, *model.empty_past(b))[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model, stream: np.ndarray, max_tokens: int = 200_000) -> float:
    """Mean next-token loss over consecutive windows of held-out code."""
    model.eval()
    n = min(len(stream) - 1, max_tokens) // CONTEXT * CONTEXT
    inputs = torch.from_numpy(stream[:n].reshape(-1, CONTEXT))
    targets = torch.from_numpy(stream[1 : n + 1].reshape(-1, CONTEXT))
    losses = [forward_loss(model, i, t).item() for i, t in zip(inputs.split(32), targets.split(32), strict=True)]
    model.train()
    return float(np.mean(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=55.0, help="Training time budget.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "starcast/models/tiny-python"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    started = time.time()

    train_texts, held_texts = split_stdlib()
    tokenizer = train_tokenizer(train_texts)
    train_stream = token_stream(tokenizer, train_texts, fim_rate=0.5, seed=0)
    held_stream = token_stream(tokenizer, held_texts, fim_rate=0.0, seed=1)
    print(
        f"data: {len(train_texts)} train modules ({len(train_stream):,} tokens), "
        f"{len(held_texts)} held out ({len(held_stream):,} tokens)",
        flush=True,
    )

    config = GPTBigCodeConfig(
        vocab_size=tokenizer.get_vocab_size(),
        n_positions=1024,
        n_embd=256,
        n_layer=6,
        n_head=8,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = random_model(config, seed=0).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60 - (time.time() - started)
    warmup, step, tokens = 100, 0, 0
    loop_start = time.time()
    rng = np.random.default_rng(0)
    for inputs, targets in batches(train_stream, args.batch, rng):
        progress = (time.time() - loop_start) / budget
        if progress >= 1.0:
            break
        lr = 1e-3 * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = forward_loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step, tokens = step + 1, tokens + inputs.numel()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {progress:.0%}", flush=True)

    held_loss = evaluate(model, held_stream)
    minutes = (time.time() - started) / 60
    print(f"held-out loss {held_loss:.4f}, perplexity {math.exp(held_loss):.2f} after {step} steps", flush=True)
    save(
        args.out,
        model,
        config,
        tokenizer,
        {
            "train_modules": len(train_texts),
            "held_out_modules": len(held_texts),
            "train_tokens_available": int(len(train_stream)),
            "tokens_seen": tokens,
            "steps": step,
            "held_out_tokens_evaluated": int(min(len(held_stream) - 1, 200_000) // CONTEXT * CONTEXT),
            "held_out_loss": round(held_loss, 4),
            "held_out_perplexity": round(math.exp(held_loss), 3),
            "training_minutes": round(minutes, 1),
            "threads": args.threads,
            "parameters": config.parameter_count(),
        },
    )


def save(out: Path, model, config: GPTBigCodeConfig, tokenizer: Tokenizer, stats: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**config.to_hf_dict(), "torch_dtype": "float16"}, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    generation = {"bos_token_id": 0, "eos_token_id": 0, "max_new_tokens": 64}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(MODEL_CARD.format(**stats, **vars(config), context=CONTEXT))


MODEL_CARD = """# builtin:tiny-python

A {parameters:,}-parameter GPTBigCode (multi-query attention, {n_layer} layers, n_embd {n_embd}, {n_head} heads,
vocabulary {vocab_size}) trained by `tools/train_demo_model.py` for starcast's demo. **It is a demo, not a useful
assistant**: it writes Python-looking text, often plausible for a line or two, rarely correct code.

- Data: the Python standard library's own source files of the machine that trained it ({train_modules} modules;
  tests, idlelib and site-packages excluded); {held_out_modules} modules, chosen by a stable hash of their path,
  held out for validation.
- Tokenizer: byte-level BPE ({vocab_size} tokens, `tokenizers`), with StarCoder's special tokens
  `<|endoftext|>`, `<fim_prefix>`, `<fim_middle>`, `<fim_suffix>`, `<fim_pad>`.
- Training: {steps} steps of 16 x {context} tokens ({tokens_seen:,} tokens seen), AdamW, cosine schedule,
  fill-in-the-middle (PSM, character-level split) on half of the documents; {training_minutes} minutes on
  {threads} CPU thread(s).
- Held-out loss {held_out_loss} nats/token, perplexity {held_out_perplexity} (on {held_out_tokens_evaluated:,} tokens of
  held-out stdlib code, {context}-token windows, no FIM).
- Weights: fp16 safetensors.
- Known limit: fill-in-the-middle was applied to whole modules, but training samples are 256-token windows of
  the token stream, so the model rarely saw a whole FIM sample; its infilling is weak. Applying FIM inside
  context-sized chunks is the fix for the next training run.
"""


if __name__ == "__main__":
    main()
