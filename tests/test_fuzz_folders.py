"""Field by field, a valid manifest and a valid config are mutated (deleted, wrong type, out of range, a path
with `..`); every run of the command line ends in exit 0, 1 or 2 with no traceback, and nothing outside the
folder under test changes."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from conftest import Canary, run_in_process, save_hf_checkpoint, write_tokenizer

MUTATIONS = {
    "deleted": None,
    "a list": ["x"],
    "a string": "x",
    "a float": 1.5,
    "negative": -1,
    "huge": 10**15,
    "null": None,
    "an object": {"a": 1},
    "a path out": "../canary.txt",
}


def paths(value, prefix=()):
    """Every (path of keys) to a leaf or object in a JSON document, objects included."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield (*prefix, key)
            if key not in ("histogram_before", "histogram_after", "io"):  # large, and read by no code path
                yield from paths(inner, (*prefix, key))


def mutate(document: dict, path: tuple, mutation: str) -> dict:
    changed = copy.deepcopy(document)
    parent = changed
    for key in path[:-1]:
        parent = parent[key]
    if mutation == "deleted":
        del parent[path[-1]]
    else:
        parent[path[-1]] = MUTATIONS[mutation]
    return changed


def ends_cleanly(*args) -> int:
    code, _, err = run_in_process(*args)
    assert code in (0, 1, 2), (code, err)
    assert "Traceback" not in err
    if code:
        assert err.strip().splitlines()[-1].startswith("starcast: "), err
    return code


def test_mutated_manifests(small_export, tmp_path):
    canary = Canary(tmp_path / "canary.txt")
    original = json.loads((small_export / "starcast.json").read_text())
    folder = tmp_path / "export"
    shutil.copytree(small_export, folder)
    runs = codes = 0
    for path in list(paths(original)):
        for mutation in MUTATIONS:
            (folder / "starcast.json").write_text(json.dumps(mutate(original, path, mutation)))
            for args in (
                ("generate", folder, "--ids", "1,2", "--max-new-tokens", "2"),
                ("check", folder, "--files-only"),
            ):
                codes += ends_cleanly(*args) != 0
                runs += 1
            assert canary.intact() and sorted(p.name for p in tmp_path.iterdir()) == ["canary.txt", "export"]
    assert runs > 300 and codes > runs // 3  # many mutations are refused (others touch records no code reads)


@pytest.mark.parametrize(
    "field",
    ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
     "layer_norm_epsilon", "multi_query", "scale_attn_weights", "attention_softmax_in_fp32", "eos_token_id",
     "model_type"],
)  # fmt: skip
def test_mutated_configs(tmp_path, field):
    folder, _ = save_hf_checkpoint(tmp_path / "ckpt")
    canary = Canary(tmp_path / "canary.txt")
    original = json.loads((folder / "config.json").read_text())
    for mutation in MUTATIONS:
        (folder / "config.json").write_text(json.dumps(mutate(original, (field,), mutation)))
        ends_cleanly("export", folder, tmp_path / "out", "--no-fuse", "--overwrite", "--quiet")
        assert canary.intact()
        assert set(p.name for p in tmp_path.iterdir()) <= {"ckpt", "canary.txt", "out"}


LINKED = ["config.json", "tokenizer.json", "starcast.json", "model.onnx.data", "generation_config.json"]


@pytest.fixture(scope="module")
def external_export(tmp_path_factory):
    """A plain export whose weights are external data (model.onnx.data), as every real model's are."""
    from starcast.pipeline.export import export

    root = tmp_path_factory.mktemp("external")
    write_tokenizer(root / "ckpt")
    folder, _ = save_hf_checkpoint(root / "ckpt", vocab_size=70_000, n_embd=64)
    export(str(folder), root / "export", fuse_target=None)
    assert (root / "export" / "model.onnx.data").is_file()
    return root / "export"


@pytest.mark.parametrize("name", [*LINKED, "two-link cycle"])
def test_symlink_loops_are_one_line_and_exit_2(external_export, tmp_path, name):
    """A link to itself, or a -> b -> a, where a file of the export should be: never 'internal error'."""
    canary = Canary(tmp_path / "canary.txt")
    folder = tmp_path / "export"
    shutil.copytree(external_export, folder)
    victim = "config.json" if name == "two-link cycle" else name
    (folder / victim).unlink()
    if name == "two-link cycle":
        (folder / "a").symlink_to("b")
        (folder / "b").symlink_to("a")
        (folder / victim).symlink_to("a")
    else:
        (folder / victim).symlink_to(victim)
    for args in (
        ("generate", folder, "--ids", "1,2", "--max-new-tokens", "2"),
        ("check", folder, "--files-only"),
        ("check", folder),
        ("optimize", folder, tmp_path / "optimized"),
        ("quantize", folder, tmp_path / "quantized"),
        ("triton-repo", folder, tmp_path / "repo"),
    ):
        code, _, err = run_in_process(*args)
        lines = err.strip().splitlines()
        assert code == 2 and "Traceback" not in err and lines[-1].startswith("starcast: error: "), (args, code, err)
        assert "internal error" not in err and ("loop of symbolic links" in lines[-1] or victim in lines[-1]), err
    assert canary.intact() and sorted(p.name for p in tmp_path.iterdir()) == ["canary.txt", "export"]


def test_a_checkpoint_whose_config_is_a_symlink_loop_is_one_line(tmp_path):
    folder, _ = save_hf_checkpoint(tmp_path / "ckpt")
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to("config.json")
    code, _, err = run_in_process("export", folder, tmp_path / "out", "--no-fuse")
    assert code == 2 and "loop of symbolic links" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out").exists()


def test_a_fifo_in_an_export_is_not_a_regular_file(small_export, tmp_path):
    import os

    folder = tmp_path / "export"
    shutil.copytree(small_export, folder)
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")
    for args in (("check", folder, "--files-only"), ("generate", folder, "--ids", "1", "--max-new-tokens", "1")):
        code, _, err = run_in_process(*args)
        assert code == 2 and "tokenizer.json is not a regular file" in err.strip().splitlines()[-1], err
