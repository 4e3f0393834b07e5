"""Logits for the last position only, in the cpu-fused graph.

Generation reads one row of logits per sequence, but the plain graph (whose contract is all positions, so that
perplexity can be measured) runs the lm_head — a quarter of a tiny_starcoder token's FLOPs — on every prompt
token. In the cpu-fused graph the lm_head runs on the last position of each row, and `logits` is
[batch, 1, vocab]. Rows are left-padded there, so the last position is each row's last real token.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern


def last_position(op, hidden):
    """[batch, sequence, d] -> [batch, d]: the last position of every row."""
    last = op.Slice(hidden, op.Constant(value_ints=[-1]), op.Constant(value_ints=[2**62]), op.Constant(value_ints=[1]))
    return op.Squeeze(last, op.Constant(value_ints=[1]))


class LastPositionTiedHead(pattern.RewriteRuleClassBase):
    """Reshape(Gemm(Reshape(h), embedding, transB=1)) -> Unsqueeze(Gemm(last(h), embedding, transB=1))."""

    def pattern(self, op, hidden, weight):
        return op.Reshape(op.Gemm(op.Reshape(hidden, pattern.ANY_VALUE), weight, transB=1), pattern.ANY_VALUE)

    def rewrite(self, op, hidden, weight):
        return op.Unsqueeze(op.Gemm(last_position(op, hidden), weight, transB=1), op.Constant(value_ints=[1]))


class LastPositionHead(pattern.RewriteRuleClassBase):
    """Reshape(MatMul(Reshape(h), W)) -> Unsqueeze(MatMul(last(h), W)), for an untied lm_head."""

    def pattern(self, op, hidden, weight):
        return op.Reshape(op.MatMul(op.Reshape(hidden, pattern.ANY_VALUE), weight), pattern.ANY_VALUE)

    def check(self, context, weight, **_):
        result = pattern.MatchResult()
        return result if weight.const_value is not None else result.fail("lm_head weight is not a constant")

    def rewrite(self, op, hidden, weight):
        return op.Unsqueeze(op.MatMul(last_position(op, hidden), weight), op.Constant(value_ints=[1]))


last_logits_rules = pattern.RewriteRuleSet([LastPositionTiedHead.rule(), LastPositionHead.rule()])
