"""Nothing starcast did not create is deleted or replaced without --overwrite, never the input itself, and an
interrupted or killed run leaves nothing behind that the next run does not clean up or restore."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import OFFLINE, assert_one_line, save_hf_checkpoint, starcast

from starcast.pipeline.folders import MARKER


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def ckpt(tmp_path):
    return save_hf_checkpoint(tmp_path / "ckpt")[0]


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_demo_does_not_replace_an_existing_folder(tmp_path):
    kept = tmp_path / "mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert_one_line(starcast("demo", "--output", kept), 2, "already exists", "--overwrite")
    assert listing(kept) == ["notes.txt"]


def test_overwrite_never_replaces_a_folder_that_is_not_an_export(ckpt, tmp_path):
    kept = tmp_path / "mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert_one_line(starcast("export", ckpt, kept, "--overwrite"), 2, "starcast did not make it")
    assert listing(kept) == ["notes.txt"]


def test_overwrite_onto_the_input_or_around_it_is_refused(ckpt, tmp_path):
    before = listing(ckpt)
    for output in (ckpt, tmp_path, ckpt / "inside"):
        assert_one_line(starcast("export", ckpt, output, "--overwrite"), 2, "input")
    assert_one_line(starcast("export", ckpt, ".", "--overwrite", cwd=ckpt), 2, "input")
    assert listing(ckpt) == before
    assert starcast("export", ckpt, tmp_path / "out", "--no-fuse").returncode == 0
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "out")
    exported = listing(tmp_path / "out")
    for output in (tmp_path / "dir" / ".." / "out", tmp_path / "link"):
        assert_one_line(starcast("optimize", tmp_path / "out", output, "--overwrite"), 2, "input")
        assert_one_line(starcast("quantize", tmp_path / "out", output, "--overwrite"), 2, "input")
    assert listing(tmp_path / "out") == exported


def test_two_exports_racing_for_one_folder(ckpt, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "starcast", "export", str(ckpt), str(out), "--no-fuse"]
    runs = [subprocess.Popen(command, env=OFFLINE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(stderr for code, stderr in results if code == 2)
    assert "Traceback" not in loser and loser.strip().splitlines()[-1].startswith("starcast: error:")
    assert json.loads((out / "starcast.json").read_text())["format"] == "starcast-export"
    assert listing(tmp_path) == ["ckpt", "out"]


def test_a_folder_made_at_the_output_while_exporting_is_left_alone(ckpt, tmp_path):
    out = tmp_path / "out"
    run = subprocess.Popen(
        [sys.executable, "-m", "starcast", "export", str(ckpt), str(out), "--no-fuse"],
        env=OFFLINE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    while not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
        assert run.poll() is None, run.stderr.read()
        time.sleep(0.01)
    out.mkdir()
    (out / "theirs.txt").write_text("someone else's")
    assert run.wait(timeout=300) == 2
    assert "was created by something else" in run.stderr.read()
    assert listing(out) == ["theirs.txt"] and listing(tmp_path) == ["ckpt", "out"]


def test_sigterm_removes_the_temporary_folder(ckpt, tmp_path):
    run = subprocess.Popen(
        [sys.executable, "-m", "starcast", "export", str(ckpt), str(tmp_path / "out")],
        env=OFFLINE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    while not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
        assert run.poll() is None, run.stderr.read()
        time.sleep(0.01)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 143
    stderr = run.stderr.read()
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "starcast: terminated"
    assert listing(tmp_path) == ["ckpt"]


def test_the_next_run_removes_what_killed_runs_left(ckpt, tmp_path):
    pid = dead_pid()
    stale = tmp_path / f".out.tmp-{pid}-0a1b2c3d"
    stale.mkdir()
    (stale / MARKER).touch()
    (stale / "model.onnx.data").write_bytes(b"\0" * 1000)
    lookalike = tmp_path / f".out.tmp-{pid}-deadbeef"  # not ours: no marker, no manifest
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("not starcast's")
    alive = tmp_path / f".out.tmp-{os.getpid()}-01234567"  # a live process's: left alone
    alive.mkdir()
    (alive / MARKER).touch()
    assert starcast("export", ckpt, tmp_path / "out", "--no-fuse").returncode == 0
    assert not stale.exists() and (lookalike / "keep.txt").is_file() and alive.is_dir()


def test_a_kill_between_the_renames_of_overwrite_is_repaired(ckpt, tmp_path):
    out = tmp_path / "out"
    assert starcast("export", ckpt, out, "--no-fuse").returncode == 0
    before = (out / "starcast.json").read_text()
    killed = starcast(
        "export", ckpt, out, "--no-fuse", "--overwrite", env={**OFFLINE, "STARCAST_TEST_SWAP": "kill-between"}
    )
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists() and any(p.name.startswith(".out.old-") for p in tmp_path.iterdir())
    # The next run puts the old export back before anything else (here: it then refuses to replace it).
    assert_one_line(starcast("export", ckpt, out, "--no-fuse"), 2, "already exists")
    assert (out / "starcast.json").read_text() == before
    assert listing(tmp_path) == ["ckpt", "out"]


def test_overwrite_without_renameat2_swaps_and_cleans_up(ckpt, tmp_path):
    out = tmp_path / "out"
    assert starcast("export", ckpt, out, "--no-fuse").returncode == 0
    (out / "stale.txt").write_text("from before")
    result = starcast(
        "export", ckpt, out, "--no-fuse", "--overwrite", env={**OFFLINE, "STARCAST_TEST_SWAP": "two-renames"}
    )
    assert result.returncode == 0, result.stderr
    assert not (out / "stale.txt").exists() and listing(tmp_path) == ["ckpt", "out"]


def test_every_file_is_readable_by_others(tmp_path):
    """Large weights go to model.onnx.data, which tools wrote 0600; everything is 0644 (less the umask)."""
    folder, _ = save_hf_checkpoint(tmp_path / "ckpt", vocab_size=70_000, n_embd=64, n_head=4)
    result = starcast("export", folder, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert "model.onnx.data" in modes and set(modes.values()) == {0o666 & ~umask}, modes
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
