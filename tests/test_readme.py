"""The README's test command is what CI runs, and the package installs under the one `starcast` namespace."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OFFLINE, free_ports, starcast, started

ROOT = Path(__file__).resolve().parent.parent


def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- test-command -->", 1)[1].split("```", 2)[1]
    return block.strip()


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert readme_test_command() in ci_lines


def test_subpackages_live_under_the_starcast_namespace(tmp_path):
    for name in ("starcast.exporter", "starcast.graphs", "starcast.runtime"):
        module = importlib.import_module(name)
        assert Path(module.__file__).parent == ROOT / name.split(".")[1]
    # Outside the source tree, the generic names are not installed.
    for generic in ("exporter", "graphs", "runtime"):
        probe = subprocess.run([sys.executable, "-c", f"import {generic}"], cwd=tmp_path, capture_output=True)
        assert probe.returncode != 0, f"a top-level '{generic}' package is installed"


# -- the README's examples run as pasted, and its Commands table is the command line's ------------------------

SKIP = re.compile(r"<!-- readme-test: skip \((.+?)\) -->\s*$")


def readme_blocks(language: str) -> list[tuple[str, str | None]]:
    """Every fenced block of `language` ("" for a bare fence): (code, the reason it is skipped, from a marker line
    just before it)."""
    lines, blocks = (ROOT / "README.md").read_text().splitlines(), []
    index = 0
    while index < len(lines):
        if lines[index].startswith("```"):
            end = lines.index("```", index + 1)
            if lines[index][3:].strip() == language:
                before = next((line for line in reversed(lines[:index]) if line.strip()), "")
                marker = SKIP.search(before)
                blocks.append(("\n".join(lines[index + 1 : end]) + "\n", marker.group(1) if marker else None))
            index = end
        index += 1
    return blocks


PYTHON_BLOCKS = readme_blocks("python")


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory) -> Path:
    """A working folder with `out/`: `starcast export builtin:tiny-python out/`, as the README says."""
    folder = tmp_path_factory.mktemp("readme")
    result = starcast("export", "builtin:tiny-python", folder / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    return folder


def test_the_readme_has_python_examples_and_says_why_any_is_skipped():
    assert len(PYTHON_BLOCKS) >= 3
    assert [reason for _, reason in PYTHON_BLOCKS if reason] == [
        "needs a running tritonserver; tests/test_triton.py serves the same requests"
    ]


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_each_python_example_of_the_readme_runs_as_pasted(index, readme_folder):
    code, reason = PYTHON_BLOCKS[index]
    if reason:
        pytest.skip(reason)
    run = lambda source: subprocess.run(  # noqa: E731
        [sys.executable, "-c", source], cwd=readme_folder, capture_output=True, text=True, env=OFFLINE, timeout=300
    )
    if "127.0.0.1:8000" not in code:
        result = run(code)
        assert result.returncode == 0, result.stderr
        return
    pytest.importorskip("openai")
    (port,) = free_ports()  # the README's server, `starcast serve out/`, on a free port instead of 8000
    command = [sys.executable, "-m", "starcast", "serve", str(readme_folder / "out"), "--port", str(port)]
    with started(command, f"http://127.0.0.1:{port}/health"):
        result = run(code.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # the streamed completion was printed


def commands_table() -> dict[str, str]:
    """Command name -> the text of its rows in the README's Commands table."""
    text = (ROOT / "README.md").read_text().split("## Commands", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for name, usage in re.findall(r"^\| `starcast (\S+)(.*?)` \|", text, re.M):
        rows[name] = rows.get(name, "") + " " + usage
    return rows


def test_the_commands_table_lists_every_command_option_and_argument():
    import click

    from starcast.cli.app import cli

    rows = commands_table()
    assert set(rows) == set(cli.commands)
    for name, command in cli.commands.items():
        options = {opt for param in command.params if isinstance(param, click.Option) for opt in param.opts}
        options = {opt for opt in options if opt.startswith("--")}
        listed = set(re.findall(r"--[a-z0-9][a-z0-9-]*", rows[name]))
        assert listed == options, (name, "missing:", options - listed, "not an option:", listed - options)
        for argument in (p.name.upper() for p in command.params if isinstance(p, click.Argument)):
            assert argument in rows[name], (name, argument)


def test_the_readme_curl_example_gets_a_completion(readme_folder):
    """The shell example that runs on a CPU: the server's curl request (the other shell blocks install, start
    long-running servers, need a GPU or Triton, or show a transcript, which `starcast demo`'s test checks)."""
    import json
    import shutil

    (code,) = [code for code, _ in readme_blocks("") if code.startswith("curl http://127.0.0.1:8000/v1/completions")]
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    (port,) = free_ports()
    command = [sys.executable, "-m", "starcast", "serve", str(readme_folder / "out"), "--port", str(port)]
    with started(command, f"http://127.0.0.1:{port}/health"):
        shell = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        result = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["choices"][0]["text"] and answer["usage"]["completion_tokens"] >= 1, answer


def shape(text: str) -> list[str]:
    """The transcript with its figures and the model's folder masked: what every run prints the same."""
    text = re.sub(r"^\[weights\] \S+ ->", "[weights] MODEL ->", text, flags=re.M)
    return re.sub(r"\d+(\.\d+)?(e[-+]\d+)?", "N", text).rstrip().splitlines()


def test_starcast_demo_prints_the_readme_transcript_but_for_its_figures(tmp_path):
    block = (ROOT / "README.md").read_text().split("<!-- demo-transcript -->\n```\n", 1)[1].split("\n```", 1)[0]
    assert block.startswith("$ starcast demo\n")
    result = subprocess.run(
        [sys.executable, "-m", "starcast", "demo"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=OFFLINE, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert shape(result.stdout) == shape(block.removeprefix("$ starcast demo\n"))
