"""GPTBigCode hyper-parameters as a frozen dataclass, read from a Hugging Face `config.json`.

A config comes from a folder, so it is untrusted: every field is type-checked and range-checked when the
dataclass is built, before anything is sized from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from starcast.contract.errors import UserError
from starcast.contract.paths import read_json

ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu", "relu")
# Far above any released GPTBigCode (StarCoder: 40 layers, n_embd 6144, 8192 positions, 49152 tokens) and low
# enough that nothing sized from them can ask for an absurd allocation.
LIMITS = {
    "vocab_size": 1 << 22,
    "n_positions": 1 << 20,
    "n_embd": 1 << 16,
    "n_layer": 1024,
    "n_head": 1024,
    "n_inner": 1 << 18,
}
FLAGS = ("multi_query", "scale_attn_weights", "attention_softmax_in_fp32", "scale_attention_softmax_in_fp32",
         "tie_word_embeddings")  # fmt: skip


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
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if name == "n_inner" and value is None:
                continue
            if type(value) is not int:
                raise UserError(f"config: {name} must be an integer, got {value!r}")
            if not 1 <= value <= limit:
                raise UserError(f"config: {name} must be in 1..{limit}, got {value}")
        for name in FLAGS:
            if type(getattr(self, name)) is not bool:
                raise UserError(f"config: {name} must be true or false, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise UserError(f"config: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.activation_function not in ACTIVATIONS:
            raise UserError(
                f"config: activation_function {self.activation_function!r} is not supported "
                f"(supported: {', '.join(ACTIVATIONS)})"
            )
        eps = self.layer_norm_epsilon
        if type(eps) not in (int, float) or not 0 < eps < 1:  # compared before isfinite: no float() of a huge int
            raise UserError(f"config: layer_norm_epsilon must be a number in (0, 1), got {eps!r}")
        for name in ("bos_token_id", "eos_token_id"):
            token = getattr(self, name)  # an id beyond the vocabulary is harmless: it is never generated
            if token is not None and (type(token) is not int or not 0 <= token < 2**31):
                raise UserError(f"config: {name} must be a token id (a whole number >= 0) or null, got {token!r}")

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

    def cache_elements_per_token(self) -> int:
        """Elements of key and value, all layers, for one token of one row."""
        return self.n_layer * self.kv_heads * 2 * self.head_dim

    def parameter_count(self) -> int:
        d, inner, kv = self.n_embd, self.inner_dim, 2 * self.kv_heads * self.head_dim
        per_layer = 4 * d + (d * (d + kv) + d + kv) + (d * d + d) + (d * inner + inner) + (inner * d + d)
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return (self.vocab_size + self.n_positions) * d + self.n_layer * per_layer + 2 * d + head

    def to_hf_dict(self) -> dict[str, Any]:
        return {"model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"], **asdict(self)}

    @classmethod
    def from_hf_dict(cls, raw: Any, where: str = "config") -> GPTBigCodeConfig:
        if not isinstance(raw, dict):
            raise UserError(f"{where}: not a JSON object")
        if raw.get("model_type") != "gpt_bigcode":
            raise UserError(f"{where}: model_type is {raw.get('model_type')!r}, expected 'gpt_bigcode'")
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
        except UserError as exc:
            raise UserError(f"{where}: {str(exc).removeprefix('config: ')}") from None

    @classmethod
    def from_file(cls, path: Path) -> GPTBigCodeConfig:
        return cls.from_hf_dict(read_json(path), str(path))

    def with_(self, **changes: Any) -> GPTBigCodeConfig:
        return replace(self, **changes)


# Shapes of the public checkpoints (used by benchmarks and random-weight demos).
PRESETS: dict[str, GPTBigCodeConfig] = {
    "tiny_starcoder": GPTBigCodeConfig(vocab_size=49152, n_positions=8192, n_embd=768, n_layer=20, n_head=12),
    "santacoder": GPTBigCodeConfig(
        vocab_size=49280, n_positions=2048, n_embd=2048, n_layer=24, n_head=16, activation_function="gelu_fast"
    ),
    "starcoderbase-3b": GPTBigCodeConfig(vocab_size=49152, n_positions=8192, n_embd=2816, n_layer=36, n_head=22),
    "starcoderbase-7b": GPTBigCodeConfig(vocab_size=49152, n_positions=8192, n_embd=4096, n_layer=42, n_head=32),
    "starcoder": GPTBigCodeConfig(vocab_size=49152, n_positions=8192, n_embd=6144, n_layer=40, n_head=48),
    "test": GPTBigCodeConfig(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4),
}
