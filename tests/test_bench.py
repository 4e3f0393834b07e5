"""`starcast bench`: the figures it reports, its JSON, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import save_hf_checkpoint

from starcast.contract.errors import UserError
from starcast.pipeline.export import export
from starcast.runtime.bench import bench


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    folder, _ = save_hf_checkpoint(root / "ckpt")
    export(str(folder), root / "out")
    return root


def test_bench_times_the_graph_generate_would_run(exported):
    fused = bench(exported / "out", batch=2, prompt_tokens=16, new_tokens=8, runs=2)
    assert fused.graph == "fused.onnx" and fused.batch == 2 and fused.runs == 2
    assert 0 < fused.prefill_ms <= fused.time_to_first_token_ms and fused.decode_ms_per_step > 0
    plain = bench(exported / "out", batch=1, prompt_tokens=16, new_tokens=8, runs=1, graph="plain")
    assert plain.graph == "model.onnx"


def test_bench_cli_json_and_errors(exported):
    def run(*args):
        command = [sys.executable, "-m", "starcast", "bench", *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    done = run(exported / "out", "--json", "--prompt-tokens", "8", "--new-tokens", "4", "--runs", "1")
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) >= {"prefill_ms", "decode_tokens_per_s", "peak_rss_mib"}
    for args, words in (
        ((exported / "ckpt",), "not a starcast export"),
        ((exported / "out", "--prompt-tokens", "120", "--new-tokens", "20"), "exceed the export's maximum length 128"),
    ):
        done = run(*args)
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr
    with pytest.raises(UserError, match="new tokens >= 2"):
        bench(exported / "out", new_tokens=1)
