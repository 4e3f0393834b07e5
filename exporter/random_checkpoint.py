"""Write a random-weight GPTBigCode checkpoint in Hugging Face's layout (config.json + model.safetensors).

Used by `starcast demo`, the benchmarks and the tests; weights are drawn as GPT-2 initialises them, so the
activations have realistic scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from starcast.contract.config import GPTBigCodeConfig
from starcast.exporter.model import GPTBigCode


def random_model(config: GPTBigCodeConfig, seed: int = 0) -> GPTBigCode:
    generator = torch.Generator().manual_seed(seed)
    model = GPTBigCode(config).eval().requires_grad_(False)
    for name, param in model.named_parameters():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
        elif param.ndim == 1:
            param.copy_(0.02 * torch.randn(param.shape, generator=generator))
        else:
            param.normal_(0.0, 0.02, generator=generator)
    return model


def write_random_checkpoint(
    folder: Path, config: GPTBigCodeConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = random_model(config, seed)
    state = {name: tensor.to(dtype).contiguous() for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    return folder


SAFETENSORS_DTYPES = {torch.float32: ("F32", "float32"), torch.float16: ("F16", "float16")}
CHUNK = 1 << 24  # elements drawn at a time


def write_random_shards(
    folder: Path, config: GPTBigCodeConfig, dtype: torch.dtype = torch.float16, shard_bytes: int = 4 << 30,
    seed: int = 0,
) -> Path:  # fmt: skip
    """A random checkpoint in the Hub's sharded layout (`model-0000K-of-0000N.safetensors` + index), written
    tensor by tensor and chunk by chunk: memory stays a few hundred MB whatever the model's size. The weights
    are drawn as `random_model` draws them (not the same numbers)."""
    import numpy as np

    with torch.device("meta"):
        model = GPTBigCode(config)
    tag, np_name = SAFETENSORS_DTYPES[dtype]
    size = np.dtype(np_name).itemsize
    tensors = [(n, tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=True)]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in tensors:
        nbytes = size * int(np.prod(shape))
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Chunks are windows at random offsets into one pool of normal draws: ten times faster than drawing every
    # weight, and as good for timing and memory measurements.
    pool = rng.standard_normal(2 * CHUNK, dtype=np.float32)
    weight_map = {}
    total = 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            end = offset + size * int(np.prod(shape))
            header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
            weight_map[name] = file
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with (folder / file).open("wb") as handle:
            handle.write(len(text).to_bytes(8, "little") + text)
            for name, shape in shard:
                count = int(np.prod(shape))
                for start in range(0, count, CHUNK):
                    at = int(rng.integers(CHUNK))
                    part = pool[at : at + min(CHUNK, count - start)]
                    if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                        part = 1.0 + 0.1 * part
                    else:
                        part = 0.02 * part
                    handle.write(part.astype(np_name).tobytes())
        total += sum(int(np.prod(shape)) * size for _, shape in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    return folder
