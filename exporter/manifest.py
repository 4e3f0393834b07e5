"""`starcast.json`: what an export folder holds, how it was made, and the proof that it is right."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import onnx

from starcast.errors import UserError

MANIFEST = "starcast.json"
FORMAT_VERSION = 1


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    import numpy
    import onnxruntime
    import torch

    from starcast import __version__

    return {
        "starcast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
    }


def io_signature(model_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, element types and shapes (dimension names for dynamic axes) of the graph's inputs and outputs."""
    proto = onnx.load(str(model_path), load_external_data=False)

    def describe(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [dim.dim_param or dim.dim_value for dim in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "dtype": dtype, "shape": shape}

    return {"inputs": [describe(v) for v in proto.graph.input], "outputs": [describe(v) for v in proto.graph.output]}


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST and not path.name.startswith(".")
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    manifest = {"format": "starcast-export", "format_version": FORMAT_VERSION, **manifest}
    manifest["files"] = file_hashes(folder)
    staging = folder / f".{MANIFEST}.tmp"
    staging.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(staging, folder / MANIFEST)  # a reader sees the old manifest or the new one, never half of one


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    if not path.is_file():
        raise UserError(f"{folder}: not a starcast export (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "starcast-export":
        raise UserError(f"{path}: not a starcast export manifest")
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is present with the recorded sha256."""
    for name, digest in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{folder}: {name} is missing")
        if sha256(path) != digest:
            raise UserError(f"{folder}: {name} does not match its sha256 in {MANIFEST} (modified or corrupt)")
