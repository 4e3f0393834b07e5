"""Prometheus metrics of one server: requests, the queue, running rows, tokens and latencies."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from starcast.runtime.requests import Request

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, engine_of):
        """`engine_of()` returns the engine, or None while it loads."""
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "starcast_requests", "Completion requests by HTTP status.", ["status"], registry=registry
        )
        self.finished = Counter("starcast_finished", "Completions by finish reason.", ["reason"], registry=registry)
        queue = Gauge("starcast_queue_length", "Requests waiting for a row.", registry=registry)
        running = Gauge("starcast_running_rows", "Rows in the running batch.", registry=registry)
        queue.set_function(lambda: engine_of().queue_length if engine_of() else 0)
        running.set_function(lambda: engine_of().running_rows if engine_of() else 0)
        self.prompt_tokens = Counter("starcast_prompt_tokens", "Prompt tokens prefilled.", registry=registry)
        self.generated_tokens = Counter("starcast_generation_tokens", "Tokens generated.", registry=registry)
        self.ttft = Histogram(
            "starcast_time_to_first_token_seconds", "From arrival to the first token.", buckets=LATENCY_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.per_token = Histogram(
            "starcast_time_per_output_token_seconds", "Between consecutive tokens of a request.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip

    def record(self, request: Request, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.finished.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(completion_tokens)
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.submitted)
        for seconds in request.token_times:
            self.per_token.observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
