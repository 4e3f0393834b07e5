"""Peak anonymous memory of a process tree, sampled from /proc (Linux).

Anonymous memory (RssAnon) is what a process cannot give back to the kernel without swap: heap, arenas,
copies of weights. File-backed pages of memory-mapped checkpoints and graphs are not counted: the kernel drops
them under pressure. The benchmarks and the export memory test measure exports with it.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def rss_anon(pid: int) -> int:
    """RssAnon of one process in bytes; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    tree, stack = [], [pid]
    while stack:
        current = stack.pop()
        tree.append(current)
        stack.extend(children.get(current, []))
    return tree


@dataclass
class Measured:
    returncode: int
    wall_s: float
    peak_anon_bytes: int


def run_measured(command: list[str], interval_s: float = 0.05, **popen) -> Measured:
    """Run `command` to its end, sampling the RssAnon of its whole process tree every `interval_s`."""
    start = time.perf_counter()
    process = subprocess.Popen(command, **popen)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(rss_anon(p) for p in descendants(process.pid)))
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        returncode = process.wait()
    finally:
        done.set()
        sampler.join()
    return Measured(returncode, time.perf_counter() - start, peak)
