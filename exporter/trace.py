"""Trace the reference model into the plain graph's structure without its weights.

The model is traced with stand-in weights passed as inputs of the traced function (`weights_as_inputs_forward`):
uninitialised tensors that nothing writes, so that they never become resident, and the exporter sees no
parameter to serialise or fold. Tracing a 15.5B model does not hold its 31 GB. Each Linear stores its weight
transposed, as the graph reads it, and its MatMul is traced without being computed (`StandInMatMul`).

`trace_graph` returns that header and, for every weight the graph reads, where its bytes come from: a checkpoint
tensor, as it is or transposed. `exporter/weights.py` then streams those bytes into the external data file.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from starcast.contract import interfaces as io
from starcast.contract.config import GPTBigCodeConfig
from starcast.contract.graph_files import IR_VERSION, OPSET
from starcast.exporter.model import GPTBigCode


@dataclass(frozen=True)
class WeightRef:
    """Graph initializer `name` holds checkpoint parameter `parameter`, transposed when `transposed`."""

    name: str
    parameter: str
    transposed: bool
    shape: tuple[int, ...]


def dynamic_axes(config: GPTBigCodeConfig) -> dict[str, dict[int, str]]:
    seq_axis = 1 if config.multi_query else 2
    axes = {
        io.INPUT_IDS: {0: "batch", 1: "sequence"},
        io.ATTENTION_MASK: {0: "batch", 1: "total_sequence"},
        io.POSITION_IDS: {0: "batch", 1: "sequence"},
        io.LOGITS: {0: "batch", 1: "sequence"},
    }
    for past, present in io.merged_cache_names(config.n_layer):
        axes[past] = {0: "batch", seq_axis: "past_sequence"}
        axes[present] = {0: "batch", seq_axis: "total_sequence"}
    return axes


def sample_inputs(config: GPTBigCodeConfig, dtype: torch.dtype, batch: int = 2, seq: int = 3, past: int = 4):
    """Inputs for tracing; every dynamic axis gets a distinct size above 1 so none is baked in as a constant."""
    ids = torch.zeros((batch, seq), dtype=torch.int64)
    mask = torch.ones((batch, past + seq), dtype=torch.int64)
    positions = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq)
    cache = [torch.zeros(config.cache_shape(batch, past), dtype=dtype) for _ in range(config.n_layer)]
    return (ids, mask, positions, *cache)


class StandInMatMul(torch.autograd.Function):
    """`x @ w` as the graph sees it (ONNX MatMul), computed as zeros of its shape: the trace needs the op and
    the shape, and CPUs without fp16 GEMM kernels would take a minute per billion fp16 weights to compute it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - autograd's signature
        return x.new_zeros((*x.shape[:-1], w.shape[-1]))

    @staticmethod
    def symbolic(g, x, w):
        return g.op("MatMul", x, w)


class StandInLinear(nn.Module):
    """A Linear whose weight is stored transposed, (in, out), as the graph reads it: MatMul's B with nothing to
    constant-fold. Its ops and their order are those the exporter writes for `nn.Linear` on a 3-D input: MatMul,
    then Add(bias, product). Its tensors are plain attributes, set from the traced function's inputs."""

    def __init__(self, has_bias: bool):
        super().__init__()
        self.has_bias = has_bias
        self.weight_t: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        product = StandInMatMul.apply(x, self.weight_t)
        return self.bias + product if self.has_bias else product


def weights_as_inputs_forward(model: GPTBigCode, slots: list[tuple[nn.Module, str]]) -> None:
    """Make `model` take every weight as an input after its interface's: the exporter then keeps each weight a
    graph input and never sees it as a parameter (its shape inference serialises parameters into a protobuf, all
    31 GB of a 15.5B model, and constant folding would materialise transposes). The forward is replaced on the
    instance, not wrapped in another module, so that node names keep their scopes (`/h.0/attn/...`)."""
    interface = len(io.concat_inputs(model.config.n_layer))

    def forward(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for (module, attr), tensor in zip(slots, inputs[interface:], strict=True):
            module.__dict__[attr] = tensor
        return GPTBigCode.forward(model, *inputs[:interface])

    model.forward = forward


def stand_in(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor: the kernel backs large ones with fresh pages, and tracing only reads a few rows
    of the embeddings and the norms' and biases' vectors, so they never become resident."""
    return torch.empty(shape, dtype=dtype)


def weights_as_inputs(config: GPTBigCodeConfig, dtype: torch.dtype) -> tuple[GPTBigCode, dict[str, torch.Tensor]]:
    """The reference model with its Linears (the head included) as StandInLinear and no parameters, and a stand-in
    for every weight by the name the graph input gets (`X.weight_t` for a Linear's transposed weight)."""
    with torch.device("meta"):
        model = GPTBigCode(config)
    slots: list[tuple[nn.Module, str]] = []
    weights: dict[str, torch.Tensor] = {}
    for name, module in list(model.named_modules()):
        parent, _, attr = name.rpartition(".")
        if isinstance(module, nn.Linear):
            linear = StandInLinear(module.bias is not None)
            setattr(model.get_submodule(parent), attr, linear)
            slots.append((linear, "weight_t"))
            weights[f"{name}.weight_t"] = stand_in(module.weight.shape[::-1], dtype)
            if module.bias is not None:
                slots.append((linear, "bias"))
                weights[f"{name}.bias"] = stand_in(module.bias.shape, dtype)
        elif isinstance(module, (nn.Embedding, nn.LayerNorm)):
            for key, parameter in list(module.named_parameters(recurse=False)):
                del module._parameters[key]
                slots.append((module, key))
                weights[f"{name}.{key}"] = stand_in(parameter.shape, dtype)
    weights_as_inputs_forward(model, slots)
    return model.eval(), weights


def trace_graph(config: GPTBigCodeConfig, dtype: torch.dtype) -> tuple[onnx.ModelProto, list[WeightRef]]:
    """The plain graph (concat-cache interface, every position's logits) without weights, and its weights'
    sources. The weights are still graph inputs: `exporter/weights.py` makes them initializers."""
    model, weights = weights_as_inputs(config, dtype)
    with tempfile.TemporaryDirectory(prefix="starcast-trace-") as scratch:
        path = Path(scratch) / "graph.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # The TorchScript exporter takes named dynamic axes directly; torch.export cannot express
            # "total = past + sequence" across varargs inputs, and 0-length past would be specialised away.
            torch.onnx.export(
                model, (*sample_inputs(config, dtype), *weights.values()), str(path),
                input_names=[*io.concat_inputs(config.n_layer), *weights],
                output_names=io.concat_outputs(config.n_layer), dynamic_axes=dynamic_axes(config),
                opset_version=OPSET, do_constant_folding=True, dynamo=False,
            )  # fmt: skip
        proto = onnx.load(str(path))
    proto.ir_version = IR_VERSION
    proto.producer_name = "starcast"
    proto.graph.name = "gpt_bigcode"
    refs = weight_sources(proto, config)
    if config.tie_word_embeddings:
        read_tied_head_from_embedding(proto, refs)
    return proto, refs


def weight_sources(proto: onnx.ModelProto, config: GPTBigCodeConfig) -> list[WeightRef]:
    """Every graph input that is a weight, and the checkpoint parameter it holds: `X.weight_t` is `X.weight`
    transposed, any other weight is the parameter of its own name."""
    interface = set(io.concat_inputs(config.n_layer))
    refs = []
    for value in proto.graph.input:
        if value.name in interface:
            continue
        shape = tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
        transposed = value.name.endswith(".weight_t")
        refs.append(WeightRef(value.name, value.name.removesuffix("_t"), transposed, shape))
    return refs


def read_tied_head_from_embedding(proto: onnx.ModelProto, refs: list[WeightRef]) -> None:
    """The lm_head reads the token embedding itself through Gemm(transB=1) instead of a transposed copy: for a
    tied head that copy would store the largest matrix twice."""
    graph = proto.graph
    embedding = next(n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[1] == io.INPUT_IDS)
    head = next(n for n in reversed(graph.node) if n.op_type == "MatMul" and n.input[1] == "lm_head.weight_t")
    gemm = onnx.helper.make_node("Gemm", [head.input[0], embedding], list(head.output), name="lm_head/Gemm", transB=1)
    position = list(graph.node).index(head)
    graph.node.remove(head)
    graph.node.insert(position, gemm)
    still_read = {name for node in graph.node for name in node.input}
    refs[:] = [r for r in refs if r.name in still_read]
    kept = [value for value in graph.input if value.name in still_read]
    del graph.input[:]
    graph.input.extend(kept)
