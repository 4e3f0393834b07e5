"""The graphs' inputs and outputs, named once: what the exporter writes, the passes rewrite and the runtime binds.

concat-cache  the plain graph (all positions' logits) and the cpu-fused graph (last position's logits):
    inputs   input_ids int64 [batch, sequence]          attention_mask int64 [batch, past + sequence]
             position_ids int64 [batch, sequence]        past_key_values.{i}.key_value
    outputs  logits [batch, sequence or 1, vocab]        present.{i}.key_value (past + sequence long)
    key_value is [batch, length, 2*head_dim] with multi_query, [batch, n_head, length, 2*head_dim] without;
    keys are its first head_dim channels, values the last.
static-cache  the cuda-fused graph (GroupQueryAttention over buffers written in place):
    inputs   input_ids, position_ids int64 [batch, sequence]     seqlens_k int32 [batch]
             total_sequence_length int32 []                       past_key_values.{i}.key / .value
    outputs  logits [batch, sequence or 1, vocab]                present.{i}.key / .value
    key and value are [batch, kv_heads, max_sequence_length, head_dim]; present is bound to past's memory.
split-cache   optimum-onnx's gpt_bigcode exports: concat semantics with a separate key and value per layer,
    [batch, kv_heads, length, head_dim] each (driven by the runtime, never written by starcast).
"""

from __future__ import annotations

import numpy as np

INPUT_IDS, ATTENTION_MASK, POSITION_IDS = "input_ids", "attention_mask", "position_ids"
SEQLENS_K, TOTAL_SEQUENCE_LENGTH = "seqlens_k", "total_sequence_length"
LOGITS = "logits"

CONCAT_CACHE, STATIC_CACHE, SPLIT_CACHE = "concat-cache", "static-cache", "split-cache"
INTERFACES = (CONCAT_CACHE, STATIC_CACHE)
# The execution provider a fused graph is made for decides its interface (see graphs/fuse.py for why).
TARGET_INTERFACES = {"cpu": CONCAT_CACHE, "cuda": STATIC_CACHE}
TARGETS = tuple(TARGET_INTERFACES)

MAX_LENGTH_DIM = "max_sequence_length"


def past_key_value(layer: int) -> str:
    return f"past_key_values.{layer}.key_value"


def present_key_value(layer: int) -> str:
    return f"present.{layer}.key_value"


def past(layer: int, part: str) -> str:
    """`part` is "key" or "value": the static-cache and split-cache names."""
    return f"past_key_values.{layer}.{part}"


def present(layer: int, part: str) -> str:
    return f"present.{layer}.{part}"


def merged_cache_names(n_layer: int) -> list[tuple[str, str]]:
    """(past input, present output) per layer of a concat-cache graph."""
    return [(past_key_value(i), present_key_value(i)) for i in range(n_layer)]


def split_cache_names(n_layer: int) -> list[tuple[str, str]]:
    """(past input, present output) for each layer's key, then value: static-cache and optimum graphs."""
    return [(past(i, part), present(i, part)) for i in range(n_layer) for part in ("key", "value")]


def concat_inputs(n_layer: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS] + [past_key_value(i) for i in range(n_layer)]


def concat_outputs(n_layer: int) -> list[str]:
    return [LOGITS] + [present_key_value(i) for i in range(n_layer)]


def static_inputs(n_layer: int) -> list[str]:
    return [INPUT_IDS, POSITION_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH] + [
        past(i, part) for i in range(n_layer) for part in ("key", "value")
    ]


def static_outputs(n_layer: int) -> list[str]:
    return [LOGITS] + [present(i, part) for i in range(n_layer) for part in ("key", "value")]


def expected_inputs(interface: str, n_layer: int) -> list[str]:
    return {CONCAT_CACHE: concat_inputs, STATIC_CACHE: static_inputs}[interface](n_layer)


def expected_outputs(interface: str, n_layer: int) -> list[str]:
    return {CONCAT_CACHE: concat_outputs, STATIC_CACHE: static_outputs}[interface](n_layer)


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids as transformers' generate() makes them for a left-padded batch: cumsum(mask) - 1, padding
    at 1."""
    positions = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)
