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
