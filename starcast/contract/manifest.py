"""`starcast.json`: what an export folder holds, how it was made and the proof that it is right, read and written
here and nowhere else.

A manifest comes from a folder, so reading one validates every field's type, confines every file name it
holds to the folder, and checks that the names the runtime will open are among the hashed files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from starcast.contract.config import GPTBigCodeConfig
from starcast.contract.dtypes import DTYPES
from starcast.contract.errors import UserError
from starcast.contract.interfaces import INTERFACES, TARGET_INTERFACES
from starcast.contract.paths import confine, os_reason, read_json

MANIFEST = "starcast.json"
FORMAT = "starcast-export"
FORMAT_VERSION = 2  # 1: the fused graph in fused/ with weights of its own; 2: it shares the plain graph's
READABLE_VERSIONS = (1, 2)
SHA256 = re.compile(r"[0-9a-f]{64}")
PROOF_KINDS = ("abs", "rel")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions, read from package metadata (nothing is imported)."""
    import platform

    versions = {"python": platform.python_version()}
    for name in ("starcast", *names):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if "onnxruntime" not in versions and "onnxruntime-gpu" in versions:
        versions["onnxruntime"] = versions["onnxruntime-gpu"]  # the same package, built with CUDA
    return versions


# -- validating what was read ---------------------------------------------------------------------------------


def take(raw: dict, key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    """raw[key], which must be of `kind` (bool is never an int here); a missing key is an error unless a default
    is given."""
    if key not in raw:
        if default is ...:
            raise UserError(f"{where}: field {key!r} is missing")
        return default
    value = raw[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise UserError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def finite(value: Any, where: str) -> float:
    try:
        number = float(value) if not isinstance(value, bool) and isinstance(value, (int, float)) else math.nan
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise UserError(f"{where}: {str(value)[:40]} is not a finite number")
    return number


@dataclass
class Proof:
    """A parity record: how a graph was compared (abs / rel error), the tolerance, and what was measured."""

    kind: str
    tolerance: float
    passed: bool
    measured: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, raw: Any, where: str) -> Proof:
        if not isinstance(raw, dict):
            raise UserError(f"{where}: not a JSON object")
        kind = take(raw, "kind", str, where)
        if kind not in PROOF_KINDS:
            raise UserError(f"{where}: kind {kind!r} is not one of {', '.join(PROOF_KINDS)}")
        tolerance = finite(take(raw, "tolerance", (int, float), where), f"{where}.tolerance")
        if tolerance <= 0:
            raise UserError(f"{where}: tolerance must be > 0")
        measured = {k: v for k, v in raw.items() if k not in ("kind", "tolerance", "passed")}
        return cls(kind, tolerance, take(raw, "passed", bool, where), measured)

    def to_json(self) -> dict[str, Any]:
        return {**self.measured, "kind": self.kind, "tolerance": self.tolerance, "passed": self.passed}


@dataclass
class GraphRecord:
    """One ONNX graph of the export: its file, interface, the io signature and the proof that it is right."""

    model: str
    interface: str
    io: dict[str, Any]
    parity: Proof
    target: str | None = None  # fused graphs: the execution provider they were made for
    report: dict[str, Any] = field(default_factory=dict)  # fused graphs: node counts, histograms, matches

    @classmethod
    def read(cls, raw: Any, where: str, fused: bool) -> GraphRecord:
        if not isinstance(raw, dict):
            raise UserError(f"{where}: not a JSON object")
        model = take(raw, "model", str, where)
        target = take(raw, "target", str, where) if fused else None
        if fused and target not in TARGET_INTERFACES:
            raise UserError(f"{where}: target {target!r} is not one of {', '.join(TARGET_INTERFACES)}")
        interface = take(raw, "interface", str, where, TARGET_INTERFACES[target] if fused else INTERFACES[0])
        if interface not in INTERFACES:
            raise UserError(f"{where}: interface {interface!r} is not one of {', '.join(INTERFACES)}")
        io = take(raw, "io", dict, where, {})
        parity = Proof.read(take(raw, "parity", dict, where), f"{where}.parity")
        fixed = ("model", "target", "interface", "io", "parity")
        report = {k: v for k, v in raw.items() if k not in fixed} if fused else {}
        return cls(model, interface, io, parity, target, report)

    def to_json(self) -> dict[str, Any]:
        target = {"target": self.target} if self.target else {}
        return {"model": self.model, **target, "interface": self.interface, "io": self.io, **self.report,
                "parity": self.parity.to_json()}  # fmt: skip


@dataclass
class Manifest:
    source: str
    dtype: str
    config: GPTBigCodeConfig
    plain: GraphRecord
    parameters: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    opset: int = 17
    ir_version: int = 10
    fused: GraphRecord | None = None
    quantization: dict[str, Any] | None = None
    tensorrt: dict[str, Any] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def graphs(self) -> list[GraphRecord]:
        return [self.plain] + ([self.fused] if self.fused else [])

    def to_json(self) -> dict[str, Any]:
        plain = self.plain.to_json()
        body: dict[str, Any] = {
            "format": FORMAT,
            "format_version": self.format_version,
            "source": self.source,
            "model": plain.pop("model"),
            "dtype": self.dtype,
            "opset": self.opset,
            "ir_version": self.ir_version,
            "config": self.config.to_hf_dict(),
            "parameters": self.parameters,
            "versions": self.versions,
            "io": plain.pop("io"),
            "parity": plain.pop("parity"),
        }
        for name in ("fused", "quantization", "tensorrt"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value.to_json() if isinstance(value, GraphRecord) else value
        return {**body, "timings_s": self.timings_s, "files": self.files}

    @classmethod
    def from_json(cls, raw: Any, folder: Path) -> Manifest:
        where = str(folder / MANIFEST)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise UserError(f"{where}: not a starcast export manifest")
        version = take(raw, "format_version", int, where)
        if version not in READABLE_VERSIONS:
            raise UserError(f"{where}: format_version {version} is not one this starcast reads ({READABLE_VERSIONS})")
        dtype = take(raw, "dtype", str, where)
        if dtype not in DTYPES:
            raise UserError(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        config = GPTBigCodeConfig.from_hf_dict(take(raw, "config", dict, where), f"{where}: config")
        plain = GraphRecord.read(
            {"model": take(raw, "model", str, where), "io": raw.get("io", {}), "parity": raw.get("parity")},
            where,
            fused=False,
        )
        files = take(raw, "files", dict, where)
        for name, digest in files.items():
            confine(folder, name, f"{where}: files")
            if not isinstance(digest, str) or not SHA256.fullmatch(digest):
                raise UserError(f"{where}: files[{name!r}] is not a sha256 digest")
        manifest = cls(
            source=take(raw, "source", str, where),
            dtype=dtype,
            config=config,
            plain=plain,
            parameters=take(raw, "parameters", int, where, 0),
            versions=take(raw, "versions", dict, where, {}),
            opset=take(raw, "opset", int, where, 17),
            ir_version=take(raw, "ir_version", int, where, 10),
            fused=GraphRecord.read(raw["fused"], f"{where}: fused", fused=True) if "fused" in raw else None,
            quantization=take(raw, "quantization", dict, where, None),
            tensorrt=take(raw, "tensorrt", dict, where, None),
            timings_s=take(raw, "timings_s", dict, where, {}),
            files=files,
            format_version=version,
        )
        for name in [g.model for g in manifest.graphs] + ([manifest.engine_file] if manifest.tensorrt else []):
            confine(folder, name, where)
            if name not in files:
                raise UserError(f"{where}: {name} is not among the files the manifest hashes")
        return manifest

    @property
    def engine_file(self) -> str:
        engine = (self.tensorrt or {}).get("engine")
        if not isinstance(engine, str):
            raise UserError(f"{MANIFEST}: tensorrt.engine must be a file name")
        return engine

    def path(self, folder: Path, name: str) -> Path:
        """A file of the export, confined to the folder."""
        return confine(folder, name, str(folder / MANIFEST))


def read_manifest(folder: Path) -> Manifest:
    if not folder.exists():
        raise UserError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    path = confine(folder, MANIFEST, str(folder))
    if not path.is_file():
        if not os.access(folder, os.R_OK | os.X_OK):
            raise UserError(f"{folder}: cannot read the folder (permission denied)")
        raise UserError(f"{folder}: not a starcast export (no {MANIFEST})")
    return Manifest.from_json(read_json(path), folder)


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file starcast wrote into `folder` (hidden files and the manifest itself excluded)."""
    return {
        path.relative_to(folder).as_posix(): sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST and not path.name.startswith(".")
    }


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Hash the folder's files into the manifest and write it; readers see the old manifest or the new one."""
    manifest.files = file_hashes(folder)
    manifest.format_version = FORMAT_VERSION
    staging = folder / f".{MANIFEST}.tmp"
    staging.write_text(json.dumps(manifest.to_json(), indent=2, allow_nan=False) + "\n")
    os.replace(staging, folder / MANIFEST)


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Every file the manifest lists is present with the recorded sha256; a manifest that lists none is refused."""
    if not manifest.files:
        raise UserError(f"{folder}: {MANIFEST} lists no files to verify")
    for name, digest in manifest.files.items():
        path = manifest.path(folder, name)
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "is missing"  # a FIFO, a device, a folder
            raise UserError(f"{folder}: {name} {what}")
        try:
            actual = sha256(path)
        except OSError as exc:
            raise UserError(f"{folder}: cannot read {name} ({os_reason(exc)})") from None
        if actual != digest:
            raise UserError(f"{folder}: {name} does not match its sha256 in {MANIFEST} (modified or corrupt)")
