"""Find and load a Hugging Face GPTBigCode checkpoint into the reference model, one tensor at a time.

Order of preference: `model.safetensors`, `model.safetensors.index.json` (shards), `pytorch_model.bin`,
`pytorch_model.bin.index.json`. The model is built on the meta device and each parameter is filled as its
tensor is read, so at no point are two full copies of the weights in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from starcast.errors import UserError
from starcast.exporter.config import GPTBigCodeConfig
from starcast.exporter.model import GPTBigCode

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    config: GPTBigCodeConfig
    weight_files: tuple[Path, ...]

    @property
    def side_files(self) -> list[Path]:
        return [self.folder / name for name in SIDE_FILES if (self.folder / name).is_file()]


def resolve_source(source: str) -> Path:
    """A local folder as it is, `builtin:NAME` for a model shipped with starcast; otherwise a Hugging Face Hub
    model id, downloaded (config, weights, tokenizer)."""
    if source.startswith("builtin:"):
        from starcast.builtin import builtin_model_path

        return builtin_model_path(source.removeprefix("builtin:"))
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{source}: not a folder (expected a checkpoint folder with config.json)")
        return path
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or not source.strip():
        raise UserError(f"{source}: no such folder")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise UserError(f"{source}: no such folder, and huggingface_hub is not installed to fetch it") from None
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", *SIDE_FILES]
    try:
        local = snapshot_download(source, allow_patterns=patterns)
        if not any(Path(local).glob("*.safetensors")):
            local = snapshot_download(source, allow_patterns=[*patterns, "pytorch_model*.bin", "*.bin.index.json"])
    except HFValidationError:
        raise UserError(f"{source}: no such folder, and not a valid Hugging Face model id") from None
    except Exception as exc:  # network errors come in many types; each means the same thing to the user
        reason = "offline" if "offline" in str(exc).lower() else type(exc).__name__
        raise UserError(
            f"{source}: no such folder, and downloading it from the Hugging Face Hub failed ({reason})"
        ) from None
    return Path(local)


def open_checkpoint(source: str) -> Checkpoint:
    folder = resolve_source(source)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    config = GPTBigCodeConfig.from_file(config_path)
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            files = shard_files(path) if name.endswith(".index.json") else (path,)
            return Checkpoint(folder, config, files)
    raise UserError(f"{folder}: no weights (looked for {', '.join(WEIGHT_FILES)})")


def shard_files(index_path: Path) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{index_path}: unreadable shard index ({exc})") from None
    files = tuple(index_path.parent / name for name in dict.fromkeys(weight_map.values()))
    for file in files:
        if not file.is_file():
            raise UserError(f"{index_path}: shard {file.name} is missing")
    return files


def iter_tensors(files: tuple[Path, ...]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        if file.suffix == ".safetensors":
            yield from iter_safetensors(file)
        else:
            yield from iter_torch_bin(file)


def iter_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, handle.get_tensor(name)
    except UserError:
        raise
    except Exception as exc:  # SafetensorError, OSError: a truncated or corrupt file
        raise UserError(f"{file}: corrupt or truncated safetensors file ({str(exc).splitlines()[0]})") from None


def iter_torch_bin(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise UserError(f"{file}: cannot read PyTorch weights ({str(exc).splitlines()[0]})") from None
    for name in list(state):
        yield name, state.pop(name)


def load_model(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, progress=None) -> GPTBigCode:
    """Build the reference model on the meta device and fill it tensor by tensor from the checkpoint."""
    config = checkpoint.config
    with torch.device("meta"):
        model = GPTBigCode(config)
    expected = dict(model.named_parameters(remove_duplicate=True))
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    filled: set[str] = set()
    tick = progress.bar("load", len(expected)) if progress is not None else lambda: None
    for raw_name, tensor in iter_tensors(checkpoint.weight_files):
        name = raw_name if raw_name in expected or raw_name == "lm_head.weight" else f"transformer.{raw_name}"
        if name not in expected:
            continue  # buffers of older checkpoints (attn.bias, masked_bias) or a tied lm_head copy
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise UserError(f"{checkpoint.folder}: tensor {raw_name} has shape {tuple(tensor.shape)}, expected {want}")
        if not tensor.is_floating_point():
            raise UserError(f"{checkpoint.folder}: tensor {raw_name} has dtype {tensor.dtype}, expected floating point")
        set_parameter(model, name, tensor.to(dtype))
        filled.add(name)
        tick()
    missing = sorted(set(expected) - filled)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{checkpoint.folder}: missing weight tensors {', '.join(missing[:3])}{more}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model.eval().requires_grad_(False)


def set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, nn.Parameter(value.contiguous(), requires_grad=False))
