"""`pip install starcast` is the runtime: generate, bench and check run where PyTorch and the graph passes
cannot be imported, and the commands that need the export extra say so in one line."""

from __future__ import annotations

import subprocess
import sys

from conftest import OFFLINE, assert_one_line

EXPORT_EXTRA = ("torch", "onnxscript", "onnx_ir", "safetensors", "transformers", "huggingface_hub")
BLOCK = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None  # `import name` now raises ImportError\n"


def runtime_only(*args):
    code = BLOCK.format(names=EXPORT_EXTRA) + "from starcast.cli import main\nmain(sys.argv[1:])\n"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=OFFLINE, timeout=300
    )


def test_generate_bench_and_check_run_without_pytorch(small_export):
    generated = runtime_only("generate", small_export, "--prompt", "def add(a, b):\n", "--max-new-tokens", "8")
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr
    ids = runtime_only("generate", small_export, "--ids", "3,4,5", "--max-new-tokens", "4")
    assert ids.returncode == 0 and len(ids.stdout.strip().split(",")) == 7, ids.stderr
    bench = runtime_only("bench", small_export, "--prompt-tokens", "8", "--new-tokens", "4", "--runs", "1", "--json")
    assert bench.returncode == 0 and "decode_tokens_per_s" in bench.stdout, bench.stderr
    files = runtime_only("check", small_export, "--files-only")
    assert files.returncode == 0 and "files ok" in files.stdout, files.stderr
    fused = runtime_only("check", small_export)  # re-proves the fused graph: ONNX Runtime alone
    assert fused.returncode == 0 and "fused parity ok" in fused.stdout, fused.stderr


def test_commands_that_need_the_exporter_say_which_extra(small_export, tmp_path):
    for args in (
        ("export", "builtin:tiny-python", tmp_path / "out"),
        ("optimize", small_export, tmp_path / "out"),
        ("quantize", small_export, tmp_path / "out"),
        ("demo",),
        ("check", small_export, "--source", "builtin:tiny-python"),
    ):
        assert_one_line(runtime_only(*args), 2, "in a starcast clone, pip install '.[export]'")
    assert not (tmp_path / "out").exists()
