"""What a newcomer trips on (#27): one meaning of temperature 0, help that names what exists and ends with an
example, messages that name the way out, the bound port printed, OpenAI's params named right."""

from __future__ import annotations

import http.client
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
from conftest import OFFLINE, copy_export, rewrite_manifest, run_in_process, serve_until_stopped

from starcast.cli.app import cli
from starcast.runtime.text import Tokenizer


def user_error(code: int, err: str, *words: str) -> None:
    """Exit 2 and one `starcast: error:` line naming each word, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and lines[-1].startswith("starcast: error: "), err
    assert sum(line.startswith("starcast: ") for line in lines) == 1, err
    assert all(word in lines[-1] for word in words), err


def without_tokenizer(small_export: Path, folder: Path) -> Path:
    copy_export(small_export, folder)
    (folder / "tokenizer.json").unlink()
    rewrite_manifest(folder, lambda m: m["files"].pop("tokenizer.json"))
    return folder


# -- generate: temperature 0 is greedy, a sampling option without --do-sample is an error ----------------------


def test_temperature_zero_is_greedy_and_sampling_options_need_do_sample(small_export):
    base = ("generate", small_export, "--ids", "1,2,3", "--max-new-tokens", "6", "--quiet")
    code, greedy, _ = run_in_process(*base)
    assert code == 0 and greedy.strip()
    code, zero, _ = run_in_process(*base, "--temperature", "0")
    assert (code, zero) == (0, greedy)
    for option in (("--temperature", "0.7"), ("--top-k", "5"), ("--top-p", "0.9"), ("--seed", "1")):
        user_error(*run_in_process(*base, *option)[::2], "--do-sample", option[0])
    user_error(*run_in_process(*base, "--do-sample", "--temperature", "0")[::2], "greedy")
    code, sampled, _ = run_in_process(*base, "--do-sample", "--temperature", "0.7", "--seed", "3")
    assert code == 0 and run_in_process(*base, "--do-sample", "--temperature", "0.7", "--seed", "3")[1] == sampled


def test_text_without_a_tokenizer_names_ids(small_export, tmp_path):
    folder = without_tokenizer(small_export, tmp_path / "bare")
    user_error(*run_in_process("generate", folder, "--prompt", "def", "--quiet")[::2], "--ids", "tokenizer.json")


# -- export, check, quantize, triton-repo --------------------------------------------------------------------


def test_export_of_an_export_names_optimize_and_quantize(small_export, tmp_path):
    err = run_in_process("export", small_export, tmp_path / "again")[::2]
    user_error(*err, "export already", "starcast optimize", "starcast quantize")
    assert not (tmp_path / "again").exists()


def test_check_reports_the_tokenizer_and_one_form_of_tolerance(small_export, tmp_path):
    code, out, _ = run_in_process("check", small_export)
    assert code == 0 and "tokenizer ok" in out, out
    assert set(re.findall(r"tolerance (\S+?)[),]", out)) == {"1e-04"}, out
    code, out, _ = run_in_process("check", without_tokenizer(small_export, tmp_path / "bare"), "--files-only")
    assert code == 0 and "tokenizer: none" in out and "--ids" in out, out


def test_quantize_int8_dynamic_names_no_block_size(small_export, tmp_path):
    code, _, err = run_in_process("quantize", small_export, tmp_path / "q", "--quantize", "int8-dynamic")
    assert code == 0, err
    quantize_lines = [line for line in err.splitlines() if line.startswith("[quantize]") and "int8-dynamic" in line]
    assert quantize_lines and not any("block" in line for line in quantize_lines), err


def test_triton_repo_refuses_an_export_without_a_tokenizer(small_export, tmp_path):
    folder = without_tokenizer(small_export, tmp_path / "bare")
    user_error(*run_in_process("triton-repo", folder, tmp_path / "repo")[::2], "tokenizer.json", "Triton")
    assert not (tmp_path / "repo").exists()


def test_selftest_on_the_cpu_times_no_cuda_graph(tmp_path):
    from starcast.pipeline.export import export
    from starcast.selftest import timings

    manifest = export("builtin:tiny-python", tmp_path / "out", fuse_target="cpu")
    assert set(timings(tmp_path / "out", "cpu", 0, manifest.config.vocab_size)) == {"fused", "plain"}


# -- help ------------------------------------------------------------------------------------------------------


def test_top_level_help_summaries_are_whole_and_each_command_ends_with_an_example():
    code, out, _ = run_in_process("--help")
    commands = out.split("Commands:", 1)[1]
    assert code == 0 and "..." not in commands, out
    for name, command in cli.commands.items():
        assert command.short_help and name in out
        last = command.help.strip().splitlines()[-1].strip()
        assert last.startswith(f"Example: starcast {name}"), (name, last)
        args = shlex.split(last.removeprefix("Example: starcast "))
        assert args[0] == name
        with command.make_context(name, args[1:]) as ctx:  # the example parses: its options and values exist
            assert ctx.params


def test_help_names_only_arguments_the_command_has():
    for name, command in cli.commands.items():
        arguments = {p.name.upper() for p in command.params if isinstance(p, click.Argument)}
        for param in command.params:
            for word in re.findall(r"\b[A-Z]+_[A-Z]+\b", getattr(param, "help", None) or ""):
                assert word in arguments, f"{name} {param.opts[0]}: help names {word}"


# -- serve -----------------------------------------------------------------------------------------------------


def post_json(port: int, body: dict) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_serve_on_port_zero_prints_the_bound_port_and_names_params_right(small_export):
    with tempfile.TemporaryFile(mode="w+") as log:
        command = [sys.executable, "-m", "starcast", "serve", str(small_export), "--port", "0", "--max-length", "64"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True, env=OFFLINE)
        process.log = lambda: (log.seek(0), log.read())[1]
        deadline, port = time.monotonic() + 120, None
        while port is None and time.monotonic() < deadline and process.poll() is None:
            found = re.search(r"on http://127\.0\.0\.1:(\d+)", process.log())
            port = int(found.group(1)) if found else time.sleep(0.1)
        assert port, process.log()
        assert port != 0
        for _ in serve_until_stopped(process, f"http://127.0.0.1:{port}/health", 60):
            status, body = post_json(port, {"prompt": [1, 2, 3], "max_tokens": 200})
            assert (status, body["error"]["param"]) == (400, "max_tokens"), body
            status, body = post_json(port, {"prompt": list(range(1, 70)), "max_tokens": 2})
            assert (status, body["error"]["param"]) == (400, "prompt"), body
            status, body = post_json(port, {"prompt": [1, 2], "max_tokens": 2, "logprobs": 0})
            assert (status, body["error"]["param"]) == (400, "logprobs"), body
            status, body = post_json(port, {"model": "any-name", "prompt": [1, 2], "max_tokens": 2})
            assert status == 200 and body["model"] == small_export.name, body  # the name is not checked (README)
            # Fill in the middle: `suffix`, or the FIM tokens written into `prompt` (what most IDE plugins send).
            fim = {"prompt": "def f(", "suffix": "):\n    return x\n", "max_tokens": 6, "temperature": 0}
            written = Tokenizer.from_export(small_export).fim_prompt(fim["prompt"], fim["suffix"])
            assert "<fim_prefix>" in written
            by_suffix = post_json(port, fim)
            by_prompt = post_json(port, {"prompt": written, "max_tokens": 6, "temperature": 0})
            assert by_suffix[0] == 200 and by_prompt[1]["choices"][0]["text"] == by_suffix[1]["choices"][0]["text"]
            assert by_prompt[1]["usage"] == by_suffix[1]["usage"]


# -- progress on a terminal ------------------------------------------------------------------------------------


def on_a_terminal(args: list[str], timeout: float = 300) -> str:
    """Run a command with stderr (and stdout) on a real pseudo-terminal; what it wrote there."""
    import os
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=OFFLINE)
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the command ended and closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=30) == 0, b"".join(chunks)
    return b"".join(chunks).decode()


def test_a_running_stage_counts_its_seconds_on_a_terminal():
    code = (
        "import time\nfrom starcast.cli.ticker import TerminalProgress\np = TerminalProgress()\np.interval = 0.2\n"
        "with p.stage('trace', '6 layers'):\n    time.sleep(1.1)\np.say('after')\n"
    )
    shown = on_a_terminal([sys.executable, "-c", code])
    assert shown.count("\r[trace] 6 layers ... ") >= 3, repr(shown)  # counts up in place
    lines = shown.replace("\r\n", "\n").split("\n")
    assert any(line.startswith("[trace] done in") for line in lines) and "after" in lines, repr(shown)


def test_off_a_terminal_the_stage_lines_are_plain_and_on_one_each_stage_still_ends(small_export, tmp_path):
    code, _, err = run_in_process("check", small_export, "--files-only")
    assert code == 0 and "\r" not in err and re.search(r"^\[files\] .* \.\.\.\n\[files\] done in", err, re.M), err
    shown = on_a_terminal([sys.executable, "-m", "starcast", "export", "builtin:tiny-python", tmp_path / "e"])
    assert "[trace] done in" in shown and "[verify] done in" in shown, repr(shown)
