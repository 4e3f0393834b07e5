"""What quantization cost: perplexity on held-out text, top-1 agreement with the unquantized model along its own
greedy path, and the largest logit difference. A NaN or infinite result is a failed proof."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from starcast.contract import interfaces as io
from starcast.contract.builtin import held_out_text_for
from starcast.contract.config import GPTBigCodeConfig
from starcast.contract.dtypes import numpy_dtype
from starcast.contract.errors import ParityError, UserError
from starcast.contract.paths import read_text_prefix
from starcast.pipeline.proof import proof_session, session_form
from starcast.runtime.steps import ConcatCacheSteps
from starcast.runtime.text import Tokenizer

MIN_EVAL_TOKENS = 128
MAX_EVAL_TOKENS = 65_536  # enough for a perplexity to 0.1%; a larger file is read only this far
EVAL_TEXT_LIMIT = 1 << 20
AGREEMENT_STEPS = 256
# Graphs proven in the low-memory form (pipeline/proof.py: large models) run far slower on the CPU, an fp16 one
# casting its weights at every run: their top-1 agreement is measured teacher-forced (both graphs score the same
# tokens in one pass) and perplexity over fewer tokens; `agreement_form` and the counts say which ran.
LOW_MEMORY_POSITIONS = 64  # teacher-forced: one pass of each graph instead of a step per greedy token
LOW_MEMORY_EVAL_TOKENS = 512


@dataclass(frozen=True)
class Accuracy:
    eval_tokens: int
    perplexity_float: float | None
    perplexity_quantized: float | None
    perplexity_increase: float | None  # relative: 0.01 is +1%
    top1_agreement: float
    agreement_steps: int
    max_logit_difference: float
    agreement_form: str = "greedy"  # or "teacher-forced" (large models)

    def summary(self) -> str:
        ppl = (
            f"perplexity {self.perplexity_float:.3f} -> {self.perplexity_quantized:.3f} "
            f"({self.perplexity_increase:+.2%}), "
            if self.perplexity_float is not None
            else ""
        )
        return (
            f"{ppl}top-1 agreement {self.top1_agreement:.2%} over {self.agreement_steps} {self.agreement_form} steps, "
            f"max logit difference {self.max_logit_difference:.3f}"
        )


def prompt_feeds(config: GPTBigCodeConfig, ids: np.ndarray, dtype) -> dict[str, np.ndarray]:
    """A plain graph's inputs for one unpadded row of `ids` [1, n] with no past."""
    feeds = {
        io.INPUT_IDS: ids,
        io.ATTENTION_MASK: np.ones_like(ids),
        io.POSITION_IDS: np.arange(ids.shape[1], dtype=np.int64)[None],
    }
    for name, _ in io.merged_cache_names(config.n_layer):
        feeds[name] = np.zeros(config.cache_shape(1, 0), dtype)
    return feeds


def window_nll(session, config: GPTBigCodeConfig, tokens: np.ndarray, dtype, window: int = 256) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over consecutive windows of `window` tokens (plain graph)."""
    window = min(config.n_positions, window)
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        ids = tokens[start : start + window + 1]
        if len(ids) < 2:
            break
        inputs, targets = ids[None, :-1], ids[1:]
        logits = session.run([io.LOGITS], prompt_feeds(config, inputs, dtype))[0][0].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        total -= float(log_probs[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return total, count


def measure(
    float_model: Path,
    quantized_model: Path,
    config: GPTBigCodeConfig,
    dtype: str,
    eval_tokens: np.ndarray | None,
    steps: int = AGREEMENT_STEPS,
) -> Accuracy:
    np_dtype = numpy_dtype(dtype)
    large = session_form(float_model, "cpu") == "low-memory"
    if large:
        eval_tokens = None if eval_tokens is None else eval_tokens[:LOW_MEMORY_EVAL_TOKENS]
    sessions = [proof_session(path) for path in (float_model, quantized_model)]
    ppl: list[float | None] = [None, None]
    if eval_tokens is not None:
        for i, session in enumerate(sessions):
            nll, count = window_nll(session, config, eval_tokens, np_dtype)
            ppl[i] = math.exp(nll / count) if math.isfinite(nll) else float("inf")
    if ppl[0] is not None and not all(p is not None and math.isfinite(p) for p in ppl):
        raise ParityError(f"perplexity is not finite (float {ppl[0]}, quantized {ppl[1]})")
    increase = ppl[1] / ppl[0] - 1 if ppl[0] is not None and ppl[1] is not None else None
    count = int(len(eval_tokens)) if eval_tokens is not None else 0
    length = LOW_MEMORY_POSITIONS if large else 32
    prompt = (
        eval_tokens[:length] if eval_tokens is not None and len(eval_tokens) >= length
        else np.random.default_rng(0).integers(0, config.vocab_size, length)
    )[None].astype(np.int64)  # fmt: skip
    if large:
        agree, worst = teacher_forced(sessions, config, prompt, np_dtype)
        return Accuracy(count, ppl[0], ppl[1], increase, agree, prompt.shape[1], worst, "teacher-forced")
    steps = min(steps, config.n_positions - prompt.shape[1] - 1)
    reference, quantized = (
        ConcatCacheSteps(s, config, 1, prompt.shape[1] + steps + 1, np_dtype, "cpu") for s in sessions
    )
    mask = np.ones_like(prompt)
    expected, ours = reference.prefill(prompt, mask), quantized.prefill(prompt, mask)
    agree, worst = 0, 0.0
    for _ in range(steps):
        if not (np.isfinite(expected).all() and np.isfinite(ours).all()):
            raise ParityError("the quantized or the float graph produced NaN or infinite logits")
        token = expected.argmax(-1)
        agree += int(ours.argmax(-1)[0] == token[0])
        worst = max(worst, float(np.abs(expected.astype(np.float64) - ours).max()))
        expected, ours = reference.decode_one_token(token), quantized.decode_one_token(token)
    return Accuracy(count, ppl[0], ppl[1], increase, agree / steps, steps, worst)


def teacher_forced(sessions, config: GPTBigCodeConfig, prompt: np.ndarray, dtype) -> tuple[float, float]:
    """Top-1 agreement and the largest logit difference of two graphs scoring the same tokens in one pass."""
    feeds = prompt_feeds(config, prompt, dtype)
    expected, ours = (session.run([io.LOGITS], feeds)[0][0].astype(np.float64) for session in sessions)
    if not (np.isfinite(expected).all() and np.isfinite(ours).all()):
        raise ParityError("the quantized or the float graph produced NaN or infinite logits")
    agree = float((expected.argmax(-1) == ours.argmax(-1)).mean())
    return agree, float(np.abs(expected - ours).max())


def eval_tokens_for(folder: Path, source: str, eval_text: Path | None) -> np.ndarray | None:
    """Token ids of the evaluation text (at most MAX_EVAL_TOKENS): the user's file, or for a built-in model its
    held-out code; None when there is neither."""
    tokenizer = Tokenizer.from_export(folder)
    if eval_text is None:
        text = held_out_text_for(source)
        if text is None or tokenizer is None:
            return None
    else:
        if tokenizer is None:
            raise UserError(f"{folder}: --eval-text needs the export's tokenizer.json, and there is none")
        text = read_text_prefix(Path(eval_text), EVAL_TEXT_LIMIT)
    tokens = np.asarray(tokenizer.encode(text)[:MAX_EVAL_TOKENS], dtype=np.int64)
    if len(tokens) < MIN_EVAL_TOKENS:
        raise UserError(f"evaluation text is too short to measure: {len(tokens)} tokens, need {MIN_EVAL_TOKENS}")
    return tokens
