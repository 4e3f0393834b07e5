"""A generation request as the engine runs it: its own sampling and seed, stop strings, streamed text, and the
events a caller receives (token ids and text pieces as they are decoded, then one final event)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from starcast.runtime.sampling import SamplingOptions, TokenChooser
from starcast.runtime.text import StopStrings, StreamDecoder, Tokenizer

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = "stop", "length", "cancelled", "error"
_ids = itertools.count(1)


@dataclass
class Event:
    """What a request emits: a piece (`text`, `token`) or the end (`finish_reason`, usage counts)."""

    text: str = ""
    token: int | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Request:
    prompt: np.ndarray  # int64 token ids
    max_tokens: int
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop: list[str] = field(default_factory=list)
    on_event: Callable[[Event], None] = lambda event: None
    id: int = field(default_factory=lambda: next(_ids))
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)  # seconds between consecutive tokens
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Free the request's row at the next step (a client that went away)."""
        self.cancelled.set()


class RowState:
    """One running request: its token history, chooser, detokenizer and stop strings."""

    def __init__(self, request: Request, tokenizer: Tokenizer | None, eos: tuple[int, ...]):
        self.request, self.eos = request, eos
        self.history = request.prompt[None].astype(np.int64)
        self.chooser = TokenChooser(request.sampling)
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.stops = StopStrings(request.stop)
        self.text, self.released, self.generated = "", 0, 0
        self.last_token = 0
        self.last_time = request.submitted
        self.done = False  # the final event was sent: the row is free, whether or not the loop released it yet

    def choose(self, logits: np.ndarray) -> int:
        token = int(self.chooser(logits[None], self.history)[0])
        self.history = np.concatenate([self.history, [[token]]], axis=1)
        self.last_token = token
        return token

    def emit(self, token: int) -> str | None:
        """Hand the token to the caller; returns the finish reason if the request is done."""
        now = time.perf_counter()
        request = self.request
        if request.first_token_at is None:
            request.first_token_at = now
        else:
            request.token_times.append(now - self.last_time)
        self.last_time = now
        self.generated += 1
        if token in self.eos:
            return self.finish(FINISH_STOP)
        piece = ""
        if self.decoder is not None:
            self.text += self.decoder.push(token)
            cut = self.stops.find(self.text)
            if cut is not None:
                piece = self.text[self.released : cut]
                if piece:
                    request.on_event(Event(text=piece, token=token))
                return self.finish(FINISH_STOP, flush=False)
            safe = self.stops.safe_length(self.text)
            piece, self.released = self.text[self.released : safe], max(safe, self.released)
        request.on_event(Event(text=piece, token=token))
        if self.generated >= request.max_tokens:
            return self.finish(FINISH_LENGTH)
        return None

    def finish(self, reason: str, flush: bool = True, error: str | None = None) -> str:
        """The final event: any text held back (a possible stop string that did not complete), then the end."""
        self.done = True
        if flush and self.decoder is not None and reason in (FINISH_STOP, FINISH_LENGTH):
            self.text += self.decoder.flush()
            cut = self.stops.find(self.text)
            rest = self.text[self.released : cut]
            if rest:
                self.request.on_event(Event(text=rest))
        self.request.on_event(
            Event(finish_reason=reason, prompt_tokens=len(self.request.prompt), completion_tokens=self.generated,
                  error=error)
        )  # fmt: skip
        return reason


def describe(exc: BaseException) -> str:
    first = (str(exc).splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def event_dict(event: Event) -> dict[str, Any]:
    return {k: v for k, v in vars(event).items() if v not in (None, "")}
