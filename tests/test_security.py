"""A folder's contents decide nothing outside the folder: every name read from a manifest, a shard index or a
graph's external data is confined to its folder, and a crafted one is one line, exit 2, with a canary file
outside the folder unread, unmoved, unwritten and undeleted."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from conftest import Canary, assert_one_line, copy_export, rehash, rewrite_manifest, save_hf_checkpoint, starcast


@pytest.fixture
def canary(tmp_path):
    return Canary(tmp_path / "canary.onnx")


@pytest.fixture
def crafted(small_export, tmp_path):
    return copy_export(small_export, tmp_path / "crafted")


@pytest.mark.parametrize("name", ["../canary.onnx", "/tmp/../{tmp}/canary.onnx", "sub/../../canary.onnx"])
def test_quantize_refuses_a_model_name_outside_the_folder(crafted, canary, tmp_path, name):
    name = name.format(tmp=tmp_path)
    rewrite_manifest(crafted, lambda m: m.update(model=name, files={**m["files"], name: "0" * 64}))
    result = starcast("quantize", crafted, tmp_path / "q")
    assert_one_line(result, 2)
    assert canary.intact() and not (tmp_path / "q").exists()


def test_a_fused_model_name_outside_the_folder_is_refused_everywhere(crafted, canary, tmp_path):
    rewrite_manifest(crafted, lambda m: m["fused"].update(model="../canary.onnx"))
    for args in (("generate", crafted, "--ids", "1,2"), ("check", crafted), ("quantize", crafted, tmp_path / "q")):
        assert_one_line(starcast(*args), 2, "'..'")
    assert canary.intact() and not (tmp_path / "q").exists()


def test_files_listed_outside_the_folder_are_never_copied_or_written(crafted, canary, tmp_path):
    absolute = str(canary.path)
    for name, word in (("../canary.onnx", "'..'"), (absolute, "absolute")):
        rewrite_manifest(crafted, lambda m, n=name: m["files"].update({n: "0" * 64}))
        for command in ("optimize", "quantize"):
            assert_one_line(starcast(command, crafted, tmp_path / "out", "--overwrite"), 2, word)
        rewrite_manifest(crafted, lambda m, n=name: m["files"].pop(n))
    assert canary.intact() and not (tmp_path / "out").exists()


def test_a_symlink_inside_the_folder_does_not_lead_out_of_it(crafted, canary, tmp_path):
    (crafted / "escape").symlink_to(tmp_path)
    rewrite_manifest(crafted, lambda m: m["files"].update({"escape/canary.onnx": "0" * 64}))
    assert_one_line(starcast("optimize", crafted, tmp_path / "out"), 2, "symbolic link")
    # the graph itself a link to a file outside
    (crafted / "fused.onnx").unlink()
    (crafted / "fused.onnx").symlink_to(canary.path)
    assert_one_line(starcast("generate", crafted, "--ids", "1,2"), 2, "symbolic link")
    assert canary.intact()


def test_config_and_tokenizer_links_out_of_the_folder_are_refused(crafted, canary):
    for name in ("tokenizer.json", "config.json"):
        original = crafted / name
        original.rename(crafted / f"{name}.real")
        original.symlink_to(canary.path)
        assert_one_line(starcast("generate", crafted, "--prompt", "def"), 2, "symbolic link")
        original.unlink()
        (crafted / f"{name}.real").rename(original)
    assert canary.intact()


def test_external_data_locations_outside_the_folder_are_refused(crafted, canary, tmp_path):
    proto = onnx.load(str(crafted / "model.onnx"))
    tensor = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    for location, word in (("../canary.onnx", "'..'"), (str(canary.path), "absolute")):
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        target = next(t for t in copy.graph.initializer if t.name == tensor.name)
        target.ClearField("raw_data")
        target.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", "4")):
            entry = target.external_data.add()
            entry.key, entry.value = key, value
        onnx.save(copy, str(crafted / "model.onnx"))
        rehash(crafted)
        for args in (("generate", crafted, "--graph", "plain", "--ids", "1,2"), ("check", crafted, "--files-only")):
            assert_one_line(starcast(*args), 2, word)
    assert canary.intact()


def test_external_data_spans_beyond_their_file_are_refused(crafted):
    proto = onnx.load(str(crafted / "model.onnx"))
    tensor = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    (crafted / "weights.bin").write_bytes(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "8"), ("length", str(10**12))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(crafted / "model.onnx"))
    rehash(crafted)
    assert_one_line(starcast("generate", crafted, "--graph", "plain", "--ids", "1"), 2, "spans bytes")


def test_shard_index_entries_outside_the_checkpoint_are_refused(tmp_path, canary):
    _, model = save_hf_checkpoint(tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
    index_path = tmp_path / "ckpt" / "model.safetensors.index.json"
    (tmp_path / "ckpt" / "model.safetensors").unlink(missing_ok=True)
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    for name in ("../canary.onnx", str(canary.path)):
        index["weight_map"][first] = name
        index_path.write_text(json.dumps(index))
        assert_one_line(starcast("export", tmp_path / "ckpt", tmp_path / "out"), 2, "must stay inside")
    index["weight_map"][first] = ["not", "a", "name"]
    index_path.write_text(json.dumps(index))
    assert_one_line(starcast("export", tmp_path / "ckpt", tmp_path / "out"), 2, "file names")
    assert canary.intact() and not (tmp_path / "out").exists()


def test_builtin_names_stay_inside_the_package(canary):
    assert_one_line(starcast("export", "builtin:../../../../../../tmp/x", "/tmp/never"), 2, "'..'")
    assert not os.path.exists("/tmp/never")


def test_a_hugging_face_cache_snapshot_with_links_into_blobs_exports(tmp_path):
    """Hub downloads link their files into the repo folder's blobs/: that is inside the confinement root."""
    folder, _ = save_hf_checkpoint(tmp_path / "plain")
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc123"
    blobs = tmp_path / "hub" / "models--org--name" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in folder.iterdir():
        (blobs / file.name).write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blobs / file.name, snapshot))
    result = starcast("export", snapshot, tmp_path / "out", "--no-fuse")
    assert result.returncode == 0, result.stderr
    assert np.isfinite(json.loads((tmp_path / "out" / "starcast.json").read_text())["parity"]["prompt_error"])
