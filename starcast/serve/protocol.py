"""OpenAI's completions API at the edge: a request body checked field by field (a wrong one is a 400 with OpenAI's
error body, naming the field), and the response and stream-chunk shapes the official client reads."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from starcast.contract.errors import UserError
from starcast.runtime.sampling import SamplingOptions, openai_style
from starcast.runtime.text import Tokenizer

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256  # characters: every token is checked against every stop string


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@dataclass
class Completion:
    """A checked request: what the engine needs, and what the response repeats."""

    prompt: np.ndarray
    max_tokens: int
    sampling: SamplingOptions
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    try:
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise BadRequest(f"{name} must be a finite number", name)
    if value < low or value > high or (low_open and value == low):
        side = "(" if low_open else "["
        raise BadRequest(f"{name} must be in {side}{low}, {high}], got {value}", name)
    return float(value)


def whole(body: dict, name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer", name)
    return value


def prompt_ids(body: dict, tokenizer: Tokenizer) -> np.ndarray:
    """`prompt` as text or token ids (one prompt: n=1), with `suffix` for fill-in-the-middle."""
    if "prompt" not in body:
        raise BadRequest("prompt is required", "prompt")
    prompt, suffix = body["prompt"], body.get("suffix")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if suffix is not None and not isinstance(suffix, str):
        raise BadRequest("suffix must be a string", "suffix")
    if isinstance(prompt, str):
        try:
            text = tokenizer.fim_prompt(prompt, suffix) if suffix is not None else prompt
            ids = tokenizer.encode(text)
        except UserError as exc:
            raise BadRequest(str(exc), "suffix" if suffix is not None else "prompt") from None
    elif isinstance(prompt, list) and all(type(t) is int for t in prompt):
        if suffix is not None:
            raise BadRequest("suffix needs the prompt as text", "suffix")
        if any(not 0 <= t < 2**31 for t in prompt):
            raise BadRequest("a token id is outside the vocabulary", "prompt")
        ids = prompt
    elif isinstance(prompt, list):
        raise BadRequest("only one prompt per request (a string or a list of token ids)", "prompt")
    else:
        raise BadRequest("prompt must be a string or a list of token ids", "prompt")
    if not ids:
        raise BadRequest("prompt is empty", "prompt")
    return np.asarray(ids, np.int64)


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("stop must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stop):
        raise BadRequest(f"stop takes at most {MAX_STOP_STRINGS} strings of {MAX_STOP_LENGTH} characters", "stop")
    return [s for s in stop if s]


def unsupported(body: dict) -> None:
    """Options starcast does not implement are refused, not silently ignored, unless they ask for nothing."""
    for name, neutral in (("n", 1), ("best_of", 1), ("echo", False), ("presence_penalty", 0),
                          ("frequency_penalty", 0)):  # fmt: skip
        value = body.get(name)
        if value is not None and value != neutral:
            raise BadRequest(f"{name}={value!r} is not supported (only {neutral!r})", name)
    if body.get("logprobs") is not None:  # even 0 asks for the chosen tokens' log probabilities
        raise BadRequest(f"logprobs={body['logprobs']!r} is not supported (only null)", "logprobs")
    if body.get("logit_bias"):
        raise BadRequest("logit_bias is not supported", "logit_bias")


def parse_completion(body: Any, tokenizer: Tokenizer) -> Completion:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unsupported(body)
    ids = prompt_ids(body, tokenizer)
    max_tokens = whole(body, "max_tokens", DEFAULT_MAX_TOKENS)
    if max_tokens < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    temperature = number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = whole(body, "top_k", 0)
    if top_k < 0:
        raise BadRequest("top_k must be >= 0", "top_k")
    penalty = number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True)
    seed = whole(body, "seed", None)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest("stream_options must be an object with a boolean include_usage", "stream_options")
    sampling = openai_style(
        temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=penalty,
        seed=None if seed is None else seed % 2**63,
    )
    return Completion(ids, max_tokens, sampling, stop_strings(body), stream, bool(options.get("include_usage")))


class Responses:
    """The response shapes of one completion: a whole one, or stream chunks."""

    def __init__(self, model: str):
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return {**self.head(), "choices": [choice], "usage": self.usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return {**self.head(), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self.head(), "choices": [], "usage": self.usage(prompt_tokens, completion_tokens)}
