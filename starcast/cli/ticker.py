"""Stage lines that show a running stage is alive: on a terminal, `[trace] 6 layers, fp32 ... 12 s` counts up
in place every second until the stage's `done` line. Off a terminal (a log, a pipe, the tests) the lines are the
plain ones of `Progress`, unchanged."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from starcast.pipeline.progress import Progress


class TerminalProgress(Progress):
    interval = 1.0  # seconds between two updates of the running stage's line

    def __init__(self, enabled: bool = True):
        super().__init__(enabled)
        self.lock = threading.Lock()
        self.ticking: tuple[threading.Event, threading.Thread] | None = None

    def live(self) -> bool:
        return self.enabled and sys.stderr.isatty()

    def stop_ticking(self) -> None:
        """End the running stage's line (anything printed next starts on a line of its own)."""
        if self.ticking is None:
            return
        stop, thread = self.ticking
        self.ticking = None
        stop.set()
        thread.join()
        print(file=sys.stderr, flush=True)

    def say(self, message: str) -> None:
        self.stop_ticking()
        super().say(message)

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        if not self.live():
            with super().stage(name, detail):
                yield
            return
        self.stop_ticking()  # an outer stage's line ends where an inner one begins
        line = f"[{name}] {detail}".rstrip() + " ..."
        start = time.perf_counter()
        print(line, end="", file=sys.stderr, flush=True)
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self.interval):
                print(f"\r{line} {time.perf_counter() - start:.0f} s", end="", file=sys.stderr, flush=True)

        thread = threading.Thread(target=tick, name=f"starcast-{name}", daemon=True)
        self.ticking = (stop, thread)
        thread.start()
        try:
            yield
        finally:
            self.stop_ticking()
        elapsed = time.perf_counter() - start
        self.timings[name] = round(elapsed, 3)
        super().say(f"[{name}] done in {elapsed:.1f} s")

    def bar(self, label: str, gigabytes: bool = False) -> Callable[[int, int], None]:
        draw = super().bar(label, gigabytes)

        def tick(count: int, total: int) -> None:
            self.stop_ticking()  # the bar shows the progress now
            draw(count, total)

        return tick
