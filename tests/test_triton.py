"""A repository from `starcast triton-repo`, served by the real Triton Inference Server (the tritonserver binary and
Python backend bundled in the nvidia-pytriton wheel), talked to with tritonclient (gRPC streaming) and Triton's
HTTP generate endpoint. Servers listen on 127.0.0.1 only and are stopped by their process ids; every wait is
bounded."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import free_ports, started

from starcast.runtime.generator import Generator
from starcast.triton.repository import write_repository

grpcclient = pytest.importorskip("tritonclient.grpc")
pytriton = pytest.importorskip("pytriton", reason="the nvidia-pytriton wheel (tritonserver) cannot install here")
TRITON = Path(pytriton.__file__).parent / "tritonserver"
LIBS = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
NAME = "starcoder"
PROMPTS = ["def add(a, b):\n", "class Stack:\n", "import os\n", "for i in range(", "x = [", "while ", "#", "print("]


@pytest.fixture(scope="module")
def backends(tmp_path_factory) -> Path:
    """Triton's Python backend with the stub for this Python beside it (what the bundled server needs)."""
    folder = tmp_path_factory.mktemp("backends")
    shutil.copytree(TRITON / "backends" / "python", folder / "python")
    stub = TRITON / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy(stub / "triton_python_backend_stub", folder / "python")
    return folder


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> tuple[Path, Path]:
    """(repository, export) for builtin:tiny-python."""
    from starcast.pipeline.export import export

    root = tmp_path_factory.mktemp("triton")
    export("builtin:tiny-python", root / "export", fuse_target="cpu")
    write_repository(root / "export", root / "repo", NAME, instances=1, max_batch=8)
    return root / "repo", root / "export"


@contextmanager
def tritonserver(repo: Path, backends: Path, timeout: float = 120):
    http, grpc, metrics = free_ports(3)
    command = [
        str(TRITON / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={backends}",
        f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}", "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1", "--log-verbose=0",
    ]  # fmt: skip
    env = {**os.environ, "LD_LIBRARY_PATH": f"{LIBS}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    with started(command, f"http://127.0.0.1:{http}/v2/health/ready", env, timeout) as process:
        yield {"http": http, "grpc": grpc, "process": process}


def stream(port: int, inputs: dict[str, np.ndarray], timeout: float = 60) -> tuple[list[int], str, str | None]:
    """One request over gRPC streaming: (token ids, text, error)."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    tensors = []
    for name, value in inputs.items():
        dtype = (
            "BYTES"
            if value.dtype == object
            else {"int64": "INT64", "int32": "INT32", "float32": "FP32"}[value.dtype.name]
        )
        tensor = grpcclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    client.async_stream_infer(NAME, tensors)
    tokens, text, error = [], "", None
    try:
        while True:
            result, failure = results.get(timeout=timeout)
            if failure is not None:
                error = str(failure)
                break
            tokens += result.as_numpy("token_ids").tolist()
            text += b"".join(result.as_numpy("text")).decode()
            if result.as_numpy("finished")[0]:
                break
    finally:
        client.stop_stream()
        client.close()
    return tokens, text, error


def prompt_inputs(prompt: str, max_tokens: int) -> dict[str, np.ndarray]:
    return {"prompt": np.array([prompt.encode()], dtype=object), "max_tokens": np.array([max_tokens], np.int32)}


def alone(generator: Generator, prompt: str, max_tokens: int) -> list[int]:
    ids = generator.tokenizer.encode(prompt)
    out = generator.generate([ids], max_new_tokens=max_tokens)[0, len(ids) :].tolist()
    eos = generator.eos_token_id
    return out[: out.index(eos)] if eos in out else out


@pytest.fixture(scope="module")
def served(repository, backends):
    repo, export_folder = repository
    with tritonserver(repo, backends) as ports:
        yield ports, Generator.from_pretrained(export_folder)


def test_greedy_tokens_through_grpc_streaming_and_http_equal_the_generator(served):
    ports, generator = served
    for prompt in PROMPTS[:3]:
        tokens, text, error = stream(ports["grpc"], prompt_inputs(prompt, 24))
        assert error is None and tokens[: len(alone(generator, prompt, 24))] == alone(generator, prompt, 24)
        assert text == generator.generate_text(prompt, max_new_tokens=24)
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 24}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{ports['http']}/v2/models/{NAME}/generate_stream", body)
    events = [json.loads(line[6:]) for line in urllib.request.urlopen(request, timeout=60).read().decode().splitlines()
              if line.startswith("data: ")]  # fmt: skip
    assert "".join(e["text"] for e in events) == generator.generate_text(PROMPTS[0], max_new_tokens=24)
    assert events[-1]["finished"] and events[-1]["finish_reason"] in ("stop", "length")
    ids = np.array(generator.tokenizer.encode(PROMPTS[1]), np.int64)
    tokens, _, error = stream(ports["grpc"], {"prompt_ids": ids, "max_tokens": np.array([16], np.int32)})
    assert error is None and tokens == alone(generator, PROMPTS[1], 16)[: len(tokens)] and tokens


def test_eight_concurrent_streams_each_get_what_they_get_alone(served):
    ports, generator = served
    lengths = [10 + 3 * i for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: stream(ports["grpc"], prompt_inputs(PROMPTS[i], lengths[i])), range(8)))
    for index, (tokens, _, error) in enumerate(got):
        assert error is None and tokens == alone(generator, PROMPTS[index], lengths[index])


def test_bad_requests_are_triton_errors_and_the_instance_keeps_serving(served):
    ports, generator = served
    _, _, error = stream(ports["grpc"], {"max_tokens": np.array([8], np.int32)})
    assert "exactly one of the inputs prompt" in error
    _, _, error = stream(ports["grpc"], {"prompt_ids": np.array([1.0, 2.0], np.float32)})
    assert "prompt_ids" in error and ("FP32" in error or "data type" in error.lower() or "datatype" in error.lower())
    _, _, error = stream(ports["grpc"], prompt_inputs(PROMPTS[0], 5000))
    assert "maximum length" in error
    tokens, _, error = stream(ports["grpc"], prompt_inputs(PROMPTS[2], 12))
    assert error is None and tokens == alone(generator, PROMPTS[2], 12)


def test_two_servers_behind_round_robin_survive_losing_one(repository, backends):
    repo, export_folder = repository
    generator = Generator.from_pretrained(export_folder)
    with tritonserver(repo, backends) as first, tritonserver(repo, backends) as second:
        servers = [first, second]
        with ThreadPoolExecutor(6) as pool:
            futures = [
                pool.submit(stream, servers[i % 2]["grpc"], prompt_inputs(PROMPTS[i], 900), 30) for i in range(6)
            ]
            time.sleep(0.3)  # the streams are running
            os.kill(second["process"].pid, signal.SIGKILL)
            results = [future.result(timeout=120) for future in futures]
        survivors, lost = results[0::2], results[1::2]
        assert all(error is None and len(tokens) > 0 for tokens, _, error in survivors)
        assert all(error is not None for _, _, error in lost)
        retried, _, error = stream(first["grpc"], prompt_inputs(PROMPTS[1], 12))
        assert error is None and retried == alone(generator, PROMPTS[1], 12)


def test_a_triton_repo_killed_while_it_copies_leaves_a_repository_tritonserver_serves(repository, backends, tmp_path):
    _, export_folder = repository
    repo = tmp_path / "repo"
    write_repository(export_folder, repo, NAME)
    command = [sys.executable, "-m", "starcast", "triton-repo", str(export_folder), str(repo), "--name", "second"]
    for _ in range(20):  # until the kill lands while it copies
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while run.poll() is None and not any(p.name.startswith(".repo.second.tmp-") for p in tmp_path.iterdir()):
            pass
        run.kill()
        run.wait()
        if run.returncode == -signal.SIGKILL and not (repo / "second").exists():
            break
        shutil.rmtree(repo / "second", ignore_errors=True)
    else:
        pytest.fail("triton-repo was never killed while copying")
    assert any(p.name.startswith(".repo.second.tmp-") for p in tmp_path.iterdir())  # beside REPO, not in it
    assert sorted(p.name for p in repo.iterdir()) == [NAME]
    with tritonserver(repo, backends) as ports:  # fails on a half-written or unexpected folder in REPO
        tokens, _, error = stream(ports["grpc"], prompt_inputs(PROMPTS[0], 8))
        assert error is None and tokens
    old_style = repo / f".second.tmp-{os.getpid()}-0a1b2c3d"  # what 0.2 left inside the repository
    old_style.mkdir()
    (old_style / ".starcast-partial").touch()
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # the next run cleaned up
    assert sorted(p.name for p in repo.iterdir()) == ["second", NAME]
