"""Prove an exported graph computes what the reference model computes: a prompt step and a decode step.

Like llm.c's golden-tensor checks: the PyTorch reference produces logits, ONNX Runtime runs the exported
graph on the same inputs (a left-padded batch), and the report gives the max difference against a stated
tolerance. Padding query positions are excluded: their logits are never used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from starcast.exporter.model import GPTBigCode
from starcast.exporter.onnx_export import input_names
from starcast.runtime.session import create_session
from starcast.runtime.steps import positions_from_mask

TOLERANCES = {"fp32": ("abs", 1e-4), "fp16": ("rel", 2e-2)}


@dataclass(frozen=True)
class ParityReport:
    dtype: str
    kind: str  # "abs": max |onnx - torch|; "rel": that divided by max |torch|
    tolerance: float
    prompt_error: float
    decode_error: float

    @property
    def passed(self) -> bool:
        return max(self.prompt_error, self.decode_error) <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"parity {verdict}: prompt {self.prompt_error:.2e}, decode {self.decode_error:.2e} "
            f"({self.kind} error, tolerance {self.tolerance:.0e}, {self.dtype})"
        )


def parity_inputs(vocab: int, batch: int = 2, prompt: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    """A left-padded batch: row 0 is full, row 1 has two padding tokens on the left."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, prompt), dtype=np.int64)
    mask = np.ones((batch, prompt), dtype=np.int64)
    mask[1:, :2] = 0
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_mask(mask)}


def relative_or_absolute(kind: str, ours: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> float:
    diff = float(np.abs(ours.astype(np.float64) - ref.astype(np.float64))[valid].max())
    if kind == "rel":
        return diff / max(float(np.abs(ref.astype(np.float64))[valid].max()), 1e-12)
    return diff


def check_parity(model: GPTBigCode, onnx_path: Path, dtype: str) -> ParityReport:
    cfg = model.config
    kind, tolerance = TOLERANCES[dtype]
    session = create_session(onnx_path, "cpu")
    torch_dtype = model.lm_head.weight.dtype
    feeds = parity_inputs(cfg.vocab_size)
    batch = feeds["input_ids"].shape[0]
    empty = np.zeros(cfg.cache_shape(batch, 0), dtype=np.float16 if dtype == "fp16" else np.float32)
    for name in input_names(cfg)[3:]:
        feeds[name] = empty

    with torch.no_grad():
        ref = model(*(torch.from_numpy(feeds[n]) for n in input_names(cfg)[:3]), *model.empty_past(batch, torch_dtype))
    ours = session.run(None, feeds)
    valid = feeds["attention_mask"].astype(bool)
    prompt_error = relative_or_absolute(kind, ours[0], ref[0].float().numpy(), valid)

    # One decode step: each side continues from its own cache with the token it scored highest.
    next_ids = ref[0][:, -1].float().argmax(-1, keepdim=True).numpy()
    mask = np.concatenate([feeds["attention_mask"], np.ones((batch, 1), np.int64)], axis=1)
    step = {
        "input_ids": next_ids,
        "attention_mask": mask,
        "position_ids": positions_from_mask(mask)[:, -1:],
    }
    step.update({name: present for name, present in zip(input_names(cfg)[3:], ours[1:], strict=True)})
    with torch.no_grad():
        ref_step = model(*(torch.from_numpy(step[n]) for n in input_names(cfg)[:3]), *ref[1:])
    ours_step = session.run(None, step)
    decode_error = relative_or_absolute(kind, ours_step[0], ref_step[0].float().numpy(), np.ones((batch, 1), bool))
    return ParityReport(dtype, kind, tolerance, prompt_error, decode_error)
