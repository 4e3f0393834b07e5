"""`starcast demo`: the whole pipeline on the built-in trained model, end to end, in seconds.

Export `builtin:tiny-python` (a small GPTBigCode trained on the Python standard library, shipped inside the
package), fuse it, prove it against the PyTorch reference, then generate from a Python prompt (streamed) and
fill in the middle of a function.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from starcast.exporter.export import export
from starcast.progress import Progress

MODEL = "builtin:tiny-python"
PROMPT = "class Stack:\n    def __init__(self):\n        "
FIM_PREFIX = "class Stack:\n    def push(self, item):\n        "
FIM_SUFFIX = "\n\n    def pop(self):\n        return self.items.pop()\n"
# A 5M-parameter model repeats itself under plain greedy decoding; a mild repetition penalty keeps it going.
OPTIONS = {"repetition_penalty": 1.2}


def run_demo(scratch: Path, output: Path | None = None, out=sys.stdout) -> dict[str, Any]:
    from starcast.runtime.generator import Generator

    progress = Progress()
    folder = output or scratch / "export"
    manifest = export(MODEL, folder, overwrite=output is not None, fuse_target="cpu", progress=progress)
    generator = Generator.from_pretrained(folder)
    options = dict(max_new_tokens=64, stop_strings=["\nclass ", "\n\n\n"], **OPTIONS)

    print(f"\n--- {MODEL}: greedy continuation (streamed, {generator.graph_file}) ---", file=out)
    print(PROMPT, end="", file=out, flush=True)
    start, pieces = time.perf_counter(), []
    for piece in generator.stream(PROMPT, **options):
        pieces.append(piece)
        print(piece, end="", file=out, flush=True)
    elapsed = time.perf_counter() - start
    print(f"\n--- fill in the middle: {FIM_PREFIX!r} ... {FIM_SUFFIX!r} ---", file=out)
    middle = generator.fill_in_the_middle(FIM_PREFIX, FIM_SUFFIX, max_new_tokens=24, **OPTIONS)
    print(f"{FIM_PREFIX}\033[1m{middle}\033[0m{FIM_SUFFIX}", file=out)
    tokens = len(generator.tokenizer.encode("".join(pieces)))
    return {
        "model": MODEL,
        "parameters": manifest["parameters"],
        "parity": {k: manifest["parity"][k] for k in ("prompt_error", "decode_error", "tolerance", "passed")},
        "fused": {"ops": manifest["fused"]["fused_ops"], "parity_passed": manifest["fused"]["parity"]["passed"]},
        "generated_tokens": tokens,
        "decode_tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
        "export": str(output) if output else "(temporary, removed)",
        "timings_s": manifest["timings_s"],
    }
