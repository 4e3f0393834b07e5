"""What joining and leaving the running batch costs on a concat-cache graph (runtime/batch_rows.py's ConcatRows).

    python benchmarks/join_cost.py EXPORT_DIR [--rows 8] [--length 512] [--threads 2]

With `rows` rows decoding at a common length L: the time of one decode step; of a row leaving (it becomes a
hole, nothing is copied); of a new row joining a hole with a prompt no longer than L (its own prefill, then its
cache written into the row: no other row's cache is copied); of the re-layout a longer prompt forces (every row's
cache copied once). Medians of `repeats`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from starcast.contract.dtypes import numpy_dtype
from starcast.runtime.batch_rows import ConcatRows
from starcast.runtime.export_folder import choose_graph, open_export
from starcast.runtime.session import SessionOptions, create_session


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=512, help="The common length L when rows join.")
    parser.add_argument("--prompt", type=int, default=32, help="A joining prompt's length (<= L).")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    manifest = open_export(args.export)
    record = choose_graph(manifest, "cpu", "auto").record
    session = create_session(manifest.path(args.export, record.model), SessionOptions("cpu", args.threads))
    config = manifest.config
    rows = ConcatRows(session, config, args.rows, args.length + 256, numpy_dtype(manifest.dtype))
    rng = np.random.default_rng(0)
    for _ in range(args.rows):
        rows.admit(rng.integers(1, config.vocab_size, args.length))
    tokens = np.ones(args.rows, np.int64)
    step, leave, join, relayout = [], [], [], []
    for _ in range(args.repeats):
        step.append(timed(lambda: rows.decode(tokens)))
        leave.append(timed(lambda: rows.release(args.rows // 2)))
        join.append(timed(lambda: rows.admit(rng.integers(1, config.vocab_size, args.prompt))))
        prefill_only = timed(lambda: session.run(None, prefill_feeds(config, args.prompt, rows)))
        join[-1] -= prefill_only  # what joining adds beyond the prompt's own prefill
        relayout.append(timed(lambda: rows.relayout(min_length=rows.length + 1)))
    medians = {name: round(statistics.median(v), 3) for name, v in
               (("decode_step_ms", step), ("leave_ms", leave), ("join_beyond_prefill_ms", join),
                ("relayout_ms", relayout))}  # fmt: skip
    print(json.dumps({"rows": args.rows, "length": args.length, "prompt": args.prompt, **medians,
                      "relayout_over_step": round(medians["relayout_ms"] / medians["decode_step_ms"], 3)}))  # fmt: skip


def prefill_feeds(config, prompt: int, rows: ConcatRows) -> dict:
    from starcast.contract import interfaces as io

    feeds = {io.INPUT_IDS: np.ones((1, prompt), np.int64), io.ATTENTION_MASK: np.ones((1, prompt), np.int64),
             io.POSITION_IDS: np.arange(prompt)[None]}  # fmt: skip
    for past, _ in io.merged_cache_names(config.n_layer):
        feeds[past] = np.zeros(config.cache_shape(1, 0), rows.dtype)
    return feeds


if __name__ == "__main__":
    main()
