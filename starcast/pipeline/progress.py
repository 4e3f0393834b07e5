"""Stage lines with timings on stderr: `[load] 1.2 s`, so the user sees where a long export is."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.timings: dict[str, float] = {}

    def say(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        self.say(f"[{name}] {detail}".rstrip() + " ...")
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.timings[name] = round(elapsed, 3)
        self.say(f"[{name}] done in {elapsed:.1f} s")

    def bar(self, label: str, gigabytes: bool = False) -> Callable[[int, int], None]:
        """A callback `(done, total)` that draws a progress bar on stderr (only when stderr is a terminal);
        `gigabytes`: done and total are bytes."""
        if not (self.enabled and sys.stderr.isatty()):
            return lambda count, total: None

        def tick(count: int, total: int) -> None:
            filled = 30 * count // max(total, 1)
            end = "\n" if count >= total else ""
            amount = f"{count / 1e9:.2f}/{total / 1e9:.2f} GB" if gigabytes else f"{count}/{total}"
            print(
                f"\r[{label}] [{'#' * filled}{'.' * (30 - filled)}] {amount}",
                end=end,
                file=sys.stderr,
                flush=True,
            )

        return tick


QUIET = Progress(enabled=False)
