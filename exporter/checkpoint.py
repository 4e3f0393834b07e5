"""Find and load a Hugging Face GPTBigCode checkpoint into the reference model, one tensor at a time.

Order of preference: `model.safetensors`, `model.safetensors.index.json` (shards), `pytorch_model.bin`,
`pytorch_model.bin.index.json`. The model is built on the meta device and each parameter is filled as its
tensor is read, so at no point are two full copies of the weights in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from starcast.contract.builtin import PREFIX, builtin_model_path
from starcast.contract.config import GPTBigCodeConfig
from starcast.contract.errors import UserError
from starcast.contract.paths import confine, os_reason, read_json
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
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Buffers older GPTBigCode checkpoints carry (the causal mask, its fill value): transformers ignores them too.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    root: Path  # what names read from the folder must stay inside: the folder, or a Hub cache's repo folder
    config: GPTBigCodeConfig
    weight_files: tuple[Path, ...]

    @property
    def side_files(self) -> list[Path]:
        """Tokenizer and generation files present in the folder (each confined: it may be a link)."""
        found = [self.file(name) for name in SIDE_FILES if (self.folder / name).exists()]
        return [path for path in found if path.is_file()]

    def file(self, name: str) -> Path:
        return confine(self.root, (self.folder / name).relative_to(self.root).as_posix(), str(self.folder))


def confinement_root(folder: Path) -> Path:
    """A Hugging Face cache snapshot (`models--org--name/snapshots/REV`) links its files into the repo folder's
    `blobs/`; anything else is its own root."""
    folder = folder.absolute()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def resolve_source(source: str) -> Path:
    """A local folder as it is, `builtin:NAME` for a model shipped with starcast; otherwise a Hugging Face Hub
    model id, downloaded (config, weights, tokenizer)."""
    if source.startswith(PREFIX):
        return builtin_model_path(source.removeprefix(PREFIX))
    path = Path(source).expanduser()
    try:
        exists = path.exists()
    except OSError as exc:
        raise UserError(f"{source}: cannot look at it ({os_reason(exc)})") from None
    if exists:
        if not path.is_dir():
            raise UserError(f"{source}: not a folder (expected a checkpoint folder with config.json)")
        return path.absolute()
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
        reason = "offline mode" if "offline" in str(exc).lower() else type(exc).__name__
        raise UserError(
            f"{source}: no such folder here, and the Hugging Face Hub cannot be reached to download it ({reason})"
        ) from None
    return Path(local)


def open_checkpoint(source: str) -> Checkpoint:
    folder = resolve_source(source)
    root = confinement_root(folder)
    relative = folder.relative_to(root)

    def inside(name: str) -> Path:
        return confine(root, (relative / name).as_posix(), str(folder))

    config_path = inside("config.json")
    if not config_path.is_file():
        if not os.access(folder, os.R_OK | os.X_OK):
            raise UserError(f"{folder}: cannot read the folder (permission denied)")
        raise UserError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    config = GPTBigCodeConfig.from_file(config_path)
    for name in WEIGHT_FILES:
        path = inside(name)
        if path.is_file():
            files = shard_files(path, root, relative) if name.endswith(".index.json") else (path,)
            return Checkpoint(folder, root, config, files)
    raise UserError(f"{folder}: no weights (looked for {', '.join(WEIGHT_FILES)})")


def shard_files(index_path: Path, root: Path, relative: Path) -> tuple[Path, ...]:
    """The shard files a `*.index.json` names, each confined to the checkpoint."""
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index_path}: no weight_map object in the shard index")
    if not all(isinstance(name, str) for name in weight_map.values()):
        raise UserError(f"{index_path}: weight_map values must be file names")
    names = dict.fromkeys(weight_map.values())
    files = tuple(confine(root, (relative / name).as_posix(), str(index_path)) for name in names)
    for name, file in zip(names, files, strict=True):
        if not file.is_file():
            raise UserError(f"{index_path}: shard {name} is missing")
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
        file.open("rb").close()
    except OSError as exc:
        raise UserError(f"{file}: cannot read ({os_reason(exc)})") from None
    try:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, handle.get_tensor(name)
    except UserError:
        raise
    except Exception as exc:  # SafetensorError: a truncated or corrupt file
        raise UserError(f"{file}: corrupt or truncated safetensors file ({str(exc).splitlines()[0]})") from None


def iter_torch_bin(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights_only=True`: PyTorch's restricted unpickler, which runs no code from the file."""
    try:
        file.open("rb").close()
    except OSError as exc:
        raise UserError(f"{file}: cannot read ({os_reason(exc)})") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{file}: not a readable PyTorch weights file ({first})") from None
    if not isinstance(state, dict):
        raise UserError(f"{file}: not a PyTorch state dict")
    for name in list(state):
        yield name, state.pop(name)


def listing(names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def load_model(
    checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, on_tensor: Callable[[int, int], None] | None = None
) -> GPTBigCode:
    """Build the reference model on the meta device and fill it tensor by tensor from the checkpoint.

    Every tensor the model does not use is an error (a config with fewer layers than the weights would
    otherwise export a different model and call it correct), except the mask buffers of older checkpoints and
    the lm_head copy of a tied checkpoint. Non-finite weights are an error too."""
    config = checkpoint.config
    with torch.device("meta"):
        model = GPTBigCode(config)
    expected = dict(model.named_parameters(remove_duplicate=True))
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    filled: set[str] = set()
    unused: list[str] = []
    for raw_name, tensor in iter_tensors(checkpoint.weight_files):
        name = raw_name if raw_name in expected or raw_name == "lm_head.weight" else f"transformer.{raw_name}"
        if name not in expected:
            tied_copy = name == "lm_head.weight" and config.tie_word_embeddings
            if not (tied_copy or name.endswith(IGNORED_SUFFIXES)):
                unused.append(raw_name)
            continue
        if name in filled:
            raise UserError(f"{checkpoint.folder}: tensor {raw_name} appears twice")
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise UserError(f"{checkpoint.folder}: tensor {raw_name} has shape {tuple(tensor.shape)}, expected {want}")
        if not tensor.is_floating_point():
            raise UserError(f"{checkpoint.folder}: tensor {raw_name} has dtype {tensor.dtype}, expected floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{checkpoint.folder}: the checkpoint contains NaN or infinite values (tensor {raw_name})")
        converted = tensor.to(dtype)
        if not bool(torch.isfinite(converted).all()):
            raise UserError(f"{checkpoint.folder}: tensor {raw_name} overflows {str(dtype).removeprefix('torch.')}")
        set_parameter(model, name, converted)
        filled.add(name)
        if on_tensor is not None:
            on_tensor(len(filled), len(expected))
    check_all_used(checkpoint, unused, sorted(set(expected) - filled))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model.eval().requires_grad_(False)


def check_all_used(checkpoint: Checkpoint, unused: list[str], missing: list[str]) -> None:
    """Every checkpoint tensor is one the config uses, and every weight the config needs is there."""
    if unused:
        raise UserError(
            f"{checkpoint.folder}: the checkpoint has tensors the config does not use ({listing(sorted(unused))}): "
            f"config.json does not describe these weights"
        )
    if missing:
        raise UserError(f"{checkpoint.folder}: missing weight tensors {listing(missing)}")


def set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, nn.Parameter(value.contiguous(), requires_grad=False))


FLOAT_TAGS = ("F16", "BF16", "F32", "F64")


def check_exportable(checkpoint: Checkpoint) -> None:
    """Refuse before any work a checkpoint whose weights are not floating point (GPTQ, AWQ, bitsandbytes
    exports store packed integers), from the safetensors headers alone; other files are checked tensor by
    tensor as they are read."""
    import json

    for file in checkpoint.weight_files:
        if file.suffix != ".safetensors":
            continue
        try:
            with file.open("rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size)) if 0 < size < 100 << 20 else {}
        except (OSError, ValueError):
            continue  # the tensor reader says what is wrong with the file
        for name, entry in header.items() if isinstance(header, dict) else ():
            tag = entry.get("dtype") if isinstance(entry, dict) else None
            if name == "__metadata__" or name.endswith(IGNORED_SUFFIXES) or tag is None or tag in FLOAT_TAGS:
                continue
            raise UserError(
                f"{file}: tensor {name} is {tag}: starcast exports floating-point checkpoints (integer weights "
                f"mean a quantized checkpoint, e.g. GPTQ or AWQ): export the original float weights"
            )
