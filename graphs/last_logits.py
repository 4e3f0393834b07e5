"""Logits for each row's last token only, in the fused graphs.

Generation reads one row of logits per sequence, but the plain graph (whose contract is all positions, so that
perplexity can be measured) runs the lm_head — a quarter of a tiny_starcoder token's FLOPs — on every prompt
token and returns [batch, prompt, vocab]. The fused graphs run it on each row's last token, and `logits` is
[batch, 1, vocab]:
  cpu (concat-cache)   rows are left-padded: the last position of every row.
  cuda (static-cache)  rows are right-padded, and a row's tokens have consecutive positions from its first
                       token's: the last real token is at index seqlens_k - position_ids[:, 0] (a prompt row's
                       length - 1, or 0 for a decode step's one token). Computed from positions, so padded
                       positions (whatever their position ids) cannot be picked, and no op's tie order (ArgMax)
                       matters; no Shape ops either, which would run on the CPU and break CUDA graph capture.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from starcast.contract import interfaces as io


def last_position(op, hidden, _inputs):
    """[batch, sequence, d] -> [batch, d]: the last position of every row."""
    last = op.Slice(hidden, op.Constant(value_ints=[-1]), op.Constant(value_ints=[2**62]), op.Constant(value_ints=[1]))
    return op.Squeeze(last, op.Constant(value_ints=[1]))


def last_real_token(op, hidden, inputs):
    """[batch, sequence, d] -> [batch, d]: per row, the token at index seqlens_k - (its first position id)."""
    seqlens = op.Cast(inputs[io.SEQLENS_K], to=ir.DataType.INT64)  # [batch]
    first = op.Gather(inputs[io.POSITION_IDS], op.Constant(value_int=0), axis=1)  # [batch]
    index = op.Unsqueeze(op.Sub(seqlens, first), op.Constant(value_ints=[1, 2]))  # [batch, 1, 1]
    index = op.Expand(index, op.Constant(value_ints=[1, 1, inputs["n_embd"]]))  # [batch, 1, d]
    return op.Squeeze(op.GatherElements(hidden, index, axis=1), op.Constant(value_ints=[1]))


class LastTokenTiedHead(pattern.RewriteRuleClassBase):
    """Reshape(Gemm(Reshape(h), embedding, transB=1)) -> Unsqueeze(Gemm(last(h), embedding, transB=1))."""

    def __init__(self, pick, inputs: dict):
        super().__init__(f"{type(self).__name__}_{pick.__name__}")
        self.pick, self.inputs = pick, inputs

    def pattern(self, op, hidden, weight):
        return op.Reshape(op.Gemm(op.Reshape(hidden, pattern.ANY_VALUE), weight, transB=1), pattern.ANY_VALUE)

    def rewrite(self, op, hidden, weight):
        last = self.pick(op, hidden, self.inputs)
        return op.Unsqueeze(op.Gemm(last, weight, transB=1), op.Constant(value_ints=[1]))


class LastTokenHead(LastTokenTiedHead):
    """Reshape(MatMul(Reshape(h), W)) -> Unsqueeze(MatMul(last(h), W)), for an untied lm_head."""

    def pattern(self, op, hidden, weight):
        return op.Reshape(op.MatMul(op.Reshape(hidden, pattern.ANY_VALUE), weight), pattern.ANY_VALUE)

    def check(self, context, weight, **_):
        result = pattern.MatchResult()
        return result if weight.const_value is not None else result.fail("lm_head weight is not a constant")

    def rewrite(self, op, hidden, weight):
        last = self.pick(op, hidden, self.inputs)
        return op.Unsqueeze(op.MatMul(last, weight), op.Constant(value_ints=[1]))


def last_logits_rules(model: ir.Model, interface: str, n_embd: int) -> pattern.RewriteRuleSet:
    """The lm_head rules for a graph of `interface` (its inputs are looked up in `model`)."""
    if interface == io.CONCAT_CACHE:
        pick, inputs = last_position, {}
    else:
        pick = last_real_token
        inputs = {v.name: v for v in model.graph.inputs if v.name in (io.SEQLENS_K, io.POSITION_IDS)}
        inputs["n_embd"] = n_embd
    return pattern.RewriteRuleSet([LastTokenTiedHead.rule(pick, inputs), LastTokenHead.rule(pick, inputs)])
