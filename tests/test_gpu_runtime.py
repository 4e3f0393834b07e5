"""The GPU-path runtime fixes proven on the CPU: CUDA loading judged by a real session and searched where the
libraries are, every buffer and binding on the session's GPU, the last-token pick independent of tie order, and
the onnxruntime-gpu version the CUDA-graph path needs."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tomllib
import torch
from conftest import save_hf_checkpoint

from starcast.contract import interfaces as io
from starcast.contract.config import GPTBigCodeConfig
from starcast.contract.manifest import read_manifest
from starcast.pipeline.export import export
from starcast.runtime import cache
from starcast.runtime.batch_rows import SlotRows
from starcast.runtime.session import (
    SessionOptions,
    create_session,
    cuda_library_dirs,
    cuda_problem,
    device_id_from,
    device_id_of,
    load_cuda_libraries,
    probe_graph,
)
from starcast.runtime.steps import make_steps

ROOT = Path(__file__).resolve().parent.parent


def test_cuda_libraries_are_searched_in_every_nvidia_folder_on_the_path(tmp_path, monkeypatch):
    """onnxruntime installed apart from torch's nvidia wheels: preload_dlls is pointed at their folders."""
    site = tmp_path / "torch-site"
    for sub, name in (("cu13", "libcudart.so.13"), ("cudnn", "libcudnn.so.9")):
        (site / "nvidia" / sub / "lib").mkdir(parents=True)
        (site / "nvidia" / sub / "lib" / name).write_bytes(b"not a library")
    monkeypatch.syspath_prepend(str(site))
    found = cuda_library_dirs("13")
    assert (str(site / "nvidia" / "cu13" / "lib"), True) in found
    assert (str(site / "nvidia" / "cudnn" / "lib"), False) in found
    failed = load_cuda_libraries([d for d in found if d[0].startswith(str(site))])
    # onnxruntime tried the file in that folder (it is not a library, so it says so; cuDNN is optional to it)
    assert str(site / "nvidia" / "cu13" / "lib" / "libcudart.so.13") in failed


def test_cuda_is_judged_by_a_real_session():
    problem = cuda_problem(0)
    probe = ort.InferenceSession(
        probe_graph(),
        providers=[("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"],
    )
    assert (problem is None) == ("CUDAExecutionProvider" in probe.get_providers()), problem


def test_a_sessions_device_id_is_read_from_its_provider_options(tmp_path):
    assert device_id_from({"CUDAExecutionProvider": {"device_id": "3"}, "CPUExecutionProvider": {}}) == 3
    assert device_id_from({"CPUExecutionProvider": {}}) == 0
    folder, _ = save_hf_checkpoint(tmp_path / "ckpt")
    export(str(folder), tmp_path / "out", fuse_target=None)
    assert device_id_of(create_session(tmp_path / "out" / "model.onnx", SessionOptions("cpu"))) == 0


@pytest.fixture(scope="module")
def cuda_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-runtime")
    folder, hf = save_hf_checkpoint(root / "ckpt")
    export(str(folder), root / "out", fuse_target="cuda")
    return root / "out", hf


def spy_on_devices(monkeypatch) -> list[tuple[str, int]]:
    """Wrap starcast's own Device methods (not ONNX Runtime): record the GPU index each call uses."""
    calls = []
    for name in ("empty", "value", "bind", "bind_new_output"):
        original = getattr(cache.Device, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            calls.append((_name, self.id))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cache.Device, name, spy)
    return calls


def test_every_buffer_and_binding_gets_the_sessions_device_id(cuda_export, monkeypatch):
    folder, _ = cuda_export
    manifest = read_manifest(folder)
    config: GPTBigCodeConfig = manifest.config
    calls = spy_on_devices(monkeypatch)
    ids, mask = np.array([[0, 0, 5, 6], [7, 8, 9, 10]]), np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    for record in (manifest.plain, manifest.fused):
        session = create_session(manifest.path(folder, record.model), SessionOptions("cpu"))
        steps = make_steps(session, record.interface, config, 2, 16, np.float32, "cpu", device_id=3)
        steps.decode_one_token(steps.prefill(ids, mask).argmax(-1))
        steps.decode_one_token(np.array([1, 2]))
    rows = SlotRows(session, config, 4, 16, np.float32, "cpu", device_id=3)
    rows.admit(np.array([1, 2, 3]))
    rows.decode(np.array([4]))
    assert {name for name, _ in calls} == {"empty", "value", "bind", "bind_new_output"}
    # the one exception: total_sequence_length stays on the host (GroupQueryAttention reads it on the CPU)
    assert [call for call in calls if call[1] != 3] == [("value", 0)], calls


def test_only_device_creates_ortvalues_or_binds_by_device():
    """Every OrtValue and bind-by-device in the runtime's buffer code goes through cache.Device (so the spy above
    sees all of them)."""
    direct = {"ortvalue_from_numpy", "ortvalue_from_shape_and_type", "bind_input", "bind_output"}
    seen = 0
    for name in ("cache.py", "steps.py", "batch_rows.py"):
        tree = ast.parse((ROOT / "runtime" / name).read_text())
        inside = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == "Device":
                inside = {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in direct:
                if ast.unparse(node.value) in ("self.buffer", "self.logits"):  # a DeviceBuffer: through Device
                    continue
                assert id(node) in inside, f"runtime/{name}:{node.lineno} calls {node.attr} outside cache.Device"
                seen += 1
    assert seen == 5  # Device's own calls: the rule is looking at the right names


def flipped_argmax_copy(path: Path) -> Path:
    """The same graph with every ArgMax breaking ties toward the last index (as another backend may)."""
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "ArgMax":
            node.attribute.append(onnx.helper.make_attribute("select_last_index", 1))
    target = path.with_name("flipped-" + path.name)
    onnx.save(model, str(target))
    return target


def test_a_1_token_row_in_a_padded_batch_picks_its_own_token_whatever_the_tie_order(cuda_export):
    folder, hf = cuda_export
    manifest = read_manifest(folder)
    fused = manifest.path(folder, manifest.fused.model)
    ids = np.array([[0, 0, 0, 0, 7], [3, 4, 5, 6, 7], [0, 0, 9, 10, 11]])
    mask = (ids > 0).astype(np.int64)
    with torch.no_grad():
        expected = [hf(torch.from_numpy(row[row > 0][None])).logits[0, -1].numpy() for row in ids]
    for graph in (fused, flipped_argmax_copy(fused)):
        session = create_session(graph, SessionOptions("cpu"))
        steps = make_steps(session, io.STATIC_CACHE, manifest.config, 3, 16, np.float32, "cpu")
        np.testing.assert_allclose(steps.prefill(ids, mask), np.stack(expected), atol=1e-4, err_msg=graph.name)


def test_onnxruntime_gpu_is_required_at_the_version_with_the_cuda_graph_fix():
    text = (ROOT / "pyproject.toml").read_text()
    dependencies = tomllib.loads(text)["project"]["dependencies"]
    [gpu] = [d for d in dependencies if d.startswith("onnxruntime-gpu")]
    assert gpu.startswith("onnxruntime-gpu>=1.31"), gpu
    line = text.index('"onnxruntime-gpu>=1.31')
    assert "#32121" in text[text.rindex("\n", 0, text.rindex("\n", 0, line)) : line]  # the comment beside the pin
