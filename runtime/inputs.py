"""Checking what Python callers pass in: ids and masks as transformers' generate() takes them, and counts.

Errors are TypeError / ValueError subclasses (InvalidType, InvalidValue) with a message that says what to pass
instead; the command line prints them as one line.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from starcast.contract.errors import InvalidType, InvalidValue


def check_whole_number(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidType(f"{name} must be a whole number, got {value!r}")
    return int(value)


def as_integer_matrix(name: str, value: Any) -> np.ndarray:
    """A [batch, tokens] int64 array from an array or nested lists; a 1-D input is one row."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        array = None
    if array is None or array.dtype == object:
        raise InvalidType(f"{name} must be a rectangular [batch, tokens] array of integers (rows of equal length)")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise InvalidType(f"{name} must hold integers, got {array.dtype}")
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidValue(f"{name} must be a non-empty [batch, tokens] array, got shape {array.shape}")
    return array.astype(np.int64)


def check_prompt_batch(input_ids: Any, attention_mask: Any, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids in the vocabulary and a left-padding mask of 0s and 1s, as transformers' generate() takes them."""
    ids = as_integer_matrix("input_ids", input_ids)
    outside = ids[(ids < 0) | (ids >= vocab_size)]
    if outside.size:
        raise InvalidValue(f"token id {int(outside[0])} is outside the vocabulary (0..{vocab_size - 1})")
    mask = np.ones_like(ids) if attention_mask is None else as_integer_matrix("attention_mask", attention_mask)
    if mask.shape != ids.shape:
        raise InvalidValue(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise InvalidValue("attention_mask must hold only 0 (padding) and 1 (token)")
    if (mask.sum(axis=1) == 0).any():
        raise InvalidValue("a prompt is empty (its attention_mask is all zeros)")
    if (np.diff(mask, axis=1) < 0).any():
        row = int(np.nonzero((np.diff(mask, axis=1) < 0).any(axis=1))[0][0])
        raise InvalidValue(
            f"attention_mask row {row} has padding after a token: pad on the left (padding_side='left'), "
            f"as transformers' generate() expects"
        )
    return ids, mask
