"""Weight-only block-wise int8/int4 quantization of every linear layer into ONNX Runtime's MatMulNBits.

ONNX Runtime's own quantizer (`MatMulNBitsQuantizer`) does the work; starcast only makes the tied lm_head
visible to it (the plain graph reads the embedding through Gemm(transB=1), which the quantizer skips, so the
head gets its own MatMul weight, quantized, while the embedding lookup stays float) and measures what the
quantization cost: perplexity on held-out text, top-1 agreement with the unquantized model along its own
greedy path, and the largest logit difference. Embeddings, LayerNorms and attention stay in float.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from starcast.errors import UserError
from starcast.exporter.config import GPTBigCodeConfig
from starcast.exporter.onnx_export import IR_VERSION, save_model

BITS = (4, 8)
BLOCK_SIZES = (32, 64, 128)
MIN_EVAL_TOKENS = 128
AGREEMENT_STEPS = 256


def untie_lm_head(proto: onnx.ModelProto) -> None:
    """Gemm(x, embedding, transB=1) -> MatMul(x, embedding^T), so that the quantizer sees the head's weight."""
    graph = proto.graph
    embedding_name = next((n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"), None)
    for index, node in enumerate(graph.node):
        if node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] == embedding_name:
            embedding = next(init for init in graph.initializer if init.name == embedding_name)
            head = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(embedding).T), "lm_head.weight_t")
            graph.initializer.append(head)
            graph.node.remove(node)
            matmul = onnx.helper.make_node(
                "MatMul", [node.input[0], head.name], list(node.output), name="lm_head/MatMul"
            )
            graph.node.insert(index, matmul)
            return


def quantize_graph(source: Path, target: Path, bits: int, block_size: int) -> dict[str, int]:
    import logging

    from onnxruntime.quantization import matmul_nbits_quantizer
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    matmul_nbits_quantizer.logger.setLevel(logging.WARNING)  # it logs every node it looks at

    proto = onnx.load(str(source), load_external_data=True)
    if any(node.op_type == "MatMulNBits" for node in proto.graph.node):
        raise UserError(f"{source}: already quantized")
    untie_lm_head(proto)
    options = dict(
        block_size=block_size, is_symmetric=True, accuracy_level=4, bits=bits, op_types_to_quantize=("MatMul",)
    )
    quantizer = MatMulNBitsQuantizer(proto, algo_config=DefaultWeightOnlyQuantConfig(**options), **options)
    quantizer.process()
    quantized = quantizer.model.model
    quantized.ir_version = IR_VERSION
    count = sum(node.op_type == "MatMulNBits" for node in quantized.graph.node)
    save_model(quantized, target)
    return {"matmul_nbits": count}


# -- measuring what quantization cost -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accuracy:
    eval_tokens: int
    perplexity_float: float | None
    perplexity_quantized: float | None
    perplexity_increase: float | None  # relative: 0.01 is +1%
    top1_agreement: float
    agreement_steps: int
    max_logit_difference: float

    def summary(self) -> str:
        ppl = (
            f"perplexity {self.perplexity_float:.3f} -> {self.perplexity_quantized:.3f} "
            f"({self.perplexity_increase:+.2%}), "
            if self.perplexity_float is not None
            else ""
        )
        return (
            f"{ppl}top-1 agreement {self.top1_agreement:.2%} over {self.agreement_steps} greedy steps, "
            f"max logit difference {self.max_logit_difference:.3f}"
        )


def window_nll(session, config: GPTBigCodeConfig, tokens: np.ndarray, dtype, window: int = 256) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over consecutive windows of `window` tokens (plain graph)."""
    window = min(config.n_positions, window)
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        ids = tokens[start : start + window + 1]
        if len(ids) < 2:
            break
        inputs, targets = ids[None, :-1], ids[1:]
        feeds = {
            "input_ids": inputs,
            "attention_mask": np.ones_like(inputs),
            "position_ids": np.arange(inputs.shape[1], dtype=np.int64)[None],
        }
        for i in range(config.n_layer):
            feeds[f"past_key_values.{i}.key_value"] = np.zeros(config.cache_shape(1, 0), dtype)
        logits = session.run(["logits"], feeds)[0][0].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        total -= float(log_probs[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return total, count


def measure(
    float_model: Path,
    quantized_model: Path,
    config: GPTBigCodeConfig,
    dtype: str,
    eval_tokens: np.ndarray | None,
    steps: int = AGREEMENT_STEPS,
) -> Accuracy:
    from starcast.runtime.steps import ConcatCacheSteps

    np_dtype = np.float16 if dtype == "fp16" else np.float32
    from starcast.runtime.session import create_session

    sessions = create_session(float_model), create_session(quantized_model)
    ppl = [None, None]
    if eval_tokens is not None:
        for i, session in enumerate(sessions):
            nll, count = window_nll(session, config, eval_tokens, np_dtype)
            ppl[i] = math.exp(nll / count)
    prompt = (
        eval_tokens[:32] if eval_tokens is not None else np.random.default_rng(0).integers(0, config.vocab_size, 32)
    )[None].astype(np.int64)
    steps = min(steps, config.n_positions - prompt.shape[1] - 1)
    reference, quantized = (
        ConcatCacheSteps(s, config, 1, prompt.shape[1] + steps + 1, np_dtype, "cpu") for s in sessions
    )
    mask = np.ones_like(prompt)
    expected, ours = reference.prefill(prompt, mask), quantized.prefill(prompt, mask)
    agree, worst = 0, 0.0
    for _ in range(steps):
        token = expected.argmax(-1)
        agree += int(ours.argmax(-1)[0] == token[0])
        worst = max(worst, float(np.abs(expected.astype(np.float64) - ours).max()))
        expected, ours = reference.decode_one_token(token), quantized.decode_one_token(token)
    increase = ppl[1] / ppl[0] - 1 if ppl[0] is not None else None
    count = int(len(eval_tokens)) if eval_tokens is not None else 0
    return Accuracy(count, ppl[0], ppl[1], increase, agree / steps, steps, worst)


def eval_tokens_for(folder: Path, manifest: dict[str, Any], eval_text: Path | None) -> np.ndarray | None:
    """Token ids of the evaluation text: the user's file, or for the built-in demo model its held-out code."""
    from starcast.runtime.text import Tokenizer

    tokenizer = Tokenizer.from_export(folder)
    if eval_text is None:
        from starcast.builtin import held_out_text_for

        text = held_out_text_for(str(manifest.get("source", "")))
        if text is None or tokenizer is None:
            return None
    else:
        if tokenizer is None:
            raise UserError(f"{folder}: --eval-text needs the export's tokenizer.json, and there is none")
        try:
            text = Path(eval_text).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise UserError(f"{eval_text}: cannot read ({exc.strerror})") from None
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if len(tokens) < MIN_EVAL_TOKENS:
        raise UserError(f"evaluation text is too short to measure: {len(tokens)} tokens, need {MIN_EVAL_TOKENS}")
    return tokens


def check_options(bits: int, block_size: int) -> None:
    if bits not in BITS:
        raise UserError(f"unsupported bit width {bits} (supported: {', '.join(map(str, BITS))})")
    if block_size not in BLOCK_SIZES:
        raise UserError(f"unsupported block size {block_size} (supported: {', '.join(map(str, BLOCK_SIZES))})")


def quantize_folder(
    folder: Path, manifest: dict[str, Any], bits: int, block_size: int, eval_text: Path | None, progress
) -> dict[str, Any]:
    """Quantize `folder`'s graphs in place (a temporary folder of the caller's); returns the manifest entry."""
    check_options(bits, block_size)
    if "quantization" in manifest:
        raise UserError(f"{folder}: already quantized ({manifest['quantization']['bits']}-bit)")
    config = GPTBigCodeConfig.from_hf_dict(manifest["config"])
    tokens = eval_tokens_for(folder, manifest, eval_text)
    graphs = [manifest.get("model", "model.onnx")] + ([manifest["fused"]["model"]] if "fused" in manifest else [])
    float_copy = folder / ".float-model"  # the unquantized graphs, kept until the accuracy is measured
    counts, originals = {}, []
    try:
        for index, name in enumerate(graphs):
            with progress.stage("quantize", f"{name}: int{bits}, block {block_size}"):
                original = float_copy / str(index) / Path(name).name
                original.parent.mkdir(parents=True)
                for suffix in ("", ".data"):
                    if (folder / (name + suffix)).is_file():
                        shutil.move(folder / (name + suffix), original.parent / (original.name + suffix))
                counts[name] = quantize_graph(original, folder / name, bits, block_size)
                originals.append(original)
        with progress.stage("accuracy", "quantized vs float, ONNX Runtime CPU"):
            accuracy = measure(originals[0], folder / graphs[0], config, manifest["dtype"], tokens)
    finally:
        shutil.rmtree(float_copy, ignore_errors=True)
    progress.say(accuracy.summary())
    return {
        "bits": bits,
        "block_size": block_size,
        "format": "MatMulNBits",
        "symmetric": True,
        "accuracy_level": 4,
        "graphs": counts,
        "accuracy": asdict(accuracy),
    }


def quantize_export(
    source: Path, output: Path, bits: int, block_size: int, eval_text: Path | None, overwrite: bool, progress
) -> dict[str, Any]:
    """`starcast quantize EXPORT_DIR OUT`: a new export folder with quantized graphs; the source is untouched."""
    from starcast.exporter.export import derive_export
    from starcast.exporter.manifest import read_manifest

    check_options(bits, block_size)
    manifest = read_manifest(source.expanduser().absolute())
    if "quantization" in manifest:
        raise UserError(f"{source}: already quantized ({manifest['quantization']['bits']}-bit)")

    def quantize(folder: Path, manifest: dict) -> None:
        manifest["quantization"] = quantize_folder(folder, manifest, bits, block_size, eval_text, progress)

    return derive_export(source, output, overwrite, quantize)
