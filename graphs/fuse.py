"""Run the graph passes over a plain starcast graph for one execution-provider target, counting every match.

Targets (measured, see shared notes and benchmarks/RESULTS.md):
  cpu   SkipLayerNormalization, FastGelu/BiasGelu, shape chains folded, the lm_head on the last position
        only (logits [batch, 1, vocab]); attention stays the plain graph's one batched MatMul of all query
        heads against the shared key, which ONNX Runtime's CPU provider runs faster than its
        GroupQueryAttention kernel. Otherwise the plain graph's inputs and outputs.
  cuda  the same plus GroupQueryAttention over static, in-place key and value buffers (the static-cache
        interface: see `static_cache.py`).
Each layer must end with exactly one GELU op, its SkipLayerNormalizations and (cuda) one attention op; a pass
that matches fewer times is an error, never a silently slower model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import optimize
from onnxscript.rewriter.ort_fusions import shape_optimization
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_layer_normalization

from starcast.errors import UserError
from starcast.exporter.config import GPTBigCodeConfig
from starcast.graphs.attention import attention_rules
from starcast.graphs.gelu import gelu_bias_rules, gelu_rules
from starcast.graphs.last_logits import last_logits_rules
from starcast.graphs.static_cache import add_static_cache_inputs, finish_static_cache_interface

TARGETS = ("cpu", "cuda")
FUSED_OPS = ("GroupQueryAttention", "FastGelu", "Gelu", "BiasGelu", "SkipLayerNormalization")


class FusionError(UserError):
    """The graph is not the one the passes expect (not a starcast GPTBigCode export, or already fused)."""


@dataclass
class FusionReport:
    target: str
    matches: dict[str, int] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    histogram_before: dict[str, int] = field(default_factory=dict)
    histogram_after: dict[str, int] = field(default_factory=dict)

    def to_dict(self, n_layer: int) -> dict:
        return {
            "target": self.target,
            "matches": self.matches,
            "nodes": {"before": self.nodes_before, "after": self.nodes_after},
            "nodes_per_layer": {
                "before": round(self.nodes_before / n_layer, 1),
                "after": round(self.nodes_after / n_layer, 1),
            },
            "fused_ops": {op: self.histogram_after.get(op, 0) for op in FUSED_OPS if self.histogram_after.get(op)},
            "histogram_before": self.histogram_before,
            "histogram_after": self.histogram_after,
        }


def histogram(model: ir.Model) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in model.graph).items(), key=lambda kv: (-kv[1], kv[0])))


def require(name: str, matched: int, expected: int) -> None:
    if matched != expected:
        per = "one per layer" if expected > 1 else "once"
        raise FusionError(
            f"pass {name} matched {matched} times, expected {expected} ({per}): "
            "not a starcast GPTBigCode export, or already fused"
        )


def check_plain(model: ir.Model) -> None:
    domains = {node.domain for node in model.graph}
    if domains - {"", "ai.onnx"}:
        raise FusionError("the graph already has fused (com.microsoft) ops: fuse the plain model.onnx instead")
    names = {value.name for value in model.graph.inputs}
    if not {"input_ids", "attention_mask", "position_ids", "past_key_values.0.key_value"} <= names:
        raise FusionError("the graph's inputs are not those of a starcast GPTBigCode export")


def fuse(model: ir.Model, config: GPTBigCodeConfig, target: str, dtype: str) -> FusionReport:
    """Rewrite `model` (a plain starcast graph) in place for `target`; returns what each pass did."""
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r} (supported: {', '.join(TARGETS)})")
    check_plain(model)
    report = FusionReport(target, nodes_before=len(model.graph), histogram_before=histogram(model))
    n_layer = config.n_layer

    common_passes.ShapeInferencePass()(model)
    optimize(model)
    shape_optimization.rules.apply_to_model(model)
    optimize(model)

    if target == "cuda":
        layers = add_static_cache_inputs(model, config, dtype)
        matched = attention_rules(config, layers, upcast=dtype != "fp32").apply_to_model(model)
        require("MultiQueryAttentionToGQA", matched, n_layer)
        report.matches["attention"] = matched
        finish_static_cache_interface(model, config, layers)

    if config.activation_function != "relu":
        report.matches["gelu"] = gelu_rules.apply_to_model(model)
        require("Gelu", report.matches["gelu"], n_layer)
        report.matches["gelu_bias"] = gelu_bias_rules.apply_to_model(model)
        require("GeluBias", report.matches["gelu_bias"], n_layer)

    if target == "cpu":
        report.matches["last_position_logits"] = last_logits_rules.apply_to_model(model)
        require("LastPositionLogits", report.matches["last_position_logits"], 1)
    common_passes.ShapeInferencePass()(model)
    report.matches["skip_layer_norm"] = fuse_skip_layer_normalization(model)
    # ln_1 and ln_2 of every layer plus ln_f: each follows a residual Add (ln_1 of layer 0: wte + wpe).
    require("SkipLayerNormalization", report.matches["skip_layer_norm"], 2 * n_layer + 1)
    optimize(model)
    common_passes.RemoveUnusedNodesPass()(model)
    model.opset_imports["com.microsoft"] = 1
    report.nodes_after = len(model.graph)
    report.histogram_after = histogram(model)
    return report
