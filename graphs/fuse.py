"""Run the graph passes over a plain starcast graph for one execution-provider target, counting every match.

Targets (measured: benchmarks/RESULTS.md, "One decode step"):
  cpu   SkipLayerNormalization, FastGelu/BiasGelu, shape chains folded, the lm_head on the last position only;
        attention stays the plain graph's one batched MatMul of all query heads against the shared key, which
        ONNX Runtime's CPU provider runs faster than its GroupQueryAttention kernel. The concat-cache interface.
  cuda  the same plus GroupQueryAttention over static, in-place key and value buffers (the static-cache
        interface, see static_cache.py).
Each pass must match a known number of times (once per layer, 2 * layers + 1 SkipLayerNormalizations, one
lm_head); fewer is an error that names the rule and why its best partial match failed, never a silently slower
model.
"""

from __future__ import annotations

import io as text_io
from collections import Counter
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import optimize
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import shape_optimization
from onnxscript.rewriter.ort_fusions.skip_normalization import (
    fuse_skip_layer_normalization,
    skip_layer_normalization_ruleset,
)

from starcast.contract import interfaces as io
from starcast.contract.config import GPTBigCodeConfig
from starcast.contract.errors import UserError
from starcast.contract.graph_files import IR_VERSION, check_graph_file, save_model
from starcast.graphs.attention import attention_rules
from starcast.graphs.attention_cpu import static_shape_attention_rules
from starcast.graphs.gelu import gelu_bias_rules, gelu_rules
from starcast.graphs.last_logits import last_logits_rules
from starcast.graphs.skip_norm_bias import skip_norm_bias_rules
from starcast.graphs.static_cache import add_static_cache_inputs, finish_static_cache_interface

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


def why_not(rules: pattern.RewriteRuleSet, model: ir.Model) -> str:
    """The best partial match of `rules` in `model` and why it failed (the tracer changes nothing)."""
    tracer = pattern.MatchingTracer()
    with redirect_stdout(text_io.StringIO()):
        rules.apply_to_model(model, tracer=tracer)
    best = None
    for rule, matches in tracer.best_matches_map.items():
        for match in matches:
            if match.status.name != "SUCCESS" and (best is None or match.score() > best[1].score()):
                best = (rule, match)
    if best is None:
        return "no node of the graph starts the pattern"
    rule, match = best
    reason = match.match_result.reason or "the graph's nodes differ from the pattern"
    return f"closest: rule {rule.name} at node {match.root_node.name!r} ({match.status.name.lower()}: {reason})"


def apply(name: str, rules: pattern.RewriteRuleSet, model: ir.Model, expected: int, report: FusionReport) -> None:
    """Apply `rules`; anything but `expected` matches is an error that says which rule and why."""
    matched = rules.apply_to_model(model)
    report.matches[name] = matched
    if matched != expected:
        per = "one per layer" if expected > 1 else "once"
        reason = why_not(rules, model)  # the instances that did not match are still in the graph
        raise FusionError(
            f"pass {name} matched {matched} times, expected {expected} ({per}): not a starcast GPTBigCode export, "
            f"or already fused; {reason}"
        )


def check_plain(model: ir.Model) -> None:
    domains = {node.domain for node in model.graph}
    if domains - {"", "ai.onnx"}:
        raise FusionError("the graph already has fused (com.microsoft) ops: fuse the plain model.onnx instead")
    names = {value.name for value in model.graph.inputs}
    if not {io.INPUT_IDS, io.ATTENTION_MASK, io.POSITION_IDS, io.past_key_value(0)} <= names:
        raise FusionError("the graph's inputs are not those of a starcast GPTBigCode export")


def fuse(model: ir.Model, config: GPTBigCodeConfig, target: str, dtype: str) -> FusionReport:
    """Rewrite `model` (a plain starcast graph) in place for `target`; returns what each pass did."""
    if target not in io.TARGETS:
        raise UserError(f"unknown target {target!r} (supported: {', '.join(io.TARGETS)})")
    check_plain(model)
    report = FusionReport(target, nodes_before=len(model.graph), histogram_before=histogram(model))
    n_layer = config.n_layer

    common_passes.ShapeInferencePass()(model)
    optimize(model)
    shape_optimization.rules.apply_to_model(model)
    optimize(model)

    interface = io.TARGET_INTERFACES[target]
    if interface == io.CONCAT_CACHE and config.multi_query:
        apply("attention", static_shape_attention_rules(config, dtype), model, n_layer, report)
        common_passes.CommonSubexpressionEliminationPass()(model)  # one mask for every layer
    if interface == io.STATIC_CACHE:
        layers = add_static_cache_inputs(model, config, dtype)
        apply("attention", attention_rules(config, layers, dtype), model, n_layer, report)
        finish_static_cache_interface(model, config, layers)

    if config.activation_function != "relu":
        apply("gelu", gelu_rules, model, n_layer, report)
        apply("gelu_bias", gelu_bias_rules, model, n_layer, report)

    apply("last_position_logits", last_logits_rules(model, interface, config.n_embd), model, 1, report)
    common_passes.ShapeInferencePass()(model)
    # ln_1 and ln_2 of every layer plus ln_f: each follows a residual Add (ln_1 of layer 0: wte + wpe).
    matched = fuse_skip_layer_normalization(model)
    report.matches["skip_layer_norm"] = matched
    if matched != 2 * n_layer + 1:
        raise FusionError(
            f"pass skip_layer_norm matched {matched} times, expected {2 * n_layer + 1} (two per layer and ln_f); "
            f"{why_not(skip_layer_normalization_ruleset, model)}"
        )
    # Every projection's bias: the attention's and the MLP's output projection of every layer.
    apply("skip_norm_bias", skip_norm_bias_rules, model, 2 * n_layer, report)
    optimize(model)
    common_passes.RemoveUnusedNodesPass()(model)
    model.opset_imports["com.microsoft"] = 1
    report.nodes_after = len(model.graph)
    report.histogram_after = histogram(model)
    return report


def fuse_file(source: Path, target_path: Path, config: GPTBigCodeConfig, target: str, dtype: str) -> FusionReport:
    """Fuse the plain graph at `source` into `target_path`, in the same folder: every tensor the passes did not
    change stays in the plain graph's weights file, so the weights are stored once."""
    check_graph_file(source)  # its external data stays in its folder, before onnx_ir reads any of it
    model = ir.load(source)
    report = fuse(model, config, target, dtype)
    model.ir_version = IR_VERSION
    save_model(ir.serde.serialize_model(model), target_path)
    return report
