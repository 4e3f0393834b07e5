"""GPTBigCode hyper-parameters as a frozen dataclass, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from starcast.errors import UserError

ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu", "relu")


@dataclass(frozen=True)
class GPTBigCodeConfig:
    vocab_size: int = 49152
    n_positions: int = 8192
    n_embd: int = 768
    n_layer: int = 20
    n_head: int = 12
    n_inner: int | None = None  # None means 4 * n_embd
    activation_function: str = "gelu_pytorch_tanh"
    layer_norm_epsilon: float = 1e-5
    multi_query: bool = True
    scale_attn_weights: bool = True
    attention_softmax_in_fp32: bool = True
    scale_attention_softmax_in_fp32: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise UserError(f"config: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.activation_function not in ACTIVATIONS:
            raise UserError(
                f"config: activation_function {self.activation_function!r} is not supported "
                f"(supported: {', '.join(ACTIVATIONS)})"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return 1 if self.multi_query else self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        """Shape of one layer's merged `key_value` tensor."""
        if self.multi_query:
            return (batch, length, 2 * self.head_dim)
        return (batch, self.n_head, length, 2 * self.head_dim)

    def parameter_count(self) -> int:
        d, inner, kv = self.n_embd, self.inner_dim, 2 * self.kv_heads * self.head_dim
        per_layer = 4 * d + (d * (d + kv) + d + kv) + (d * d + d) + (d * inner + inner) + (inner * d + d)
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return (self.vocab_size + self.n_positions) * d + self.n_layer * per_layer + 2 * d + head

    def to_hf_dict(self) -> dict[str, Any]:
        return {"model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"], **asdict(self)}

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> GPTBigCodeConfig:
        if raw.get("model_type") != "gpt_bigcode":
            raise UserError(f"config.json: model_type is {raw.get('model_type')!r}, expected 'gpt_bigcode'")
        aliases = {
            "hidden_size": "n_embd",
            "num_hidden_layers": "n_layer",
            "num_attention_heads": "n_head",
            "max_position_embeddings": "n_positions",
        }
        raw = {aliases.get(k, k): v for k, v in raw.items()}
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in names})
        except TypeError as exc:
            raise UserError(f"config.json: {exc}") from None

    @classmethod
    def from_file(cls, path: Path) -> GPTBigCodeConfig:
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: cannot read config ({exc})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: not a JSON object")
        return cls.from_hf_dict(raw)

    def with_(self, **changes: Any) -> GPTBigCodeConfig:
        return replace(self, **changes)


# Shapes of the public checkpoints (used by benchmarks and random-weight demos).
PRESETS: dict[str, GPTBigCodeConfig] = {
    "tiny_starcoder": GPTBigCodeConfig(vocab_size=49152, n_positions=8192, n_embd=768, n_layer=20, n_head=12),
    "santacoder": GPTBigCodeConfig(
        vocab_size=49280, n_positions=2048, n_embd=2048, n_layer=24, n_head=16, activation_function="gelu_fast"
    ),
    "starcoder": GPTBigCodeConfig(vocab_size=49152, n_positions=8192, n_embd=6144, n_layer=40, n_head=48),
    "test": GPTBigCodeConfig(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4),
}
