"""Opening an export folder for generation: its manifest (starcast's, or one made up for an optimum-onnx
export), which graph runs on the chosen provider and why, and the end-of-sequence tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from starcast.contract import interfaces as io
from starcast.contract.config import GPTBigCodeConfig
from starcast.contract.dtypes import dtype_of_element_type
from starcast.contract.errors import UserError
from starcast.contract.graph_files import PLAIN_MODEL, load_header
from starcast.contract.manifest import MANIFEST, GraphRecord, Manifest, Proof, read_manifest
from starcast.contract.paths import confine, read_json

GRAPHS = ("auto", "plain", "fused")
GENERATION_CONFIG = "generation_config.json"


def is_optimum_export(folder: Path) -> bool:
    """An optimum-onnx gpt_bigcode export: model.onnx with past_key_values.{i}.key / .value, no starcast.json."""
    if not folder.is_dir() or (folder / MANIFEST).exists():
        return False
    model = confine(folder, PLAIN_MODEL, str(folder))
    if not model.is_file():
        return False
    return any(value.name == io.past(0, "key") for value in load_header(model).graph.input)


def optimum_manifest(folder: Path) -> Manifest:
    """What the runtime needs to know about an optimum export, as a starcast manifest."""
    config = GPTBigCodeConfig.from_file(confine(folder, "config.json", str(folder)))
    graph = load_header(confine(folder, PLAIN_MODEL, str(folder))).graph
    cache = next(v for v in graph.input if v.name == io.past(0, "key"))
    dtype = dtype_of_element_type(cache.type.tensor_type.elem_type)
    if dtype is None:
        raise UserError(f"{folder}: the optimum export's cache type is neither float32 nor float16")
    plain = GraphRecord(PLAIN_MODEL, io.SPLIT_CACHE, {}, Proof("abs", 1.0, False))
    return Manifest(source="optimum", dtype=dtype, config=config, plain=plain)


def open_export(folder: Path) -> Manifest:
    return optimum_manifest(folder) if is_optimum_export(folder) else read_manifest(folder)


@dataclass(frozen=True)
class GraphChoice:
    record: GraphRecord
    note: str  # which graph runs and why, for the user


def choose_graph(manifest: Manifest, provider: str, graph: str) -> GraphChoice:
    """`auto` runs the fused graph when it was made for the provider, else the plain graph."""
    if graph not in GRAPHS:
        raise UserError(f"unknown graph {graph!r} (supported: {', '.join(GRAPHS)})")
    fused = manifest.fused
    if graph == "fused" and fused is None:
        raise UserError("the export has no fused graph (run starcast optimize)")
    if graph == "plain" or fused is None:
        return GraphChoice(manifest.plain, f"plain graph {manifest.plain.model}")
    if graph == "auto" and fused.target != provider:
        return GraphChoice(
            manifest.plain,
            f"plain graph {manifest.plain.model} (the fused graph is for {fused.target}, not {provider}; "
            f"run starcast optimize --target {provider} for one)",
        )
    if provider == "cuda" and fused.interface == io.STATIC_CACHE and manifest.dtype == "fp32":
        raise UserError(
            "the fused graph is fp32, and ONNX Runtime's CUDA GroupQueryAttention runs fp16 and bf16 only: "
            "export with --dtype fp16 --target cuda"
        )
    return GraphChoice(fused, f"fused graph {fused.model} ({fused.target}, {fused.interface})")


def read_eos(folder: Path, config: GPTBigCodeConfig) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json's `eos_token_id` (an id or a list of ids), else config.json's."""
    path = confine(folder, GENERATION_CONFIG, str(folder))
    eos: object = config.eos_token_id
    if path.is_file():
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise UserError(f"{path}: not a JSON object")
        eos = raw.get("eos_token_id", eos)
    ids = eos if isinstance(eos, list) else [eos]
    if eos is None or not ids:
        return ()
    if not all(type(i) is int and 0 <= i < 2**31 for i in ids):
        raise UserError(f"{path}: eos_token_id {eos!r} is not a token id (a whole number >= 0) or a list of them")
    # An id beyond the vocabulary can never be generated (transformers keeps it too); it ends nothing.
    return tuple(i for i in ids if i < config.vocab_size)
