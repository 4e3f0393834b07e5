"""The engine: one loop per loaded model that owns the batch. No HTTP here (starcast/serve is the face).

    engine = Engine.from_export("out/", max_batch=8)
    engine.start()
    engine.submit(Request(prompt_ids, max_tokens=64, on_event=print))

Between decode steps the loop releases finished and cancelled rows and admits waiting requests into free rows
(each prompt is prefilled alone, then joins the running batch); every step decodes one token for every running
row, each with its own sampling options and seed. Rows join and leave without copying the other rows' cache
(runtime/batch_rows.py). A bounded queue holds what waits; beyond it `submit` raises QueueFull. An exception
while handling one request fails that request only.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from starcast.contract import interfaces as io
from starcast.contract.dtypes import numpy_dtype
from starcast.contract.errors import InvalidValue, UserError
from starcast.runtime.batch_rows import ConcatRows, SlotRows
from starcast.runtime.export_folder import choose_graph, open_export, read_eos
from starcast.runtime.generator import check_export_files
from starcast.runtime.requests import FINISH_CANCELLED, FINISH_ERROR, Event, Request, RowState, describe
from starcast.runtime.session import SessionOptions, create_session, device_of
from starcast.runtime.steps import check_interface
from starcast.runtime.text import Tokenizer

DEFAULT_MAX_LENGTH = 2048


def unstarted(request: Request, reason: str, error: str | None = None) -> None:
    """The final event of a request that never got a row."""
    with contextlib.suppress(Exception):
        request.on_event(Event(finish_reason=reason, prompt_tokens=len(request.prompt), error=error))


class QueueFull(UserError):
    """The engine's queue is full, or it is shutting down: try again later."""


class Engine:
    def __init__(self, rows, config, tokenizer: Tokenizer | None, eos: tuple[int, ...], max_queue: int, name: str):
        self.batch, self.config, self.tokenizer, self.eos = rows, config, tokenizer, eos
        self.max_queue, self.name = max_queue, name
        self.max_length = rows.max_length
        self.waiting: deque[Request] = deque()
        self.running: dict[int, RowState] = {}
        self.wake = threading.Condition()
        self.accepting, self.stopping = True, False
        self.thread = threading.Thread(target=self.loop, name="starcast-engine", daemon=True)
        self.steps = 0

    @classmethod
    def from_export(
        cls, export_dir: str | Path, max_batch: int = 8, max_queue: int = 64, provider: str = "cpu",
        max_length: int | None = None, graph: str = "auto", threads: int = 0, device_id: int = 0,
    ) -> Engine:  # fmt: skip
        folder = Path(export_dir).expanduser().absolute()
        manifest = open_export(folder)
        check_export_files(folder, manifest)
        config = manifest.config
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0)):
            if type(value) is not int or value < low:
                raise InvalidValue(f"{name} must be a whole number >= {low}, got {value!r}")
        max_length = max_length or min(config.n_positions, DEFAULT_MAX_LENGTH)
        if not 1 < max_length <= config.n_positions:
            raise InvalidValue(f"max_length must be in 2..{config.n_positions}, got {max_length}")
        record = choose_graph(manifest, provider, graph).record
        if record.interface != io.STATIC_CACHE and provider != "cpu":
            raise UserError(
                f"serving on {provider} needs an export fused for it (starcast optimize --target {provider})"
            )
        session = create_session(manifest.path(folder, record.model), SessionOptions(provider, threads, device_id))
        dtype = numpy_dtype(manifest.dtype)
        check_interface(session, record.interface, config, dtype)
        if record.interface == io.STATIC_CACHE:
            rows = SlotRows(session, config, max_batch, max_length, dtype, device_of(provider))
        else:
            rows = ConcatRows(session, config, max_batch, max_length, dtype)
        return cls(rows, config, Tokenizer.from_export(folder), read_eos(folder, config), max_queue, folder.name)

    # -- what callers see ---------------------------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def running_rows(self) -> int:
        return len(self.running)

    def start(self) -> Engine:
        self.thread.start()
        return self

    def check(self, request: Request) -> None:
        """What submit refuses before queueing (the server answers 400)."""
        prompt = request.prompt
        if prompt.ndim != 1 or len(prompt) == 0:
            raise InvalidValue("the prompt is empty")
        if prompt.min() < 0 or prompt.max() >= self.config.vocab_size:
            raise InvalidValue(f"a token id is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if type(request.max_tokens) is not int or request.max_tokens < 1:
            raise InvalidValue(f"max_tokens must be a whole number >= 1, got {request.max_tokens!r}")
        if len(prompt) + request.max_tokens > self.max_length:
            raise InvalidValue(
                f"the prompt ({len(prompt)} tokens) and max_tokens ({request.max_tokens}) exceed this server's "
                f"maximum length of {self.max_length} tokens"
            )

    def submit(self, request: Request) -> Request:
        self.check(request)
        with self.wake:
            if not self.accepting:
                raise QueueFull("the server is shutting down")
            # max_queue counts what waits beyond the free rows (0: a request is taken only if a row is free)
            busy = sum(not state.done for state in list(self.running.values()))
            room = self.max_queue + max(0, self.batch.max_batch - busy)
            if len(self.waiting) >= room:  # requests whose callers went away give their places up
                for gone in [r for r in self.waiting if r.cancelled.is_set()]:
                    self.waiting.remove(gone)
                    unstarted(gone, FINISH_CANCELLED)
            if len(self.waiting) >= room:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(request)
            self.wake.notify()
        return request

    def stop(self, grace: float = 10.0) -> None:
        """Stop admitting; let running and waiting requests finish for up to `grace` seconds, then cancel them."""
        with self.wake:
            self.accepting = False
            self.wake.notify()
        deadline = time.monotonic() + grace
        while (self.running or self.waiting) and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.01)
        with self.wake:
            self.stopping = True  # the loop cancels what is left, then ends
            self.wake.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    # -- the loop -----------------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def loop(self) -> None:
        while True:
            with self.wake:
                while not (self.waiting or self.running or self.stopping):
                    self.wake.wait()
                if self.stopping:
                    for request in [*self.waiting, *(state.request for state in self.running.values())]:
                        request.cancel()
                    if not self.running and not self.waiting:
                        return
                admitted = []
                while self.waiting and len(self.running) + len(admitted) < self.batch.max_batch:
                    admitted.append(self.waiting.popleft())
            try:
                self.step(admitted)
            except Exception as exc:  # a defect of the loop itself: the running requests fail, the engine goes on
                for row, state in list(self.running.items()):
                    self.fail(state, exc)
                    with contextlib.suppress(Exception):
                        self.release(row)
                self.running.clear()

    def step(self, admitted: list[Request]) -> None:
        self.release_cancelled()
        for request in admitted:
            self.admit(request)
        if self.running:
            self.decode()

    def release(self, row: int) -> None:
        del self.running[row]
        self.batch.release(row)

    @staticmethod
    def quietly(state: RowState, reason: str, error: str | None = None) -> None:
        """The final event, whatever the caller's callback does with it: a broken callback must not stop the
        loop that serves the others."""
        with contextlib.suppress(Exception):
            state.finish(reason, flush=False, error=error)

    def fail(self, state: RowState, exc: BaseException) -> None:
        self.quietly(state, FINISH_ERROR, describe(exc))

    def release_cancelled(self) -> None:
        for row, state in list(self.running.items()):
            if state.request.cancelled.is_set():
                self.quietly(state, FINISH_CANCELLED)
                self.release(row)

    def admit(self, request: Request) -> None:
        if request.cancelled.is_set():
            unstarted(request, FINISH_CANCELLED)
            return
        try:
            state = RowState(request, self.tokenizer, self.eos)
        except Exception as exc:  # options this request alone got wrong
            unstarted(request, FINISH_ERROR, describe(exc))
            return
        try:
            row, logits = self.batch.admit(request.prompt)
        except Exception as exc:  # this request's prefill failed; the running rows are untouched
            self.fail(state, exc)
            return
        self.running[row] = state
        self.advance(row, state, logits)

    def advance(self, row: int, state: RowState, logits: np.ndarray) -> None:
        """Choose and hand out one row's next token; release the row when its request is done."""
        try:
            finished = state.emit(state.choose(logits))
        except Exception as exc:  # this request only: sampling, detokenizing, the caller's callback
            self.fail(state, exc)
            finished = FINISH_ERROR
        if finished:
            self.release(row)

    def decode(self) -> None:
        tokens = np.zeros(self.batch.rows, np.int64)
        for row, state in self.running.items():
            tokens[row] = state.last_token
        try:
            logits = self.batch.decode(tokens)
        except Exception as exc:  # the step itself failed: every running request fails, the engine goes on
            for row, state in list(self.running.items()):
                self.fail(state, exc)
                self.release(row)
            return
        self.steps += 1
        for row, state in list(self.running.items()):
            self.advance(row, state, logits[row])
