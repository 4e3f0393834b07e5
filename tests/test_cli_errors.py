"""Every user error is one line on stderr naming the problem, exit code 2, and nothing half-written."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line, save_hf_checkpoint, starcast
from safetensors.torch import load_file, save_file


def assert_user_error(result, *words):
    assert assert_one_line(result, 2, *words).startswith("starcast: error:")


@pytest.fixture
def ckpt(tmp_path):
    folder, _ = save_hf_checkpoint(tmp_path / "ckpt")
    return folder


def test_missing_folder(tmp_path):
    assert_user_error(starcast("export", tmp_path / "nope", tmp_path / "out"), "nope", "no such folder")
    assert not (tmp_path / "out").exists()


def test_hub_id_offline_is_a_clear_error(tmp_path):
    assert_user_error(starcast("export", "bigcode/tiny_starcoder_py", tmp_path / "out"), "bigcode/tiny_starcoder_py")


def test_wrong_model_type(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert_user_error(starcast("export", ckpt, tmp_path / "out"), "model_type", "llama")


def test_missing_tensor(ckpt, tmp_path):
    state = load_file(ckpt / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert_user_error(starcast("export", ckpt, tmp_path / "out"), "missing", "transformer.h.1.mlp.c_fc.weight")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_misshapen_tensor(ckpt, tmp_path):
    state = load_file(ckpt / "model.safetensors")
    state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"][:, :-1].contiguous()
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert_user_error(starcast("export", ckpt, tmp_path / "out"), "transformer.h.0.attn.c_attn.weight", "shape")


def test_truncated_safetensors(ckpt, tmp_path):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(starcast("export", ckpt, tmp_path / "out"), "model.safetensors", "corrupt or truncated")


def test_no_weights(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    assert_user_error(starcast("export", ckpt, tmp_path / "out"), "no weights")


def test_unsupported_dtype(ckpt, tmp_path):
    assert_user_error(starcast("export", ckpt, tmp_path / "out", "--dtype", "int3"), "int3")


def test_existing_output_is_refused_and_untouched(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_user_error(starcast("export", ckpt, out), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"


def test_failed_overwrite_keeps_previous_export(ckpt, tmp_path):
    out = tmp_path / "out"
    assert starcast("export", ckpt, out).returncode == 0
    before = (out / "starcast.json").read_text()
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:1000])
    assert_user_error(starcast("export", ckpt, out, "--overwrite"), "corrupt or truncated")
    assert (out / "starcast.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_check_on_a_folder_that_is_not_an_export(ckpt):
    assert_user_error(starcast("check", ckpt), "not a starcast export")


def test_unknown_option_is_one_line(ckpt, tmp_path):
    assert_user_error(starcast("export", ckpt, tmp_path / "out", "--frobnicate"), "--frobnicate")


def test_export_and_check_succeed_from_the_command_line(ckpt, tmp_path):
    result = starcast("export", ckpt, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    for stage in ("[trace]", "[weights]", "[save]", "[verify]", "parity ok"):
        assert stage in result.stderr
    result = starcast("check", tmp_path / "out")
    assert result.returncode == 0 and "parity ok" in result.stdout


def test_quantize_on_crafted_manifests_is_one_line(small_export, tmp_path):
    """Found by mutating every manifest field into `starcast quantize`: these two were internal errors."""
    from conftest import copy_export, rewrite_manifest

    for field in ("n_embd", "n_layer"):
        folder = copy_export(small_export, tmp_path / field)
        rewrite_manifest(folder, lambda m, field=field: m["config"].pop(field))
        assert_user_error(starcast("quantize", folder, tmp_path / f"{field}-out"), "config.json does not match")
        assert not (tmp_path / f"{field}-out").exists()


def test_optimize_on_a_quantized_plain_export_says_it_is_quantized(small_export, tmp_path):
    assert starcast("export", small_export.parent / "ckpt", tmp_path / "plain", "--no-fuse").returncode == 0
    assert starcast("quantize", tmp_path / "plain", tmp_path / "q").returncode == 0
    assert_user_error(starcast("optimize", tmp_path / "q", tmp_path / "o"), "is quantized", "int4")


def test_errors_name_the_users_output_not_the_temporary_folder(small_export, tmp_path):
    import onnx
    from conftest import rehash

    folder = tmp_path / "plain"
    assert starcast("export", small_export.parent / "ckpt", folder, "--no-fuse").returncode == 0
    proto = onnx.load(str(folder / "model.onnx"))
    table = next(t for t in proto.graph.initializer if "wpe" in t.name)
    table.raw_data = table.raw_data[:100]  # a consistent manifest around a graph ONNX Runtime cannot load
    onnx.save(proto, str(folder / "model.onnx"))
    rehash(folder)
    line = assert_one_line(starcast("optimize", folder, tmp_path / "out"), 2, str(tmp_path / "out" / "model.onnx"))
    assert ".tmp-" not in line and sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def test_a_tokenizer_whose_ids_exceed_the_vocabulary_fails_check(small_export, tmp_path):
    from conftest import copy_export, rehash

    folder = copy_export(small_export, tmp_path / "export")
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({"id": vocab + 5, "content": "<beyond>", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True})  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    rehash(folder)
    assert_user_error(starcast("check", folder, "--files-only"), "tokenizer.json", f"(0..{vocab - 1})", "vocabulary")
