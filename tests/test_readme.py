"""The README's test command is what CI runs, and the package installs under the one `starcast` namespace."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

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
