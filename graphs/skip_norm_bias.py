"""The projection bias into SkipLayerNormalization: one Add node less per projection.

Each layer's attention and MLP output projection adds its bias and then the residual; onnxscript's fusion makes
SkipLayerNormalization of the residual Add and leaves the bias Add in front of it. SkipLayerNormalization has a
bias input of its own (added before the skip, and included in its input+skip+bias sum output):

    SkipLayerNormalization(Add(x, bias), skip, gamma, beta) -> SkipLayerNormalization(x, skip, gamma, beta, bias)
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

MS = "com.microsoft"


class SkipLayerNormBias(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, bias, skip, gamma, beta, epsilon):
        return op.SkipLayerNormalization(
            op.Add(x, bias), skip, gamma, beta, epsilon=epsilon, _domain=MS, _outputs=4, _allow_other_inputs=True
        )

    def check(self, context, x, bias, gamma, **_):
        result = pattern.MatchResult()
        if any(value is not None for value in context.root.inputs[4:]):
            return result.fail("the SkipLayerNormalization has a bias already")
        if bias.const_value is None or bias.shape is None or bias.shape.rank() != 1:
            return result.fail("the bias is not a 1-D constant")
        if x.const_value is not None:
            return result.fail("the biased input is a constant")
        if gamma.shape is not None and bias.shape != gamma.shape:
            return result.fail(f"bias shape {bias.shape} is not the normalised shape {gamma.shape}")
        return result

    def rewrite(self, op, x, bias, skip, gamma, beta, epsilon):
        return op.SkipLayerNormalization(x, skip, gamma, beta, bias, epsilon=epsilon.value, _domain=MS, _outputs=4)


skip_norm_bias_rules = pattern.RewriteRuleSet(SkipLayerNormBias.rule().commute())
