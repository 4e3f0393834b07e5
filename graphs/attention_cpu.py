"""Multi-query attention without shape arithmetic, for the cpu target.

The plain graph folds the query heads into the rows of one batched MatMul ([batch, sequence*heads, head_dim]
against the shared key) and reshapes the scores to [batch, sequence, heads, total] for the mask. Each of its
four Reshapes takes a shape computed at run time from Shape/Gather/Unsqueeze/Concat nodes, about a dozen tiny
nodes per layer that a decode step runs for nothing (ONNX Runtime's CPU provider pays for every node).

Rewritten, every per-layer Reshape is constant (0 copies a dimension, -1 infers one), and the mask takes the
scores' layout instead, once per step (the mask nodes are the same in every layer: common-subexpression
elimination keeps one copy):

    query   [b, s, d]          -> Reshape [0, -1, head_dim]              -> [b, s*heads, head_dim]
    scores  MatMul(query, Transpose(key))                                -> [b, s*heads, t]
    mask    [b, s, 1, t]       -> Expand [1, 1, heads, 1], Reshape        -> [b, s*heads, t]   (once a step)
    out     MatMul(probs, value) [b, s*heads, head_dim] -> Reshape [0, -1, d] -> [b, s, d]

The merged cache's Concat and its `present` output stay as they are.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

from starcast.contract.config import GPTBigCodeConfig
from starcast.graphs.attention import FLOAT, softmax_upcast, unscale_factor


class MultiQueryAttentionStaticShapes(pattern.RewriteRuleClassBase):
    """One layer of the plain graph's multi-query attention, its dynamic Reshapes -> constant ones."""

    def __init__(self, name: str, config: GPTBigCodeConfig, upcast: bool, unscale: bool):
        super().__init__(name, remove_nodes=True)
        self.config, self.upcast, self.unscale = config, upcast, unscale
        self.scaled = config.scale_attn_weights or unscale

    def softmax(self, op, scores, allowed, mask_value, scale, factor):
        """The scaled, masked softmax as the exporter emits it (in fp32, with the fp16 checkpoints' unscaling)."""
        if self.scaled:
            scores = op.Mul(scores, scale)
        if self.upcast:
            scores = op.Cast(scores, to=FLOAT)
            if self.unscale:
                scores = op.Mul(scores, factor)
        return op.Softmax(op.Where(allowed, scores, mask_value), axis=-1)

    def pattern(self, op, qkv, past, allowed, mask_value, scale, factor):
        query, new_kv = op.Split(qkv, pattern.ANY_VALUE, axis=2, _outputs=2)
        present = op.Concat(past, new_kv, axis=1)
        key, value = op.Split(present, pattern.ANY_VALUE, axis=-1, _outputs=2)
        scores = op.MatMul(op.Reshape(query, pattern.ANY_VALUE), op.Transpose(key, perm=[0, 2, 1]))
        probs = self.softmax(op, op.Reshape(scores, pattern.ANY_VALUE), allowed, mask_value, scale, factor)
        if self.upcast:
            probs = op.Cast(probs, _allow_other_attributes=True, _outputs=["probs"])
        out = op.MatMul(op.Reshape(probs, pattern.ANY_VALUE), value)
        return op.Reshape(out, pattern.ANY_VALUE), present

    def rewrite(self, op, qkv, past, allowed, mask_value, scale=None, factor=None, probs=None):
        cfg = self.config
        query, new_kv = op.Split(qkv, op.Constant(value_ints=[cfg.n_embd, 2 * cfg.head_dim]), axis=2, _outputs=2)
        present = op.Concat(past, new_kv, axis=1)
        key, value = op.Split(present, op.Constant(value_ints=[cfg.head_dim, cfg.head_dim]), axis=-1, _outputs=2)
        rows = op.Reshape(query, op.Constant(value_ints=[0, -1, cfg.head_dim]))  # [b, s*nh, hd]
        scores = op.MatMul(rows, op.Transpose(key, perm=[0, 2, 1]))  # [b, s*nh, t]
        weights = self.softmax(op, scores, self.row_mask(op, allowed), mask_value, scale, factor)
        if self.upcast:
            weights = op.Cast(weights, to=probs.dtype)
        out = op.MatMul(weights, value)  # [b, s*nh, hd]
        return op.Reshape(out, op.Constant(value_ints=[0, -1, cfg.n_embd])), present

    def row_mask(self, op, allowed):
        """The mask [b, s, 1, t] as [b, s*nh, t]: the same nodes in every layer, which CSE leaves once a step."""
        heads = op.Expand(allowed, op.Constant(value_ints=[1, 1, self.config.n_head, 1]))  # [b, s, nh, t]
        total = op.Shape(allowed, start=3)
        return op.Reshape(heads, op.Concat(op.Constant(value_ints=[0, -1]), total, axis=0))

    def check(self, context, allowed, **_):
        result = pattern.MatchResult()
        shape = allowed.shape
        if shape is not None and shape.rank() is not None and shape.rank() != 4:
            return result.fail(f"the mask has rank {shape.rank()}, expected [batch, sequence, 1, total]")
        return result


def static_shape_attention_rules(config: GPTBigCodeConfig, dtype: str) -> pattern.RewriteRuleSet:
    upcast = softmax_upcast(config, dtype)
    variants = [(upcast, False)]
    if unscale_factor(config, dtype, 1) != 1.0:
        variants.insert(0, (True, True))
    rule = MultiQueryAttentionStaticShapes
    return pattern.RewriteRuleSet([rule.rule(f"{rule.__name__}{'_unscale' * u}", config, c, u) for c, u in variants])
