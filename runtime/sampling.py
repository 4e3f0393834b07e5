"""Choosing the next token from the last position's logits: greedy, or sampled as transformers samples.

The processors run in transformers' order: repetition penalty, temperature, top-k, top-p. A seed makes
sampling reproducible (numpy's PCG64). Everything is float64 and kept finite at the edges (a temperature of
1e-39, a top_p of 1e-300, a penalty of 1e-300 or 1e300 behave as their limits: the likeliest token, or penalised
tokens last); NaN or infinite logits from the model are an error (NonFiniteLogits), never a silent pick.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from starcast.contract.errors import InvalidType, InvalidValue, UserError


@dataclass(frozen=True)
class SamplingOptions:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise InvalidType(f"do_sample must be True or False, got {self.do_sample!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise InvalidType(f"{name} must be a number, got {value!r}")
        # Written so that NaN fails every check: NaN compares false with everything.
        if not self.temperature > 0 or self.temperature == float("inf"):
            raise InvalidValue(f"temperature must be a finite number > 0 (got {self.temperature}); use greedy decoding")
        if not 0 < self.top_p <= 1:
            raise InvalidValue(f"top_p must be in (0, 1] (got {self.top_p})")
        if not 0 < self.repetition_penalty < float("inf"):
            raise InvalidValue(f"repetition_penalty must be a finite number > 0 (got {self.repetition_penalty})")
        for name, value in (("top_k", self.top_k), ("seed", self.seed)):
            if value is None and name == "seed":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InvalidType(f"{name} must be a whole number, got {value!r}")
            if value < 0:
                raise InvalidValue(f"{name} must be >= 0 (got {value})")


def openai_style(temperature: float, **options) -> SamplingOptions:
    """Options as OpenAI's API spells them: temperature 0 is greedy decoding, anything above samples."""
    return SamplingOptions(do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0, **options)


class NonFiniteLogits(UserError):
    """The model produced NaN or infinite logits: an error, never a silent pick of token 0."""


LARGEST = float(np.finfo(np.float64).max)


def apply_repetition_penalty(logits: np.ndarray, history: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty as transformers applies it: seen tokens' positive logits / penalty, negative ones * penalty.
    In float64, clamped to finite values (a penalty of 1e-300 or 1e300 must not make an infinity)."""
    rows = np.arange(logits.shape[0])[:, None]
    seen = logits[rows, history]
    with np.errstate(over="ignore"):
        logits[rows, history] = np.clip(np.where(seen < 0, seen * penalty, seen / penalty), -LARGEST, LARGEST)
    return logits


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of tokens whose probability adds up to at least p (always at least the likeliest)."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    probs = softmax(sorted_logits)
    cumulative = np.cumsum(probs, axis=-1)
    remove_sorted = cumulative - probs >= p  # tokens after the set already reached p
    remove_sorted[:, 0] = False  # however small p is (1e-300), the likeliest token stays
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def scaled(logits: np.ndarray, temperature: float) -> np.ndarray:
    """(logits - max) / temperature in float64: the likeliest token is exactly 0, the others <= 0 or -inf, so a
    temperature of 1e-39 is greedy-like instead of inf / inf = NaN."""
    with np.errstate(over="ignore"):
        return (logits - logits.max(axis=-1, keepdims=True)) / temperature


class TokenChooser:
    def __init__(self, options: SamplingOptions):
        self.options = options
        self.rng = np.random.default_rng(options.seed)

    def __call__(self, logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        """logits [batch, vocab] (any float dtype), history [batch, tokens so far] -> next ids [batch]. All
        arithmetic is float64 and kept finite at the edges; NaN or infinite logits raise NonFiniteLogits."""
        opts = self.options
        logits = logits.astype(np.float64, copy=True)
        bad = ~np.isfinite(logits).all(axis=-1)
        if bad.any():
            rows = ", ".join(map(str, np.flatnonzero(bad)[:8]))
            raise NonFiniteLogits(f"the model produced NaN or infinite logits (batch row {rows}); nothing was chosen")
        if opts.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, history, opts.repetition_penalty)
        if not opts.do_sample:
            return logits.argmax(axis=-1)
        logits = top_p_filter(top_k_filter(scaled(logits, opts.temperature), opts.top_k), opts.top_p)
        probs = softmax(logits)
        draws = self.rng.random((probs.shape[0], 1))
        return np.minimum((probs.cumsum(axis=-1) < draws).sum(axis=-1), probs.shape[-1] - 1)
