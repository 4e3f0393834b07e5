"""The exported ONNX graph computes what the reference (and so transformers) computes, step by step."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import VARIANTS, left_padded_batch, save_hf_checkpoint

from starcast.contract.interfaces import concat_inputs, positions_from_mask
from starcast.exporter.checkpoint import load_model, open_checkpoint
from starcast.pipeline.check import check_export
from starcast.pipeline.export import export
from starcast.runtime.session import create_session


def run_steps(folder, ids, mask, steps, dtype=np.float32):
    """Greedy: prompt step then `steps` decode steps through ONNX Runtime; yields (logits, valid-mask) per step."""
    session = create_session(folder / "model.onnx")
    cfg = load_config(folder)
    names = concat_inputs(cfg.n_layer)
    past = [np.zeros(cfg.cache_shape(ids.shape[0], 0), dtype) for _ in range(cfg.n_layer)]
    for _ in range(steps + 1):
        feeds = dict(zip(names, [ids, mask, positions_from_mask(mask)[:, -ids.shape[1] :], *past], strict=True))
        logits, *past = session.run(None, feeds)
        yield logits, mask[:, -ids.shape[1] :].astype(bool)
        ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)


def load_config(folder):
    from starcast.contract.config import GPTBigCodeConfig

    return GPTBigCodeConfig.from_file(folder / "config.json")


def reference_steps(model, ids, mask, steps):
    past = model.empty_past(ids.shape[0])
    for _ in range(steps + 1):
        tensors = [torch.from_numpy(a) for a in (ids, mask, positions_from_mask(mask)[:, -ids.shape[1] :])]
        with torch.no_grad():
            logits, *past = model(*tensors, *past)
        yield logits.numpy()
        ids = logits[:, -1].argmax(-1, keepdim=True).numpy()
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_onnx_matches_reference_fp32(tmp_path, variant):
    folder, _ = save_hf_checkpoint(tmp_path / "ckpt", **VARIANTS[variant])
    manifest = export(str(folder), tmp_path / "out", fuse_target=None)
    assert manifest.plain.parity.passed
    model = load_model(open_checkpoint(str(folder)))
    ids, mask = left_padded_batch(96, [6, 3, 1])
    steps = zip(run_steps(tmp_path / "out", ids, mask, 4), reference_steps(model, ids, mask, 4), strict=True)
    for step, ((ours, valid), ref) in enumerate(steps):
        error = np.abs(ours - ref)[valid].max()
        assert error < 1e-4, f"{variant} step {step}: {error:.2e}"


def test_onnx_matches_transformers_directly(checkpoint, tmp_path):
    folder, hf = checkpoint
    export(str(folder), tmp_path / "out", fuse_target=None)
    ids, mask = left_padded_batch(96, [5, 2])
    (logits, valid), *_ = run_steps(tmp_path / "out", ids, mask, 0)
    with torch.no_grad():
        expected = hf(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions_from_mask(mask)),
        ).logits.numpy()
    assert np.abs(logits - expected)[valid].max() < 1e-4


@pytest.mark.parametrize("multi_query", [True, False])
def test_fp16_export_loads_in_onnxruntime_and_matches(tmp_path, multi_query):
    folder, _ = save_hf_checkpoint(tmp_path / "ckpt", multi_query=multi_query)
    manifest = export(str(folder), tmp_path / "out", dtype="fp16", fuse_target=None)
    parity = manifest.plain.parity
    assert parity.passed and parity.kind == "rel" and parity.measured["prompt_error"] < 2e-2
    proto = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert proto.ir_version == 10
    float_inits = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in proto.graph.initializer if t.dims}
    assert np.dtype("float32") not in float_inits  # weights really are fp16
    # against the fp32 reference: fp16 logits stay within 2e-2 relative over decode steps too
    model = load_model(open_checkpoint(str(folder)))
    ids, mask = left_padded_batch(96, [6, 3])
    ours_steps = run_steps(tmp_path / "out", ids, mask, 3, dtype=np.float16)
    for (ours, valid), ref in zip(ours_steps, reference_steps(model, ids, mask, 3), strict=True):
        assert np.abs(ours.astype(np.float32) - ref)[valid].max() / np.abs(ref[valid]).max() < 2e-2


def test_plain_graph_contract(checkpoint, tmp_path):
    folder, _ = checkpoint
    manifest = export(str(folder), tmp_path / "out", fuse_target=None)
    proto = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert proto.opset_import[0].version == 17 and proto.ir_version == 10
    assert {node.domain for node in proto.graph.node} <= {""}  # standard ONNX only
    assert not {"If", "Loop"} & {node.op_type for node in proto.graph.node}
    inputs = {v["name"]: v for v in manifest.plain.io["inputs"]}
    assert inputs["input_ids"] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}
    assert inputs["attention_mask"]["shape"] == ["batch", "total_sequence"]
    assert inputs["past_key_values.1.key_value"]["shape"] == ["batch", "past_sequence", 16]
    outputs = {v["name"]: v for v in manifest.plain.io["outputs"]}
    assert outputs["logits"]["shape"] == ["batch", "sequence", 96]
    assert outputs["present.0.key_value"]["shape"] == ["batch", "total_sequence", 16]
    names = {init.name for init in proto.graph.initializer}
    assert len(names) == len(proto.graph.initializer)  # tied lm_head is not stored twice
    wte_bytes = 96 * 32 * 4
    assert sum(len(t.raw_data) for t in proto.graph.initializer if len(t.raw_data) == wte_bytes) == wte_bytes


def test_manifest_records_versions_hashes_and_parity(checkpoint, tmp_path):
    folder, _ = checkpoint
    export(str(folder), tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "starcast.json").read_text())
    assert set(manifest["versions"]) >= {"starcast", "torch", "onnx", "onnxruntime"}
    assert set(manifest["files"]) == {"model.onnx", "fused.onnx", "config.json", "generation_config.json"}
    assert manifest["fused"]["target"] == "cpu" and manifest["fused"]["parity"]["passed"]
    assert manifest["parity"]["passed"] and manifest["parity"]["tolerance"] == 1e-4
    assert manifest["config"]["n_layer"] == 2 and manifest["dtype"] == "fp32"


def test_check_reruns_parity_and_detects_modified_files(checkpoint, tmp_path):
    folder, _ = checkpoint
    export(str(folder), tmp_path / "out", fuse_target=None)
    lines = check_export(tmp_path / "out", source=str(folder)).lines
    assert lines[-1].startswith("parity ok")
    with open(tmp_path / "out" / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    from starcast.contract.errors import UserError

    with pytest.raises(UserError, match="does not match its sha256"):
        check_export(tmp_path / "out", source=str(folder))


def test_sharded_safetensors_and_bin_checkpoints_load_identically(tmp_path):
    _, hf = save_hf_checkpoint(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    hf.save_pretrained(tmp_path / "bin", safe_serialization=False)
    hf.save_pretrained(tmp_path / "bin-sharded", safe_serialization=False, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    assert (tmp_path / "bin-sharded" / "pytorch_model.bin.index.json").is_file()
    reference = load_model(open_checkpoint(str(tmp_path / "single"))).state_dict()
    for name in ("sharded", "bin", "bin-sharded"):
        state = load_model(open_checkpoint(str(tmp_path / name))).state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference), name


def test_safetensors_preferred_over_bin(tmp_path):
    folder, _ = save_hf_checkpoint(tmp_path / "ckpt", seed=0)
    _, other = save_hf_checkpoint(tmp_path / "other", seed=1)
    other.save_pretrained(folder, safe_serialization=False)  # a different pytorch_model.bin beside it
    (folder / "config.json").write_text((tmp_path / "other" / "config.json").read_text())
    checkpoint = open_checkpoint(str(folder))
    assert [p.name for p in checkpoint.weight_files] == ["model.safetensors"]


def test_overwrite_replaces_export(checkpoint, tmp_path):
    folder, _ = checkpoint
    out = tmp_path / "out"
    export(str(folder), out, fuse_target=None)
    (out / "stale.txt").write_text("from before")
    export(str(folder), out, overwrite=True, fuse_target=None)
    assert not (out / "stale.txt").exists() and (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]  # no temporary folders left
