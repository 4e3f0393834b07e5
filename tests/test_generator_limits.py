"""A Generator shared by threads gives each call what it gives alone; memory is checked before the KV cache is
allocated, and the caches of the batch sizes seen do not pile up. Real threads, a real ONNX Runtime session,
the process's own RSS."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from starcast.contract.errors import UserError
from starcast.runtime.generator import Generator
from starcast.runtime.limits import GeneratorBusy, available_memory

PROMPTS = ["def add(a, b):\n", "class Point:\n", "for i in range(", "import os\n"]


@pytest.fixture(scope="module")
def builtin_export(tmp_path_factory) -> Path:
    """builtin:tiny-python (6 layers, 1024 positions): a KV cache of 3 MiB a row, big enough to measure."""
    from starcast.pipeline.export import export

    folder = tmp_path_factory.mktemp("builtin") / "export"
    export("builtin:tiny-python", folder, fuse_target="cpu")
    return folder


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_threads_sharing_a_generator_each_get_what_they_get_alone(small_export):
    generator = Generator.from_pretrained(small_export)
    calls = [(PROMPTS[i % 4], dict(do_sample=i % 2 == 1, seed=i, temperature=0.8)) for i in range(16)]
    alone = [generator.generate_text(prompt, max_new_tokens=24, **options) for prompt, options in calls]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            together = list(pool.map(lambda c: generator.generate_text(c[0], max_new_tokens=24, **c[1]), calls))
            assert together == alone
    streams = [threading.Thread(target=lambda: list(generator.stream(PROMPTS[0], 16))) for _ in range(4)]
    for thread in streams:
        thread.start()
    for thread in streams:
        thread.join(timeout=60)
        assert not thread.is_alive()


def test_a_second_unfinished_stream_in_one_thread_is_a_clear_error(small_export):
    generator = Generator.from_pretrained(small_export)
    first = generator.stream(PROMPTS[0], 16)
    next(first)
    with pytest.raises(GeneratorBusy, match="already generating in this thread"):
        next(generator.stream(PROMPTS[1], 16))
    first.close()  # closing the stream ends its turn
    assert generator.generate_text(PROMPTS[1], max_new_tokens=8) == generator.generate_text(PROMPTS[1], 8)


def test_a_batch_too_big_for_memory_is_one_clear_error_before_allocating(builtin_export):
    generator = Generator.from_pretrained(builtin_export)
    batch = max(4096, 2 * available_memory() // generator.cache_bytes(1))
    before = rss_anon()
    with pytest.raises(UserError, match=f"a batch of {batch} .* GiB of memory, more than .* available"):
        generator.generate(np.ones((batch, 4), np.int64), max_new_tokens=4)
    assert rss_anon() - before < 256 * 2**20  # nothing like the cache was allocated
    assert generator.generate(np.ones((2, 4), np.int64), max_new_tokens=4).shape == (2, 8)


def test_memory_does_not_grow_with_the_batch_sizes_seen(builtin_export):
    generator = Generator.from_pretrained(builtin_export)
    ids = np.ones((1, 4), np.int64)
    generator.generate(ids, max_new_tokens=2)
    start = rss_anon()
    for _ in range(2):
        for batch in range(1, 17):
            generator.generate(np.repeat(ids, batch, axis=0), max_new_tokens=2)
    largest = generator.cache_bytes(16)  # one cache of the largest batch, zeroing included
    assert rss_anon() - start < largest + 64 * 2**20, (rss_anon() - start) / 2**20
