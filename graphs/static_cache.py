"""The fused (cuda) graph's interface: static key/value buffers written in place, lengths instead of a mask.

  inputs   input_ids int64 [batch, sequence]            position_ids int64 [batch, sequence]
           seqlens_k int32 [batch]                      per row: tokens in the cache after this step, minus 1
           total_sequence_length int32 []               prompt step: the sequence length (the padded prompt
                                                        width, even when every row is shorter); decode step:
                                                        max_sequence_length, the buffers' length (fixed, for
                                                        CUDA graphs). Each row's own length is seqlens_k + 1.
           past_key_values.{i}.key / .value  [batch, kv_heads, max_sequence_length, head_dim]
  outputs  logits [batch, sequence, vocab]
           present.{i}.key / .value  same shape, bound to the same memory as the past buffers

Each row's tokens start at cache position 0, so a left-padded prompt batch is passed right-padded (padding at
the end of the row, excluded by seqlens_k); see StaticCacheSteps in runtime/steps.py.
"""

from __future__ import annotations

import onnx_ir as ir

from starcast.contract import interfaces as io
from starcast.contract.config import GPTBigCodeConfig
from starcast.graphs.attention import unscale_factor

DTYPES = {"fp32": ir.DataType.FLOAT, "fp16": ir.DataType.FLOAT16}


def add_static_cache_inputs(model: ir.Model, config: GPTBigCodeConfig, dtype: str) -> dict[str, dict]:
    """Add the new graph inputs; returns, per old `past_key_values.{i}.key_value` name, what layer i's op reads."""
    graph = model.graph
    seqlens_k = ir.Value(name=io.SEQLENS_K, type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape(["batch"]))
    total = ir.Value(name=io.TOTAL_SEQUENCE_LENGTH, type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([]))
    graph.inputs.extend([seqlens_k, total])
    cache_shape = ["batch", config.kv_heads, io.MAX_LENGTH_DIM, config.head_dim]
    layers = {}
    for i in range(config.n_layer):
        key, value = (
            ir.Value(name=io.past(i, part), type=ir.TensorType(DTYPES[dtype]), shape=ir.Shape(cache_shape))
            for part in ("key", "value")
        )
        graph.inputs.extend([key, value])
        layers[io.past_key_value(i)] = {
            "index": i,
            "past_key": key,
            "past_value": value,
            "seqlens_k": seqlens_k,
            "total_sequence_length": total,
            "unscale": unscale_factor(config, dtype, i),
        }
    # The merged `present.{i}.key_value` outputs go first, so that the Concat producing them is internal to the
    # attention pattern and can be replaced.
    for output in [o for o in graph.outputs if o.name.startswith("present.")]:
        graph.outputs.remove(output)
    return layers


def finish_static_cache_interface(model: ir.Model, config: GPTBigCodeConfig, layers: dict[str, dict]) -> None:
    """Expose each layer's present key/value as graph outputs; drop the merged-cache inputs and the mask."""
    graph = model.graph
    cache_shape = ["batch", config.kv_heads, io.MAX_LENGTH_DIM, config.head_dim]
    for layer in sorted(layers.values(), key=lambda layer: layer["index"]):
        for part, value in zip(("key", "value"), layer["presents"], strict=True):
            value.name = io.present(layer["index"], part)
            value.shape = ir.Shape(cache_shape)
            value.type = layer["past_key"].type
            graph.outputs.append(value)
    from onnxscript.optimizer import optimize

    optimize(model)  # removes the mask computation, now dead
    for value in list(graph.inputs):
        if value.name in layers or value.name == io.ATTENTION_MASK:
            if value.uses():
                raise ValueError(f"{value.name} is still used after the attention rewrite")
            graph.inputs.remove(value)
