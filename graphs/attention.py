"""Multi-query (and multi-head) attention -> ONNX Runtime's GroupQueryAttention over a static KV buffer.

The plain graph computes each layer's attention with standard ops and a merged cache that a Concat copies
every step:

    query, new_kv = Split(qkv)                  present = Concat(past_key_value, new_kv)
    key, value = Split(present)                 scores = MatMul(Reshape(query), Transpose(key)) * scale
    probs = Softmax(Where(allowed, scores, -inf))   (Cast to fp32 and back around it in fp16 graphs)
    out = Reshape(MatMul(Reshape(probs), value))

GroupQueryAttention with kv_num_heads=1 (n_head without multi_query) replaces all of it. It reads and writes
per-layer key and value buffers of a fixed maximum length in place (`past_key_values.{i}.key` is bound to
the same memory as `present.{i}.key`), so a decode step writes one position instead of copying the cache,
and the causal and padding masks come from `seqlens_k` (per row: valid tokens - 1) and
`total_sequence_length` instead of `attention_mask`.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from starcast.contract.config import GPTBigCodeConfig

MS = "com.microsoft"
FLOAT = ir.DataType.FLOAT


def masked_softmax(op, scores, allowed, mask_value, upcast: bool, unscale: bool):
    """The softmax block as the exporter emits it for each dtype / scale_attention_softmax_in_fp32 combination."""
    if upcast:
        scores = op.Cast(scores, to=FLOAT)
        if unscale:
            scores = op.Mul(scores, pattern.ANY_VALUE)
    probs = op.Softmax(op.Where(allowed, scores, mask_value), axis=-1)
    return op.Cast(probs, _allow_other_attributes=True) if upcast else probs


class AttentionToGQA(pattern.RewriteRuleClassBase):
    """What both layouts share: the configuration, the layer lookup and the scale check."""

    def __init__(self, name: str, config: GPTBigCodeConfig, layer_inputs: dict, upcast: bool, unscale: bool):
        super().__init__(name, remove_nodes=True)
        self.config, self.layer_inputs, self.upcast, self.unscale = config, layer_inputs, upcast, unscale
        self.scaled = config.scale_attn_weights or unscale  # a scale of exactly 1.0 is folded away by the exporter

    def check(self, context, past, scale=None, **captured):
        return check_layer(self.config, self.layer_inputs, past, scale)


class MultiQueryAttentionToGQA(AttentionToGQA):
    """One layer of the plain graph's attention, multi_query=True, -> GroupQueryAttention(kv_num_heads=1)."""

    def pattern(self, op, qkv, past, allowed, mask_value, scale):
        query, new_kv = op.Split(qkv, pattern.ANY_VALUE, axis=2, _outputs=2)
        key, value = op.Split(op.Concat(past, new_kv, axis=1), pattern.ANY_VALUE, axis=-1, _outputs=2)
        scores = op.MatMul(op.Reshape(query, pattern.ANY_VALUE), op.Transpose(key, perm=[0, 2, 1]))
        scores = op.Reshape(scores, pattern.ANY_VALUE)
        if self.scaled:
            scores = op.Mul(scores, scale)
        probs = masked_softmax(op, scores, allowed, mask_value, self.upcast, self.unscale)
        out = op.MatMul(op.Reshape(probs, pattern.ANY_VALUE), value)
        return op.Reshape(out, pattern.ANY_VALUE)

    def rewrite(self, op, qkv, past, **captured):
        cfg = self.config
        sizes = op.Constant(value_ints=[cfg.n_embd, cfg.head_dim, cfg.head_dim])
        query, key, value = op.Split(qkv, sizes, axis=2, _outputs=3)
        return group_query_attention(op, cfg, self.layer_inputs[past.name], query, key, value)


class MultiHeadAttentionToGQA(AttentionToGQA):
    """One layer of the plain graph's attention, multi_query=False, -> GroupQueryAttention(kv_num_heads=n_head)."""

    def pattern(self, op, qkv, past, allowed, mask_value, scale):
        heads = op.Transpose(op.Reshape(qkv, pattern.ANY_VALUE), perm=[0, 2, 1, 3])
        query, new_kv = op.Split(heads, pattern.ANY_VALUE, axis=3, _outputs=2)
        key, value = op.Split(op.Concat(past, new_kv, axis=2), pattern.ANY_VALUE, axis=-1, _outputs=2)
        scores = op.MatMul(query, op.Transpose(key, perm=[0, 1, 3, 2]))
        if self.scaled:
            scores = op.Mul(scores, scale)
        probs = masked_softmax(op, scores, allowed, mask_value, self.upcast, self.unscale)
        return op.Reshape(op.Transpose(op.MatMul(probs, value), perm=[0, 2, 1, 3]), pattern.ANY_VALUE)

    def rewrite(self, op, qkv, past, **captured):
        cfg = self.config
        per_head = op.Reshape(qkv, op.Constant(value_ints=[0, 0, cfg.n_head, 3 * cfg.head_dim]))
        sizes = op.Constant(value_ints=[cfg.head_dim] * 3)
        flat = op.Constant(value_ints=[0, 0, cfg.n_embd])
        query, key, value = (op.Reshape(t, flat) for t in op.Split(per_head, sizes, axis=3, _outputs=3))
        return group_query_attention(op, cfg, self.layer_inputs[past.name], query, key, value)


def true_scale(cfg: GPTBigCodeConfig) -> float:
    return cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0


def check_layer(
    cfg: GPTBigCodeConfig, layer_inputs: dict, past: ir.Value, scale: ir.Value | None
) -> pattern.MatchResult:
    result = pattern.MatchResult()
    if past.name not in layer_inputs:
        return result.fail(f"{past.name} is not a past_key_values graph input")
    if scale is None:
        return result if true_scale(cfg) == 1.0 else result.fail("no attention scale, but the config scales")
    if scale.const_value is None or scale.const_value.size != 1:
        return result.fail("attention scale is not a scalar constant")
    # fp16 graphs with scale_attention_softmax_in_fp32 trace scale / (layer + 1) and multiply (layer + 1) back in
    # fp32; GroupQueryAttention takes the true scale in one attribute.
    traced = float(scale.const_value.numpy().reshape(())) * layer_inputs[past.name]["unscale"]
    if abs(traced - true_scale(cfg)) > 1e-2 * true_scale(cfg):
        return result.fail(f"attention scale {traced} does not match the config's {true_scale(cfg)}")
    return result


def group_query_attention(op, cfg: GPTBigCodeConfig, layer: dict, query, key, value):
    output, present_key, present_value = op.GroupQueryAttention(
        query,
        key,
        value,
        layer["past_key"],
        layer["past_value"],
        layer["seqlens_k"],
        layer["total_sequence_length"],
        num_heads=cfg.n_head,
        kv_num_heads=cfg.kv_heads,
        scale=true_scale(cfg),
        _domain=MS,
        _outputs=3,
    )
    layer["presents"] = (present_key, present_value)
    return output


def softmax_upcast(config: GPTBigCodeConfig, dtype: str) -> bool:
    """Whether the exporter wrapped the softmax in Casts to fp32 (model.py's Attention.softmax)."""
    return dtype != "fp32" and config.attention_softmax_in_fp32


def unscale_factor(config: GPTBigCodeConfig, dtype: str, layer: int) -> float:
    """What scale_attention_softmax_in_fp32 divided the traced scale by in `layer` (and multiplied back in fp32)."""
    return float(layer + 1) if softmax_upcast(config, dtype) and config.scale_attention_softmax_in_fp32 else 1.0


def attention_rules(config: GPTBigCodeConfig, layer_inputs: dict, dtype: str) -> pattern.RewriteRuleSet:
    rule = MultiQueryAttentionToGQA if config.multi_query else MultiHeadAttentionToGQA
    upcast = softmax_upcast(config, dtype)
    # With scale_attention_softmax_in_fp32, fp16 graphs multiply back by (layer + 1) in fp32: every layer but the
    # first, where the factor is 1 and the exporter emits no Mul.
    variants = [(upcast, False)]
    if unscale_factor(config, dtype, 1) != 1.0:
        variants.insert(0, (True, True))
    return pattern.RewriteRuleSet(
        [rule.rule(f"{rule.__name__}{'_unscale' * u}", config, layer_inputs, c, u) for c, u in variants]
    )
