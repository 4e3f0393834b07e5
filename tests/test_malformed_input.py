"""Every malformed input is one line naming the real cause and exit 2, never a traceback: configs, folders,
graphs, options, file systems, signals and pipes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from conftest import (
    OFFLINE,
    assert_one_line,
    copy_export,
    rehash,
    rewrite_manifest,
    save_hf_checkpoint,
    starcast,
)

from starcast.contract.errors import InvalidType
from starcast.runtime.generator import Generator


@pytest.fixture
def ckpt(tmp_path):
    return save_hf_checkpoint(tmp_path / "ckpt")[0]


def set_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    "field, value, word",
    [
        ("n_head", 0, "n_head"),
        ("n_layer", 10**9, "n_layer must be in 1..1024"),
        ("n_layer", 1e9, "n_layer must be an integer"),
        ("n_embd", -32, "n_embd"),
        ("n_embd", "32", "n_embd must be an integer"),
        ("vocab_size", None, "vocab_size"),
        ("multi_query", "yes", "multi_query"),
        ("layer_norm_epsilon", "tiny", "layer_norm_epsilon"),
        ("activation_function", "swish", "activation_function"),
        ("eos_token_id", -1, "eos_token_id"),
        ("n_positions", 10**12, "n_positions"),
    ],
)
def test_absurd_configs_are_refused_before_anything_is_allocated(ckpt, tmp_path, field, value, word):
    set_config(ckpt, **{field: value})
    assert_one_line(starcast("export", ckpt, tmp_path / "out"), 2, word)


def test_config_that_is_not_an_object_or_not_json(ckpt, tmp_path):
    (ckpt / "config.json").write_text("[1, 2]")
    assert_one_line(starcast("export", ckpt, tmp_path / "out"), 2, "not a JSON object")
    (ckpt / "config.json").write_bytes(b"\xff\xfe{")
    assert_one_line(starcast("export", ckpt, tmp_path / "out"), 2, "not UTF-8")


def test_shard_index_with_wrong_types(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    index = ckpt / "model.safetensors.index.json"
    for content, word in (
        ("[]", "weight_map"),
        ('{"weight_map": []}', "weight_map"),
        ('{"weight_map": {"a": 1}}', "file names"),
    ):
        index.write_text(content)
        assert_one_line(starcast("export", ckpt, tmp_path / "out"), 2, word)


def test_a_folder_starcast_may_not_read_says_permission_denied(ckpt, tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-r", "true"]).returncode != 0:
        pytest.skip("needs unshare -r (user namespaces) to make a file unreadable to root")
    config = ckpt / "config.json"
    shutil.chown(config, 12345, 12345)  # a user the namespace does not map: its mode bits bind even root
    config.chmod(0)
    line = assert_one_line(starcast("export", ckpt, tmp_path / "out", prefix=["unshare", "-r"]), 2, "permission denied")
    assert "corrupt" not in line and "truncated" not in line
    shutil.chown(ckpt, 12345, 12345)
    ckpt.chmod(0)
    assert_one_line(starcast("export", ckpt, tmp_path / "out", prefix=["unshare", "-r"]), 2, "permission denied")


@pytest.mark.parametrize(
    "change, word",
    [
        (lambda m: m.pop("config"), "config"),
        (lambda m: m.update(dtype="bf16"), "dtype"),
        (lambda m: m.update(dtype=16), "dtype"),
        (lambda m: m.update(format_version="2"), "format_version"),
        (lambda m: m.update(model=["model.onnx"]), "model"),
        (lambda m: m["config"].update(n_layer=3), "3 layers"),
        (lambda m: m["config"].update(vocab_size=97), "vocabulary 97"),
        (lambda m: m["fused"].update(target="tpu"), "target"),
        (lambda m: m["parity"].update(tolerance="small"), "tolerance"),
        (lambda m: m.update(files={"model.onnx": "abc"}), "sha256"),
    ],
)
def test_manifests_with_missing_mistyped_or_mismatched_fields(small_export, tmp_path, change, word):
    folder = copy_export(small_export, tmp_path / "export")
    rewrite_manifest(folder, change)
    (folder / "config.json").write_text(
        json.dumps(json.loads((folder / "starcast.json").read_text()).get("config", {}))
    )
    assert_one_line(starcast("generate", folder, "--ids", "1,2"), 2, word)


def test_graphs_from_other_tools_and_files_that_are_not_onnx(small_export, tmp_path):
    folder = copy_export(small_export, tmp_path / "export")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    other = onnx.helper.make_model(
        onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
        ir_version=10,
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    onnx.save(other, str(folder / "fused.onnx"))
    assert_one_line(starcast("generate", folder, "--ids", "1,2"), 2, "not a concat-cache GPTBigCode graph")
    (folder / "fused.onnx").write_bytes(b"GIF89a not a graph at all")
    assert_one_line(starcast("generate", folder, "--ids", "1,2"), 2, "not an ONNX model")


def test_outputs_that_cannot_be_written(ckpt, tmp_path):
    assert_one_line(starcast("export", ckpt, "/proc/starcast-out", "--no-fuse"), 2)
    mount = tmp_path / "mnt"
    mount.mkdir()
    # a disk too small for the export is refused before anything is written (pipeline/export.py: check_room)
    for options, word in (("ro,size=4m", "read-only file system"), ("size=64k", "not enough free space")):
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True).returncode:
            pytest.skip("needs mount (a tmpfs) to make a full or read-only file system")
        try:
            assert_one_line(starcast("export", ckpt, mount / "out", "--no-fuse"), 2, word)
            assert [p.name for p in mount.iterdir()] == []
        finally:
            subprocess.run(["umount", str(mount)], check=True)


def test_command_line_options_out_of_range(small_export, tmp_path):
    assert_one_line(starcast("generate", small_export, "--ids", "1", "--seed", "-1"), 2, "--seed")
    assert_one_line(starcast("generate", small_export, "--ids", "1", "--max-new-tokens", "0"), 2, "--max-new-tokens")
    assert_one_line(starcast("generate", small_export, "--ids", "1,99999"), 2, "outside the vocabulary")
    assert_one_line(starcast("generate", small_export, "--ids", "1", "--max-new-tokens", "100000"), 2, "overflow")
    too_big = starcast("bench", small_export, "--batch", "100000000", "--prompt-tokens", "8", "--new-tokens", "8")
    assert_one_line(too_big, 2, "memory")
    many = starcast("generate", small_export, "--ids", "1,2", "--threads", "100000", "--max-new-tokens", "2")
    assert many.returncode == 0, many.stderr  # capped at the cores there are


def test_a_prompt_that_is_not_utf8(small_export):
    result = subprocess.run(
        [sys.executable, "-m", "starcast", "generate", str(small_export), "--prompt", b"def \xff\xfe:"],
        capture_output=True, text=True, env=OFFLINE, timeout=300,
    )  # fmt: skip
    assert_one_line(result, 2, "UTF-8")


def test_eval_text_from_an_endless_device_is_read_bounded(small_export, tmp_path):
    result = starcast(
        "quantize", small_export, tmp_path / "q", "--eval-text", "/dev/zero", "--quantize", "int8", timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert (
        json.loads((tmp_path / "q" / "starcast.json").read_text())["quantization"]["accuracy"]["eval_tokens"] <= 65_536
    )


def test_python_api_argument_errors_are_type_and_value_errors(small_export):
    generator = Generator.from_pretrained(small_export)
    with pytest.raises(InvalidType, match="rectangular"):
        generator.generate([[1, 2, 3], [4]])
    with pytest.raises(InvalidType, match="integers"):
        generator.generate([[1.5, 2.0]])
    with pytest.raises(TypeError):
        generator.generate([[1, 2]], max_new_tokens=2.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generator.generate([[1, 2]], max_new_tokens=-3)
    with pytest.raises(TypeError):
        generator.generate([[1, 2]], do_sample=True, seed="seven")
    with pytest.raises(ValueError, match="seed"):
        generator.generate([[1, 2]], do_sample=True, seed=-1)
    with pytest.raises(TypeError, match="list of str"):
        generator.generate_texts("one prompt, not a list")
    big = Generator.from_pretrained(small_export, threads=100_000)  # capped, not 100,000 threads
    assert big.generate([[1, 2]], max_new_tokens=2).shape == (1, 4)


def test_interrupt_during_start_up_and_a_closed_pipe(small_export):
    # 0.1 s in, starcast is loading its modules (the first ~30 ms are Python's own start-up, not starcast's).
    early = subprocess.Popen(
        [sys.executable, "-m", "starcast", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(0.1)
    early.send_signal(signal.SIGINT)
    early.wait(timeout=60)
    stderr = early.stderr.read()
    assert early.returncode in (0, 130) and "Traceback" not in stderr, stderr

    run = subprocess.Popen(
        [sys.executable, "-m", "starcast", "generate", str(small_export), "--prompt", "def", "--stream",
         "--max-new-tokens", "100"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=OFFLINE,
    )  # fmt: skip
    run.stdout.read(1)
    run.stdout.close()  # `| head -c 1`
    assert run.wait(timeout=120) in (0, 141)
    assert b"Traceback" not in run.stderr.read()


def test_offline_hub_lookup_names_both_causes(tmp_path):
    line = assert_one_line(starcast("export", "bigcode/tiny_starcoder_py", tmp_path / "out"), 2)
    assert "no such folder" in line and "Hub cannot be reached" in line


def test_api_accepts_numpy_integer_types(small_export):
    generator = Generator.from_pretrained(small_export)
    out = generator.generate(np.array([[1, 2]], dtype=np.int32), max_new_tokens=np.int64(2))
    assert out.dtype == np.int64 and out.shape == (1, 4)


def test_manifests_with_nan_and_side_files_that_are_fifos(small_export, tmp_path):
    folder = copy_export(small_export, tmp_path / "export")
    text = (folder / "starcast.json").read_text().replace('"timings_s": {', '"timings_s": {"x": NaN, ', 1)
    (folder / "starcast.json").write_text(text)
    assert_one_line(starcast("generate", folder, "--ids", "1,2"), 2, "NaN")
    folder = copy_export(small_export, tmp_path / "fifo")
    (folder / "generation_config.json").unlink()
    os.mkfifo(folder / "generation_config.json")  # would block a reader that waits for a writer
    assert_one_line(starcast("generate", folder, "--ids", "1,2", timeout=60), 2, "not a regular file")


def test_a_leftover_folder_with_an_impossible_pid_is_left_alone(tmp_path):
    folder, _ = save_hf_checkpoint(tmp_path / "ckpt")
    odd = tmp_path / ".out.tmp-99999999999999999999-0a1b2c3d"
    odd.mkdir()
    result = starcast("export", folder, tmp_path / "out", "--no-fuse")
    assert result.returncode == 0, result.stderr
    assert odd.is_dir()


def test_a_config_with_more_positions_than_the_graphs_table_is_one_line(small_export, tmp_path):
    folder = copy_export(small_export, tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_positions": 256}))
    rewrite_manifest(folder, lambda m: m["config"].update(n_positions=256))
    rehash(folder)  # a consistent export whose config lies about the graph (128 positions)
    assert_one_line(starcast("generate", folder, "--ids", "1", "--max-new-tokens", "200"), 2, "position table", "128")


def test_onnx_runtimes_allocation_failure_is_one_line(small_export):
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit to cap the address space")
    command = ["bench", small_export, "--batch", "8000", "--prompt-tokens", "120", "--new-tokens", "2", "--runs", "1"]
    result = starcast(*command, prefix=["prlimit", f"--as={1200 << 20}"])
    line = assert_one_line(result, 2, "could not allocate", "GiB", "lower the batch")
    assert "internal error" not in line
