"""The continuously batching engine: rows that join and leave between steps get exactly what they would get
alone, through every graph interface; cancellation, the bounded queue and a failing request behave."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import save_checkpoint_with_tokenizer

from starcast.contract.errors import InvalidValue
from starcast.pipeline.export import export
from starcast.runtime.engine import Engine, QueueFull
from starcast.runtime.generator import Generator
from starcast.runtime.requests import FINISH_CANCELLED, FINISH_LENGTH, Request
from starcast.runtime.sampling import SamplingOptions

PROMPTS = [
    "def add(a, b):\n",
    "class Point:\n    def __init__(self, x, y):\n",
    "for i in",
    "print('h",
    "x",
    "def add(a, b):\n    return a + b\n\nclass Point:\n",
    "for i in range(10):\n",
    "print(",
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(multi_query, target) -> export folder; all with a tokenizer."""
    root = tmp_path_factory.mktemp("engine")
    made = {}
    for multi_query in (True, False):
        folder, _ = save_checkpoint_with_tokenizer(root / f"ckpt-{multi_query}", multi_query=multi_query)
        for target in ("cpu", "cuda"):
            made[multi_query, target] = root / f"export-{multi_query}-{target}"
            export(str(folder), made[multi_query, target], fuse_target=target)
    return made


class Collector:
    def __init__(self, count: int):
        self.tokens = {i: [] for i in range(count)}
        self.text = {i: "" for i in range(count)}
        self.finish = {}
        self.done = threading.Event()
        self.count = count

    def callback(self, index: int):
        def on_event(event):
            if event.finish_reason is not None:
                self.finish[index] = event
                if len(self.finish) == self.count:
                    self.done.set()
                return
            if event.token is not None:
                self.tokens[index].append(event.token)
            self.text[index] += event.text

        return on_event


def run_all(engine: Engine, prompts, max_tokens, **options) -> Collector:
    tokenizer = engine.tokenizer
    collector = Collector(len(prompts))
    for index, prompt in enumerate(prompts):
        ids = np.asarray(tokenizer.encode(prompt), np.int64)
        engine.submit(Request(ids, max_tokens[index], SamplingOptions(**options), on_event=collector.callback(index)))
    assert collector.done.wait(120), "the engine did not finish"
    return collector


@pytest.mark.parametrize("graph", ["plain", "fused"])
@pytest.mark.parametrize("target", ["cpu", "cuda"])
@pytest.mark.parametrize("multi_query", [True, False])
def test_rows_that_join_and_leave_get_what_they_would_get_alone(exports, multi_query, target, graph):
    folder = exports[multi_query, target]
    generator = Generator.from_pretrained(folder, graph=graph)
    max_tokens = [12 + 5 * i for i in range(len(PROMPTS))]
    engine = Engine.from_export(folder, max_batch=3, graph=graph, max_length=128).start()
    try:
        got = run_all(engine, PROMPTS, max_tokens)
    finally:
        engine.stop(0)
    eos = generator.eos_token_id
    for index, prompt in enumerate(PROMPTS):
        ids = generator.tokenizer.encode(prompt)
        alone = generator.generate([ids], max_new_tokens=max_tokens[index])[0, len(ids) :].tolist()
        alone = alone[: alone.index(eos) + 1] if eos in alone else alone
        produced = got.tokens[index] + ([eos] if got.finish[index].finish_reason == "stop" else [])
        assert produced[: len(alone)] == alone, (index, produced, alone)
        text = generator.generate_text(prompt, max_new_tokens=max_tokens[index])
        assert got.text[index] == text


def test_joins_reuse_holes_and_grow_without_copying_other_rows(exports):
    engine = Engine.from_export(exports[True, "cpu"], max_batch=4, max_length=128).start()
    try:
        run_all(engine, PROMPTS, [6, 30, 4, 30, 3, 20, 8, 25])
        assert engine.running_rows == 0 and engine.batch.rows == 0  # everything released, trailing holes dropped
        assert engine.batch.relayouts <= 4  # only longer prompts and a full cache re-lay the rows out
    finally:
        engine.stop(0)


def test_per_request_seeds_and_sampling(exports):
    engine = Engine.from_export(exports[True, "cpu"], max_batch=4, max_length=128).start()
    try:
        options = dict(do_sample=True, temperature=0.9, top_p=0.95, seed=11)
        first = run_all(engine, PROMPTS[:3], [20, 20, 20], **options)
        again = run_all(engine, PROMPTS[:3], [20, 20, 20], **options)
        assert first.tokens == again.tokens
        greedy = run_all(engine, PROMPTS[:3], [20, 20, 20])
        assert greedy.tokens != first.tokens
    finally:
        engine.stop(0)


def test_cancelling_frees_the_row_and_the_queue_is_bounded(exports):
    engine = Engine.from_export(exports[True, "cpu"], max_batch=1, max_queue=2, max_length=128)
    tokenizer = engine.tokenizer
    ids = np.asarray(tokenizer.encode(PROMPTS[0]), np.int64)
    collector = Collector(2)
    long = engine.submit(Request(ids, 100, on_event=collector.callback(0)))
    engine.submit(Request(ids, 5, on_event=collector.callback(1)))
    engine.submit(Request(ids, 5))
    with pytest.raises(QueueFull):
        engine.submit(Request(ids, 5))  # not started: one for the free row and two beyond it is the most it holds
    with pytest.raises(InvalidValue, match="maximum length"):
        engine.submit(Request(ids, 1000))
    long.cancel()
    engine.start()
    try:
        assert collector.done.wait(60)
        assert collector.finish[0].finish_reason == FINISH_CANCELLED
        assert collector.finish[1].finish_reason == FINISH_LENGTH and len(collector.tokens[1]) == 5
        assert engine.running_rows == 0
    finally:
        engine.stop(0)
    with pytest.raises(QueueFull, match="shutting down"):
        engine.submit(Request(ids, 5))


def test_max_queue_zero_takes_requests_while_a_row_is_free(exports):
    engine = Engine.from_export(exports[True, "cpu"], max_batch=2, max_queue=0, max_length=128)
    ids = np.asarray(engine.tokenizer.encode(PROMPTS[0]), np.int64)
    collector = Collector(2)
    engine.submit(Request(ids, 60, on_event=collector.callback(0)))
    engine.submit(Request(ids, 60, on_event=collector.callback(1)))
    with pytest.raises(QueueFull):
        engine.submit(Request(ids, 5))  # both rows are taken and nothing may wait beyond them
    engine.start()
    try:
        assert collector.done.wait(60)
        assert all(len(collector.tokens[i]) >= 1 and collector.finish[i].error is None for i in (0, 1))
        done = Collector(1)
        engine.submit(Request(ids, 5, on_event=done.callback(0)))  # rows are free again
        assert done.done.wait(60) and done.finish[0].finish_reason == FINISH_LENGTH
    finally:
        engine.stop(0)


def test_a_request_that_fails_fails_alone(exports):
    engine = Engine.from_export(exports[True, "cpu"], max_batch=4, max_length=128).start()
    tokenizer = engine.tokenizer

    events = []

    def broken(event):  # the caller's own code raises on the third token
        events.append(event)
        if len(events) == 3:
            raise RuntimeError("a broken client callback")

    try:
        bad = Request(np.asarray(tokenizer.encode(PROMPTS[0])), 30, on_event=broken)
        collector = Collector(2)
        engine.submit(bad)
        for index in range(2):
            engine.submit(
                Request(np.asarray(tokenizer.encode(PROMPTS[index + 1])), 20, on_event=collector.callback(index))
            )
        assert collector.done.wait(60)
        assert all(event.finish_reason == FINISH_LENGTH for event in collector.finish.values())
        assert collector.tokens[0] and collector.tokens[1]
        assert len(events) == 4 and events[-1].finish_reason == "error" and "broken client" in events[-1].error
        assert engine.running_rows == 0
    finally:
        engine.stop(0)


def test_a_callback_that_raises_on_every_event_does_not_stop_the_engine(exports):
    engine = Engine.from_export(exports[True, "cpu"], max_batch=2, max_length=128).start()
    tokenizer = engine.tokenizer
    ids = np.asarray(tokenizer.encode(PROMPTS[0]), np.int64)

    def hostile(event):
        raise RuntimeError("a client that raises on everything")

    try:
        doomed = engine.submit(Request(ids, 50, on_event=hostile))
        doomed.cancel()
        engine.submit(Request(ids, 5, SamplingOptions(), stop=[1, 2], on_event=hostile))  # options that break a row
        collector = Collector(1)
        engine.submit(Request(ids, 6, on_event=collector.callback(0)))
        assert collector.done.wait(60) and collector.finish[0].finish_reason == FINISH_LENGTH
        assert engine.alive and engine.running_rows == 0
    finally:
        engine.stop(0)
    assert not engine.alive


def test_stop_cancels_what_is_still_running(exports):
    engine = Engine.from_export(exports[True, "cpu"], max_batch=1, max_length=128).start()
    ids = np.asarray(engine.tokenizer.encode(PROMPTS[0]), np.int64)
    collector = Collector(3)
    for index in range(3):
        engine.submit(Request(ids, 100, on_event=collector.callback(index)))
    engine.stop(grace=0)
    assert collector.done.wait(30) and not engine.alive
    assert FINISH_CANCELLED in {event.finish_reason for event in collector.finish.values()}
