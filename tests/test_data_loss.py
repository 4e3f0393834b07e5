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


@pytest.mark.parametrize("signum, code, last", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, None)])
def test_a_second_signal_right_after_the_first_prints_no_traceback(ckpt, tmp_path, signum, code, last):
    for attempt in range(5):
        out = tmp_path / f"out{attempt}"
        run = subprocess.Popen(
            [sys.executable, "-m", "starcast", "export", str(ckpt), str(out)], env=OFFLINE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        while not any(p.name.startswith(f".{out.name}.tmp-") for p in tmp_path.iterdir()):
            assert run.poll() is None, run.stderr.read()
            time.sleep(0.01)
        run.send_signal(signum)
        time.sleep(0.001 * attempt)  # within milliseconds of the first
        run.send_signal(signum)
        assert run.wait(timeout=60) in (code, -signum), (attempt, run.stderr.read())  # -2: Python's own exit
        stderr = run.stderr.read()
        assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
        assert stderr.strip().splitlines()[-1].startswith("starcast: ")
        assert last is None or stderr.strip().splitlines()[-1] == f"starcast: {last}"
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
    unlocked = tmp_path / f".out.tmp-{os.getpid()}-01234567"  # a live pid, but no run holds its lock: stale
    unlocked.mkdir()
    (unlocked / MARKER).touch()
    assert starcast("export", ckpt, tmp_path / "out", "--no-fuse").returncode == 0
    assert not stale.exists() and (lookalike / "keep.txt").is_file() and not unlocked.exists()


HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_a_live_runs_temporary_folder_survives_whatever_its_pid_looks_like(ckpt, tmp_path):
    """Another PID namespace's run: its pid means nothing here (dead, or someone else's), its lock is held."""
    live = tmp_path / f".out.tmp-{dead_pid()}-0a1b2c3d"
    live.mkdir()
    (live / MARKER).touch()
    (live / "model.onnx.data").write_bytes(b"\0" * 1000)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(live)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        assert starcast("export", ckpt, tmp_path / "out", "--no-fuse").returncode == 0
        assert (live / "model.onnx.data").stat().st_size == 1000 and (live / MARKER).is_file()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert starcast("export", ckpt, tmp_path / "out", "--no-fuse", "--overwrite").returncode == 0
    assert not live.exists()  # its run ended (lock free): the next run removes it


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


def test_triton_repo_builds_outside_the_repository_and_overwrite_keeps_what_the_user_added(small_export, tmp_path):
    repo = tmp_path / "repo"
    assert_one_line(starcast("triton-repo", small_export, small_export / "repo"), 2, "input")
    assert not (small_export / "repo").exists()  # refused, and nothing left in the source export
    (repo / "other").mkdir(parents=True)
    run = subprocess.Popen([sys.executable, "-m", "starcast", "triton-repo", str(small_export), str(repo)], env=OFFLINE)
    seen = set()
    while run.poll() is None:
        seen |= {p.name for p in repo.iterdir()}
    assert run.wait() == 0 and seen <= {"other", "starcoder"}  # Triton polling REPO never sees a temporary folder
    assert listing(tmp_path) == ["repo"] and listing(repo) == ["other", "starcoder"]
    model = repo / "starcoder"
    for added in (model / "2", model / "notes.txt", model / "1" / "export" / "x"):
        added.mkdir() if added.name == "2" else added.write_text("mine")
        assert_one_line(starcast("triton-repo", small_export, repo, "--overwrite"), 2, str(added), "did not write")
        assert added.exists()
        added.rmdir() if added.is_dir() else added.unlink()
    assert starcast("triton-repo", small_export, repo, "--overwrite").returncode == 0
    assert listing(tmp_path) == ["repo"] and listing(repo / "starcoder") == ["1", "config.pbtxt"]


def test_triton_repo_on_a_full_file_system_leaves_no_empty_repository(small_export, tmp_path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("needs mount (a tmpfs) to make a full file system")
    try:
        line = assert_one_line(starcast("triton-repo", small_export, mount / "repo"), 2, "no space left on device")
        assert ".tmp-" not in line and listing(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)
