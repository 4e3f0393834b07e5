"""GELU rewrites: each form the exporter emits for an activation becomes ONNX Runtime's fused op.

The tanh approximation is written three ways by GPTBigCode checkpoints' activation functions, and each traces
to a different chain of elementwise ops; all compute 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))):
  gelu_pytorch_tanh  x·x·x cubed by two Muls       -> FastGelu
  gelu_new           Pow(x, 3)                      -> FastGelu
  gelu_fast          x·√(2/π)·(1 + 0.044715·x·x)     -> FastGelu
and the exact form 0.5·x·(1 + erf(x/√2)) (`gelu`)   -> Gelu.
Then the c_fc bias Add in front folds into the op: FastGelu(x + b) -> FastGelu(x, b), Gelu(x + b) -> BiasGelu.
"""

from __future__ import annotations

import math

from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.bias_gelu import BiasGeluFusion

MS = "com.microsoft"


def near(value: float) -> pattern.Constant:
    """A scalar constant matched to fp16 precision, so that fp16 graphs fuse like fp32 ones."""
    return pattern.Constant(value, rel_tol=2e-3, abs_tol=1e-6)


SQRT_2_OVER_PI, CUBIC, HALF, ONE, SQRT_2 = map(near, (math.sqrt(2.0 / math.pi), 0.044715, 0.5, 1.0, math.sqrt(2.0)))


class GeluTanhCubedByMul(pattern.RewriteRuleClassBase):
    """gelu_pytorch_tanh: F.gelu(x, approximate="tanh") as traced at opset 17."""

    def pattern(self, op, x):
        cube = op.Mul(x, op.Mul(x, x))
        inner = op.Mul(SQRT_2_OVER_PI, op.Add(x, op.Mul(CUBIC, cube)))
        return op.Mul(HALF, op.Mul(x, op.Add(ONE, op.Tanh(inner))))

    def rewrite(self, op, x):
        return op.FastGelu(x, _domain=MS)


class GeluTanhCubedByPow(pattern.RewriteRuleClassBase):
    """gelu_new: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x^3)))."""

    def pattern(self, op, x):
        inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, 3.0), CUBIC)), SQRT_2_OVER_PI)
        return op.Mul(op.Mul(x, HALF), op.Add(op.Tanh(inner), ONE))

    def rewrite(self, op, x):
        return op.FastGelu(x, _domain=MS)


class GeluTanhFactored(pattern.RewriteRuleClassBase):
    """gelu_fast: 0.5·x·(1 + tanh(x·0.7978845608·(1 + 0.044715·x·x)))."""

    def pattern(self, op, x):
        inner = op.Mul(op.Mul(x, SQRT_2_OVER_PI), op.Add(op.Mul(op.Mul(x, CUBIC), x), ONE))
        return op.Mul(op.Mul(x, HALF), op.Add(op.Tanh(inner), ONE))

    def rewrite(self, op, x):
        return op.FastGelu(x, _domain=MS)


class GeluErf(pattern.RewriteRuleClassBase):
    """gelu: 0.5·x·(1 + erf(x/√2)) -> Gelu (onnxscript's rule, with constants matched to fp16 precision)."""

    def pattern(self, op, x):
        return op.Mul(op.Mul(x, op.Add(op.Erf(op.Div(x, SQRT_2)), ONE)), HALF)

    def rewrite(self, op, x):
        return op.Gelu(x, _domain=MS)


class FastGeluBias(pattern.RewriteRuleClassBase):
    """FastGelu(x + bias) -> FastGelu(x, bias): the c_fc bias is added inside the GELU kernel."""

    def pattern(self, op, x, bias):
        return op.FastGelu(op.Add(x, bias), _domain=MS)

    def check(self, context, x, bias, **_):
        result = pattern.MatchResult()
        if bias.const_value is None or bias.shape is None or bias.shape.rank() != 1:
            return result.fail("bias is not a 1-D constant")
        return result

    def rewrite(self, op, x, bias):
        return op.FastGelu(x, bias, _domain=MS)


gelu_rules = pattern.RewriteRuleSet(
    [
        *GeluTanhCubedByMul.rule().commute(),
        *GeluTanhCubedByPow.rule().commute(),
        *GeluTanhFactored.rule().commute(),
        GeluErf.rule(),
    ]
)
gelu_bias_rules = pattern.RewriteRuleSet(
    [*FastGeluBias.rule().commute(), *BiasGeluFusion.rule("bias_gelu", contrib_op=True).commute()]
)
