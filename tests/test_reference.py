"""Our reference GPTBigCode computes what transformers' GPTBigCodeForCausalLM computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import VARIANTS, left_padded_batch, save_hf_checkpoint
from transformers import DynamicCache

from starcast.contract.interfaces import positions_from_mask
from starcast.exporter.checkpoint import load_model, open_checkpoint

DECODE_STEPS = 3


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reference_matches_transformers_prompt_and_cached_decode(tmp_path, variant):
    folder, hf = save_hf_checkpoint(tmp_path / "ckpt", **VARIANTS[variant])
    ours = load_model(open_checkpoint(str(folder)))
    ids, mask = left_padded_batch(hf.config.vocab_size, [7, 4, 1])
    batch = ids.shape[0]

    past = ours.empty_past(batch)
    hf_cache = DynamicCache()
    for step in range(DECODE_STEPS + 1):
        positions = positions_from_mask(mask)[:, -ids.shape[1] :]
        tensors = [torch.from_numpy(a) for a in (ids, mask, positions)]
        with torch.no_grad():
            expected = hf(
                input_ids=tensors[0],
                attention_mask=tensors[1],
                position_ids=tensors[2],
                past_key_values=hf_cache,
                use_cache=True,
            )
            logits, *past = ours(*tensors, *past)
        hf_cache = expected.past_key_values
        valid = mask[:, -ids.shape[1] :].astype(bool)
        error = (logits - expected.logits).abs().numpy()[valid].max()
        assert error < 1e-5, f"{variant} step {step}: max |ours - transformers| = {error:.2e}"
        assert np.abs(expected.logits.numpy()[valid]).max() > 0.5  # the comparison is not between near-zeros
        ids = logits[:, -1].argmax(-1, keepdim=True).numpy()
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)


def test_merged_cache_layout(tmp_path):
    for multi_query, shape in ((True, (3, 5, 16)), (False, (3, 4, 5, 16))):
        folder, _ = save_hf_checkpoint(tmp_path / str(multi_query), multi_query=multi_query)
        model = load_model(open_checkpoint(str(folder)))
        ids = torch.zeros((3, 5), dtype=torch.int64)
        mask = torch.ones((3, 5), dtype=torch.int64)
        _, *presents = model(ids, mask, torch.arange(5).expand(3, 5), *model.empty_past(3))
        assert [tuple(p.shape) for p in presents] == [shape, shape]
