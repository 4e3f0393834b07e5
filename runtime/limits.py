"""What keeps a Generator's calls from harming each other or the machine, and what a user is told instead of an
internal error: turns between threads, the host memory available before a large allocation, a config whose
n_positions exceeds the graph's position table, and ONNX Runtime's allocation failures."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from starcast.contract.errors import UserError
from starcast.contract.graph_files import PLAIN_MODEL, all_tensors, load_header
from starcast.contract.manifest import Manifest


class GeneratorBusy(UserError):
    """A second call on a Generator from the thread whose call has not ended (it would wait for itself)."""


class Turn:
    """A lock that other threads wait for, and that the thread holding it may not take again: that would be two
    unfinished streams interleaved on one cache, which can only deadlock or mix their tokens."""

    def __init__(self, what: str):
        self.what, self.lock, self.holder = what, threading.Lock(), None

    def __enter__(self) -> Turn:
        if self.holder == threading.get_ident():
            raise GeneratorBusy(
                f"this {self.what} is already generating in this thread (an unfinished stream?): exhaust or close "
                f"it first, or use a second {self.what}"
            )
        self.lock.acquire()
        self.holder = threading.get_ident()
        return self

    def __exit__(self, *exc: object) -> None:
        self.holder = None
        self.lock.release()


def available_memory() -> int | None:
    """Host memory available now (MemAvailable), else the physical memory, else None."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_available(nbytes: int, what: str) -> None:
    """Refuse, before allocating, more host memory than is available: one line instead of a MemoryError, or of
    the kernel's OOM killer while the buffer is zeroed."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise UserError(
            f"{what} needs {nbytes / 2**30:.1f} GiB of memory, more than the {available / 2**30:.1f} GiB available: "
            f"lower the batch or max_length"
        )


POSITION_TABLE = "transformer.wpe.weight"


def check_position_table(folder: Path, manifest: Manifest) -> None:
    """The config's n_positions must not exceed the rows of the graph's position table (wpe): past it every
    step would fail inside ONNX Runtime's Gather (`idx=1024`)."""
    if PLAIN_MODEL not in manifest.files:
        return
    path = manifest.path(folder, PLAIN_MODEL)
    table = next((t for t in all_tensors(load_header(path).graph) if t.name == POSITION_TABLE), None)
    if table is not None and table.dims and manifest.config.n_positions > table.dims[0]:
        raise UserError(
            f"{folder}: the config's n_positions ({manifest.config.n_positions}) exceeds the graph's position table "
            f"({table.dims[0]} positions): config.json does not describe this model"
        )


def ort_failure(exc: BaseException) -> UserError | None:
    """ONNX Runtime's own errors that have a cause a user can act on, as one line; None for the others."""
    text = str(exc)
    if "Failed to allocate" in text:
        size = re.search(r"buffer of size (\d+)", text)
        node = re.search(r"running (\w+) node", text)
        what = f"{int(size.group(1)) / 2**30:.2f} GiB" if size else "memory"
        where = f" for a {node.group(1)} step" if node else ""
        return UserError(f"ONNX Runtime could not allocate {what}{where} (out of memory): lower the batch, the "
                         f"prompt length or max_length")  # fmt: skip
    if "Gather" in text and "idx=" in text and "bounds" in text:
        return UserError(f"a position or token id is beyond the graph's tables ({text.splitlines()[0][-160:]})")
    return None
