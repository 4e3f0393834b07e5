"""The PyTorch reference, run from the checkpoint's memory-mapped shards with one layer resident at a time.

`StreamedReference(checkpoint, dtype)(input_ids, attention_mask, position_ids, *past)` computes what
`GPTBigCode.forward` computes (it *is* that forward): the blocks are built as the loop reaches them, from the
checkpoint's tensors cast to `dtype`, and dropped after. The embeddings and ln_f stay for the call. So the
proofs run in memory that does not grow with the number of layers, whatever the model's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from starcast.contract.errors import UserError
from starcast.exporter.checkpoint import IGNORED_SUFFIXES, Checkpoint, check_all_used, set_parameter
from starcast.exporter.model import Block, GPTBigCode
from starcast.exporter.weights import checked


class TensorSource:
    """Checkpoint tensors by parameter name, read from their shard when asked (safetensors are mapped)."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.where: dict[str, tuple[Path, str]] = {}
        self.bins: dict[Path, dict[str, torch.Tensor]] = {}
        for file in checkpoint.weight_files:
            for raw_name in self._names(file):
                name = raw_name if raw_name.startswith(("transformer.", "lm_head.")) else f"transformer.{raw_name}"
                if name in self.where:
                    raise UserError(f"{checkpoint.folder}: tensor {raw_name} appears twice")
                self.where[name] = (file, raw_name)

    def _names(self, file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(file, framework="pt") as handle:
                return list(handle.keys())  # noqa: SIM118 - safe_open handles are not iterable
        self.bins[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return list(self.bins[file])

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The tensor cast to `dtype`, with the checks the export made (shape, floating point, finite)."""
        if name not in self.where:
            raise UserError(f"{self.checkpoint.folder}: missing weight tensors {name}")
        file, raw_name = self.where[name]
        if file in self.bins:
            return checked(self.checkpoint, raw_name, self.bins[file][raw_name], shape, dtype)
        from safetensors import safe_open

        with safe_open(file, framework="pt") as handle:
            return checked(self.checkpoint, raw_name, handle.get_tensor(raw_name), shape, dtype)


class LazyBlocks(nn.Module):
    """Stands where `transformer.h` stands: iterating it builds each block from the checkpoint in turn."""

    def __init__(self, reference: StreamedReference):
        super().__init__()
        self.reference = [reference]  # a list: not registered as a submodule

    def __iter__(self) -> Iterator[Block]:
        reference = self.reference[0]
        for index in range(reference.config.n_layer):
            yield reference.block(index)


class StreamedReference:
    """The reference model over a checkpoint, in `dtype`; callable like `GPTBigCode`."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype):
        self.config = checkpoint.config
        self.dtype = dtype
        self.source = TensorSource(checkpoint)
        with torch.device("meta"):
            expected = set(dict(GPTBigCode(self.config).named_parameters(remove_duplicate=True)))
        tied = self.config.tie_word_embeddings
        unused = [raw for name, (_, raw) in self.source.where.items()
                  if name not in expected and not name.endswith(IGNORED_SUFFIXES)
                  and not (tied and name == "lm_head.weight")]  # fmt: skip
        check_all_used(checkpoint, unused, sorted(expected - set(self.source.where)))

    def _fill(self, module: nn.Module, prefix: str) -> nn.Module:
        for name, parameter in list(module.named_parameters(remove_duplicate=True)):
            tensor = self.source.get(f"{prefix}{name}", tuple(parameter.shape), self.dtype)
            set_parameter(module, name, tensor)
        return module.eval().requires_grad_(False)

    def block(self, index: int) -> Block:
        with torch.device("meta"):
            block = Block(self.config, index)
        return self._fill(block, f"transformer.h.{index}.")

    def model(self) -> GPTBigCode:
        """The model with its embeddings, ln_f and head filled and its blocks lazy (held for one call)."""
        with torch.device("meta"):
            model = GPTBigCode(self.config)
        tr = model.transformer
        tr.h = LazyBlocks(self)
        for name in ("wte", "wpe", "ln_f"):
            self._fill(getattr(tr, name), f"transformer.{name}.")
        if self.config.tie_word_embeddings:
            model.lm_head.weight = tr.wte.weight
        else:
            self._fill(model.lm_head, "lm_head.")
        return model.eval()

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return self.model()(*inputs)

    def empty_past(self, batch: int, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        shape = self.config.cache_shape(batch, 0)
        return [torch.zeros(shape, dtype=dtype or self.dtype) for _ in range(self.config.n_layer)]
