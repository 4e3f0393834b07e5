"""Field by field, a valid manifest and a valid config are mutated (deleted, wrong type, out of range, a path
with `..`); every run of the command line ends in exit 0, 1 or 2 with no traceback, and nothing outside the
folder under test changes."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from conftest import Canary, run_in_process, save_hf_checkpoint

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
