"""`starcast serve` as a real process on 127.0.0.1, talked to with the official `openai` client and plain HTTP:
the same text as Generator, streaming, fill-in-the-middle, concurrent requests that do not mix, disconnects,
bad requests, a full queue, SIGTERM. Every server is stopped by its process id; every loop is bounded."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from conftest import OFFLINE, free_ports, started

from starcast.runtime.generator import Generator

openai = pytest.importorskip("openai")
PROMPTS = ["def add(a, b):\n", "class Point:\n", "for i in range(", "print('", "import os\n", "x = [", "while ", "#"]


@contextmanager
def server(target, *options, env=None, timeout=120):
    """A `starcast serve` process on a free loopback port, ready; stopped by its pid at the end."""
    (port,) = free_ports()
    command = [sys.executable, "-m", "starcast", "serve", str(target), "--port", str(port), *map(str, options)]
    with started(command, f"http://127.0.0.1:{port}/health", env, timeout) as process:
        yield port, process


def get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.read().decode()


def post(port: int, body, raw: bytes | None = None) -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    connection.request("POST", "/v1/completions", data, {"content-type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read() or b"{}"), dict(response.getheaders())


def client(port: int):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)


def metric(port: int, name: str) -> float:
    text = get(port, "/metrics")[1]
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


@pytest.fixture(scope="module")
def served(small_export):
    with server(small_export, "--max-batch", "4") as (port, _):
        yield port, Generator.from_pretrained(small_export)


def test_greedy_completions_equal_the_generator_and_streams_join_to_them(served):
    port, generator = served
    api = client(port)
    for prompt in PROMPTS[:4]:
        expected = generator.generate_text(prompt, max_new_tokens=24)
        done = api.completions.create(model="small", prompt=prompt, max_tokens=24, temperature=0)
        assert done.choices[0].text == expected
        assert done.usage.prompt_tokens == len(generator.tokenizer.encode(prompt))
        assert done.usage.completion_tokens >= 1 and done.choices[0].finish_reason in ("stop", "length")
        pieces = api.completions.create(model="small", prompt=prompt, max_tokens=24, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in pieces if chunk.choices) == expected
    ids = generator.tokenizer.encode(PROMPTS[0])
    by_ids = api.completions.create(model="small", prompt=ids, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == generator.generate_text(PROMPTS[0], max_new_tokens=24)


def test_stop_strings_and_fill_in_the_middle(served):
    port, generator = served
    api = client(port)
    full = generator.generate_text(PROMPTS[0], max_new_tokens=24)
    stop = full[len(full) // 2 :][:2]
    cut = api.completions.create(model="small", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    middle = api.completions.create(
        model="small", prompt="def f(", suffix="):\n    return x\n", max_tokens=12, temperature=0
    )
    assert middle.choices[0].text == generator.fill_in_the_middle("def f(", "):\n    return x\n", max_new_tokens=12)


def test_eight_concurrent_requests_each_get_what_they_get_alone(served):
    port, generator = served
    api = client(port)
    lengths = [8 + 4 * i for i in range(8)]
    expected = [generator.generate_text(p, max_new_tokens=n) for p, n in zip(PROMPTS, lengths, strict=True)]

    def ask(index):
        stream = index % 2 == 0
        answer = api.completions.create(model="small", prompt=PROMPTS[index], max_tokens=lengths[index], temperature=0,
                                        stream=stream)  # fmt: skip
        return "".join(c.choices[0].text for c in answer if c.choices) if stream else answer.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(8))) == expected


def test_a_client_that_disconnects_mid_stream_frees_its_row(long_export):
    with server(long_export) as (port, _):
        disconnect_mid_stream(port)


def disconnect_mid_stream(port: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {"prompt": PROMPTS[0], "max_tokens": 2000, "temperature": 0, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 20
    while metric(port, "starcast_running_rows") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(port, "starcast_running_rows") == 0
    assert metric(port, 'starcast_finished_total{reason="cancelled"}') == 1
    assert metric(port, "starcast_generation_tokens_total") < 2000  # it stopped long before max_tokens


@pytest.mark.parametrize(
    "body, param",
    [
        (None, None),  # malformed JSON
        ({"max_tokens": 5}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "x", "temperature": -0.5}, "temperature"),
        ({"prompt": "x", "top_p": 2}, "top_p"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stop": [1, 2]}, "stop"),
        ({"prompt": [1, 2, 99999]}, "prompt"),
        ({"prompt": "x " * 200, "max_tokens": 16}, "prompt"),  # does not fit the cache
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "x", "temperature": 10**400}, "temperature"),
        ({"prompt": [10**20]}, "prompt"),
        ({"prompt": "x", "stop": ["y" * 300]}, "stop"),
        ("nested", None),  # JSON nested a hundred thousand levels deep
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(served, body, param):
    port, generator = served
    raw = (
        {None: b"{not json", "nested": b"[" * 100_000 + b"]" * 100_000}.get(body)
        if not isinstance(body, dict)
        else None
    )
    status, answer, _ = post(port, body, raw=raw)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]
    assert answer["error"]["param"] == param
    good = client(port).completions.create(model="small", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert good.choices[0].text == generator.generate_text(PROMPTS[1], max_new_tokens=8)


def test_a_body_beyond_the_limit_is_refused(served):
    """Refused from its Content-Length, before the body is read: the answer can come while the client still sends."""
    import select

    port, _ = served
    body = b'{"prompt": "' + b"x" * (9 << 20) + b'"}'
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))  # fmt: skip
        for start in range(0, len(body), 1 << 16):
            if select.select([sock], [], [], 0)[0]:
                break  # answered already
            sock.sendall(body[start : start + (1 << 16)])
        answer = b""
        while piece := sock.recv(65536):  # the server closes the connection after its answer
            answer += piece
    assert answer.startswith(b"HTTP/1.1 413") and b"larger than" in answer


def test_health_models_and_metrics(served):
    port, _ = served
    assert get(port, "/health") == (200, '{"status":"ok"}')
    models = client(port).models.list()
    assert [m.id for m in models.data] == ["export"]
    text = get(port, "/metrics")[1]
    names = ["requests_total", "queue_length", "running_rows", "prompt_tokens_total", "generation_tokens_total",
             "time_to_first_token_seconds_bucket", "time_per_output_token_seconds_bucket"]  # fmt: skip
    for name in names:
        assert f"starcast_{name}" in text, name
    assert metric(port, "starcast_generation_tokens_total") > 0


def test_a_full_queue_answers_503_with_retry_after(small_export):
    with server(small_export, "--max-batch", "1", "--max-queue", "1") as (port, _):
        body = {"prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0}
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: post(port, body), range(4)))
        busy = [a for a in answers if a[0] == 503]
        assert busy and all(a[0] in (200, 503) for a in answers)
        assert busy[0][2].get("retry-after") == "1" and busy[0][1]["error"]["message"]
        assert post(port, body)[0] == 200


def test_sigterm_lets_the_running_stream_finish_and_exits_0(small_export):
    with server(small_export) as (port, process):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0, "stream": True}
        connection.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
        response = connection.getresponse()
        assert response.readline().startswith(b"data: ")
        process.send_signal(signal.SIGTERM)
        rest = response.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        assert process.wait(timeout=30) == 0
        assert "Traceback" not in process.log()


def test_serving_the_builtin_model_exports_it_once(tmp_path):
    env = {**OFFLINE, "STARCAST_CACHE": str(tmp_path / "cache")}
    for _ in range(2):  # the second start reuses the cached export
        with server("builtin:tiny-python", env=env) as (port, _):
            assert [m.id for m in client(port).models.list().data] == ["tiny-python"]
            answer = client(port).completions.create(model="tiny-python", prompt="def add(a, b):", max_tokens=8)
            assert answer.usage.completion_tokens >= 1
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_a_folder_that_is_not_an_export_is_one_line_before_the_port_opens(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "starcast", "serve", str(tmp_path), "--port", str(free_ports()[0])],
        capture_output=True, text=True, env=OFFLINE, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip().startswith("starcast: error:")
    assert "Traceback" not in result.stderr
