"""`starcast check --trt-ready`: will TensorRT's ONNX parser build this graph? A pure-ONNX check that runs anywhere.

It checks what breaks TensorRT builds of LLM exports: custom-domain ops (com.microsoft fusions), control flow
(`If`, `Loop` — optimum's merged decoders), ops outside TensorRT's ONNX operator support, an opset newer than
the parser reads, external data that is not one file beside the model, and dynamic axes that the build-engine
profiles (batch, sequence, past) do not cover.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from starcast.contract.graph_files import external_data_files, load_header

MAX_OPSET = 20  # TensorRT 10.x's ONNX parser reads opsets 9 to 20
PROFILE_AXES = {"batch", "sequence", "past_sequence", "total_sequence"}
# Standard ops TensorRT's ONNX parser supports (onnx-tensorrt operators.md), restricted to what an LLM export uses.
TRT_OPS = {
    "Abs",
    "Add",
    "And",
    "ArgMax",
    "Cast",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Cos",
    "Div",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Gather",
    "GatherElements",
    "Gelu",
    "Gemm",
    "Greater",
    "GreaterOrEqual",
    "Identity",
    "LayerNormalization",
    "Less",
    "LessOrEqual",
    "Log",
    "MatMul",
    "Max",
    "Min",
    "Mul",
    "Neg",
    "Not",
    "Or",
    "Pow",
    "Range",
    "Reciprocal",
    "ReduceMax",
    "ReduceMean",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Shape",
    "Sigmoid",
    "Sin",
    "Slice",
    "Softmax",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Tile",
    "Transpose",
    "Trilu",
    "Unsqueeze",
    "Where",
    "Xor",
}


@dataclass
class TrtReport:
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        verdict = "ready for TensorRT" if self.ready else f"NOT ready for TensorRT ({len(self.problems)} problems)"
        return [verdict, *(f"  ok: {c}" for c in self.checked), *(f"  problem: {p}" for p in self.problems)]


def check_trt_ready(model_path: Path) -> TrtReport:
    report = TrtReport()
    proto = load_header(model_path)
    graph = proto.graph
    nodes = list(graph.node)

    custom = sorted({f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in ("", "ai.onnx")})
    if custom:
        report.problems.append(f"custom-domain ops TensorRT cannot parse: {', '.join(custom)} (use the plain graph)")
    else:
        report.checked.append("standard ONNX ops only")
    control = sorted({n.op_type for n in nodes if n.op_type in ("If", "Loop", "Scan")})
    if control:
        report.problems.append(f"control flow: {', '.join(control)}")
    else:
        report.checked.append("no If/Loop/Scan")
    unsupported = sorted({n.op_type for n in nodes if n.domain in ("", "ai.onnx")} - TRT_OPS - {"If", "Loop", "Scan"})
    if unsupported:
        report.problems.append(f"ops outside the supported set: {', '.join(unsupported)}")
    else:
        report.checked.append(f"{len({n.op_type for n in nodes})} op types, all supported")

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset > MAX_OPSET:
        report.problems.append(f"opset {opset}: TensorRT's parser reads up to {MAX_OPSET}")
    else:
        report.checked.append(f"opset {opset}")

    files = external_data_files(proto, model_path)  # confined to the model's folder, or a one-line error
    beside = {path.name for path in files if path.parent == model_path.parent.resolve()}
    if len(files) > 1 or len(beside) != len(files):
        report.problems.append(f"external data must be one file beside the model, found {sorted(map(str, files))}")
    else:
        report.checked.append(f"weights {'in ' + next(iter(beside)) if beside else 'inside the model'}")

    axes = {
        dim.dim_param
        for value in [*graph.input, *graph.output]
        for dim in value.type.tensor_type.shape.dim
        if dim.dim_param
    }
    uncovered = sorted(axes - PROFILE_AXES)
    if uncovered:
        report.problems.append(f"dynamic axes no optimization profile covers: {', '.join(uncovered)}")
    else:
        report.checked.append(f"dynamic axes {', '.join(sorted(axes))} covered by the prompt and decode profiles")
    return report
