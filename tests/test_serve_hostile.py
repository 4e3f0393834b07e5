"""`starcast serve` against hostile or unlucky clients, as real processes on 127.0.0.1: chunked uploads past the
body limit, a client that leaves a whole completion, SIGTERM with requests still queued, a second SIGTERM,
unknown paths, --max-queue 0, sampling at the edges. Bounded in count and time; servers stopped by their pid;
the server's RSS and /metrics are read afterwards."""

from __future__ import annotations

import http.client
import json
import select
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from test_serve import PROMPTS, client, get, metric, post, server

from starcast import __version__
from starcast.runtime.generator import Generator

UPLOAD = 64 << 20  # what each hostile client would send; the limit is 8 MiB


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def chunked_upload(port: int) -> tuple[int | None, int]:
    """POST a chunked body of up to UPLOAD bytes, stopping once the server answers: (status, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sent, chunk = 0, b'{"prompt": "' + b"x" * ((1 << 20) - 12)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        while sent < UPLOAD and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the server closed the connection: what it answered is still readable
                break
            sent += len(chunk)
        answer = sock.recv(4096)
        return (int(answer.split()[1]) if answer.startswith(b"HTTP/1.1 ") else None), sent
    finally:
        sock.close()


def test_oversized_and_chunked_bodies_stop_at_the_limit_and_cost_no_memory(small_export):
    with server(small_export) as (port, process):
        assert client(port).completions.create(model="x", prompt="x", max_tokens=2).choices  # warm
        before = rss(process.pid)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.putrequest("POST", "/v1/completions")
        connection.putheader("Content-Length", str(1 << 30))
        connection.endheaders()  # and no body at all: the header alone is refused
        response = connection.getresponse()
        assert response.status == 413 and "larger than" in json.loads(response.read())["error"]["message"]
        peak, done = [before], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(rss(process.pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(lambda _: chunked_upload(port), range(8)))
        finally:
            done.set()
            sampler.join()
        assert all(status == 413 and sent < UPLOAD for status, sent in results), results
        assert max(peak) - before < 160 << 20, (max(peak) - before) >> 20  # 8 x 64 MiB were offered
        assert client(port).completions.create(model="x", prompt="x", max_tokens=2).choices


def test_a_client_that_leaves_a_whole_completion_frees_its_row_at_once(long_export):
    with server(long_export) as (port, _):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = {"prompt": PROMPTS[0], "max_tokens": 2000, "temperature": 0}
        connection.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
        deadline = time.monotonic() + 20
        while metric(port, "starcast_running_rows") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert metric(port, "starcast_running_rows") == 1
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        left = time.monotonic()
        while metric(port, "starcast_running_rows") > 0 and time.monotonic() < left + 10:
            time.sleep(0.01)
        assert time.monotonic() - left < 1.0 and metric(port, "starcast_running_rows") == 0
        assert metric(port, 'starcast_finished_total{reason="cancelled"}') == 1
        assert metric(port, "starcast_generation_tokens_total") < 2000


def test_sigterm_answers_what_is_still_queued_503_and_ends_streams_with_done(long_export):
    with server(long_export, "--max-batch", "1", "--grace", "0.5") as (port, process):
        long = {"prompt": PROMPTS[0], "max_tokens": 2000, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(post, port, long)
            while metric(port, "starcast_running_rows") == 0:
                time.sleep(0.01)
            queued = pool.submit(post, port, {**long, "max_tokens": 8})
            stream = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            stream.request("POST", "/v1/completions", json.dumps({**long, "max_tokens": 8, "stream": True}),
                           {"content-type": "application/json"})  # fmt: skip
            response = stream.getresponse()
            while metric(port, "starcast_queue_length") < 2:
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            events = response.read().decode().split("\n\n")
            for cut in (running.result(timeout=60), queued.result(timeout=60)):
                assert cut[0] == 503 and "shut down" in cut[1]["error"]["message"], cut
        assert response.status == 200 and events[-2:] == ["data: [DONE]", ""], events
        assert "shut down" in json.loads(events[-3].removeprefix("data: "))["error"]["message"]
        assert process.wait(timeout=30) == 0
        log = process.log()
        assert "Traceback" not in log and "CancelledError" not in log, log


def test_a_second_sigterm_right_after_the_first_prints_no_traceback(small_export):
    with server(small_export) as (port, process):
        process.send_signal(signal.SIGTERM)
        time.sleep(0.002)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "Traceback" not in process.log() and "Exception ignored" not in process.log()


def test_unknown_paths_and_methods_get_openai_errors_and_no_public_docs(small_export):
    with server(small_export) as (port, _):
        for path, status in (("/nope", 404), ("/docs", 404), ("/redoc", 404), ("/openapi.json", 404)):
            code, text = get(port, path)
            assert code == status and json.loads(text)["error"]["message"] and "detail" not in text, (path, text)
        code, text = get(port, "/v1/completions")
        assert code == 405 and json.loads(text)["error"]["type"] == "invalid_request_error"
        assert __version__ != "0.1.0"


def test_max_queue_zero_serves_while_a_row_is_free(small_export):
    with server(small_export, "--max-batch", "1", "--max-queue", "0") as (port, _):
        body = {"prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0}
        assert post(port, body)[0] == 200  # healthy and serving, not 503 for everything
        with ThreadPoolExecutor(4) as pool:
            answers = [a[0] for a in pool.map(lambda _: post(port, body), range(4))]
        assert 200 in answers and set(answers) <= {200, 503}
        assert post(port, body)[0] == 200


def test_sampling_at_the_edges_through_the_server_is_the_likeliest_token(small_export):
    greedy = Generator.from_pretrained(small_export).generate_text(PROMPTS[1], max_new_tokens=12)
    assert greedy  # a 0 (end of sequence) picked through NaN would make it empty
    with server(small_export) as (port, _):
        for options in ({"temperature": 1e-39}, {"top_p": 1e-300}, {"temperature": 1e-39, "top_p": 1e-300}):
            status, answer, _ = post(port, {"prompt": PROMPTS[1], "max_tokens": 12, "seed": 3, **options})
            assert status == 200 and answer["choices"][0]["text"] == greedy, (options, answer)
        status, answer, _ = post(port, {"prompt": PROMPTS[1], "max_tokens": 12, "repetition_penalty": 1e-300})
        assert status == 200 and answer["usage"]["completion_tokens"] >= 1
