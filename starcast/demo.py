"""`starcast demo`: the whole pipeline on the built-in trained model, end to end, in seconds.

Export `builtin:tiny-python` (a small GPTBigCode trained on the Python standard library, shipped inside the
package), fuse it, prove it against the PyTorch reference, then generate from a Python prompt (streamed) and
fill in the middle of a function.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from starcast.pipeline.export import export
from starcast.pipeline.progress import Progress

MODEL = "builtin:tiny-python"
PROMPT = "class Stack:\n    def __init__(self):\n        "
FIM_PREFIX = "class Stack:\n    def push(self, item):\n        "
FIM_SUFFIX = "\n\n    def pop(self):\n        return self.items.pop()\n"
# A 5M-parameter model repeats itself under plain greedy decoding; a mild repetition penalty keeps it going.
OPTIONS = {"repetition_penalty": 1.2}


def highlight(text: str, out) -> str:
    """The filled-in middle in bold on a terminal; between «» elsewhere (no escape codes in files)."""
    return f"\033[1m{text}\033[0m" if out.isatty() else f"«{text}»"


def run_demo(output: Path | None = None, overwrite: bool = False, out=sys.stdout, progress: Progress | None = None
             ) -> dict[str, Any]:  # fmt: skip
    if output is not None:
        return demo_in(output, overwrite, out, kept=True, progress=progress)
    with tempfile.TemporaryDirectory(prefix="starcast-demo-") as scratch:
        return demo_in(Path(scratch) / "export", False, out, kept=False, progress=progress)


def demo_in(folder: Path, overwrite: bool, out, kept: bool, progress: Progress | None = None) -> dict[str, Any]:
    from starcast.runtime.generator import Generator

    manifest = export(MODEL, folder, overwrite=overwrite, fuse_target="cpu", progress=progress or Progress())
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
    print(f"{FIM_PREFIX}{highlight(middle, out)}{FIM_SUFFIX}", file=out)
    tokens = len(generator.require_tokenizer().encode("".join(pieces)))
    plain = manifest.plain.parity
    return {
        "model": MODEL,
        "parameters": manifest.parameters,
        "parity": {
            "prompt_error": plain.measured["prompt_error"],
            "decode_error": plain.measured["decode_error"],
            "tolerance": plain.tolerance,
            "passed": plain.passed,
        },
        "fused": {"ops": manifest.fused.report["fused_ops"], "parity_passed": manifest.fused.parity.passed},
        "generated_tokens": tokens,
        "decode_tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
        "export": str(folder) if kept else "(temporary, removed)",
        "timings_s": manifest.timings_s,
    }
