"""`Generator`: transformers-style `generate()` over a starcast export, driven by ONNX Runtime.

    gen = Generator.from_pretrained("out/", provider="cpu")
    ids = gen.generate(input_ids, attention_mask, max_new_tokens=64)       # int64 [batch, prompt + new]
    text = gen.generate_text("def fib(n):", max_new_tokens=64)
    for piece in gen.stream("def fib(n):"): print(piece, end="")

It runs the fused graph when the export has one for the provider, else the plain graph. The KV cache lives
in one device buffer per batch size, allocated on first use and bound by address every step.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from starcast.errors import UserError
from starcast.exporter.config import GPTBigCodeConfig
from starcast.exporter.manifest import read_manifest
from starcast.runtime.sampling import SamplingOptions, TokenChooser
from starcast.runtime.session import create_session, device_of
from starcast.runtime.steps import ConcatCacheSteps, StaticCacheSteps
from starcast.runtime.text import StopStrings, StreamDecoder, Tokenizer

GRAPHS = ("auto", "plain", "fused")


class Generator:
    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        provider: str,
        graph: str,
        max_length: int,
        threads: int = 0,
        cuda_graph: bool = True,
    ):
        self.folder, self.manifest, self.provider = folder, manifest, provider
        self.config = GPTBigCodeConfig.from_hf_dict(manifest["config"])
        self.dtype = np.float16 if manifest["dtype"] == "fp16" else np.float32
        self.max_length = max_length
        fused = manifest.get("fused")
        if graph == "fused" and not fused:
            raise UserError(f"{folder}: the export has no fused graph (run starcast optimize)")
        use_fused = fused is not None and (graph == "fused" or (graph == "auto" and fused["target"] == provider))
        self.graph_file = fused["model"] if use_fused else manifest.get("model", "model.onnx")
        self.interface = fused["interface"] if use_fused else "concat-cache"
        self.cuda_graph = cuda_graph and provider == "cuda" and self.interface == "static-cache"
        if provider == "tensorrt":  # UNRUN here: see runtime/trt_steps.py
            if "tensorrt" not in manifest:
                raise UserError(f"{folder}: the export has no TensorRT engine (run starcast build-engine)")
            self.graph_file, self.interface, self.session = manifest["tensorrt"]["engine"], "tensorrt", None
        else:
            self.session = create_session(folder / self.graph_file, provider, threads, cuda_graph=self.cuda_graph)
        self.tokenizer = Tokenizer.from_export(folder)
        self.eos_token_id = read_eos(folder, self.config)
        self._steps: dict[int, Any] = {}

    @classmethod
    def from_pretrained(
        cls,
        export_dir: str | Path,
        provider: str = "cpu",
        graph: str = "auto",
        max_length: int | None = None,
        threads: int = 0,
        cuda_graph: bool = True,
    ) -> Generator:
        folder = Path(export_dir).expanduser().absolute()
        manifest = optimum_manifest(folder) if is_optimum_export(folder) else read_manifest(folder)
        check_export_files(folder, manifest)
        if graph not in GRAPHS:
            raise UserError(f"unknown graph {graph!r} (supported: {', '.join(GRAPHS)})")
        n_positions = manifest["config"]["n_positions"]
        max_length = max_length or n_positions
        if not 0 < max_length <= n_positions:
            raise UserError(f"max_length must be in 1..{n_positions} (the model's n_positions), got {max_length}")
        return cls(folder, manifest, provider, graph, max_length, threads, cuda_graph)

    # -- token ids in, token ids out ------------------------------------------------------------------------

    def steps(self, batch: int) -> Any:
        """The prefill/decode driver for this batch size, with its cache buffer (allocated once)."""
        if batch not in self._steps:
            device = device_of(self.provider)
            args = (self.session, self.config, batch, self.max_length, self.dtype, device)
            if self.interface == "tensorrt":
                from starcast.runtime.trt_steps import TrtSteps

                engine = self.folder / self.graph_file
                self._steps[batch] = TrtSteps(engine, self.config, batch, self.max_length, self.dtype)
            elif self.interface == "static-cache":
                self._steps[batch] = StaticCacheSteps(*args, cuda_graph=self.cuda_graph)
            else:
                self._steps[batch] = ConcatCacheSteps(*args)
        return self._steps[batch]

    def validate(self, input_ids: Any, attention_mask: Any, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise UserError(f"input_ids must be a non-empty [batch, prompt] array, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"input_ids must be integers, got {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise UserError(
                f"token id {int(ids.max() if ids.max() >= 0 else ids.min())} is outside the vocabulary "
                f"(0..{self.config.vocab_size - 1})"
            )
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None, :]
        if mask.shape != ids.shape:
            raise UserError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
        if (mask.sum(axis=1) == 0).any():
            raise UserError("a prompt is empty (its attention_mask is all zeros)")
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if ids.shape[1] + max_new_tokens > self.max_length:
            raise UserError(
                f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the maximum "
                f"length {self.max_length}: the cache would overflow"
            )
        return ids.astype(np.int64), mask.astype(np.int64)

    def token_steps(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        max_new_tokens: int = 32,
        eos_token_id: int | None = -1,
        **sampling: Any,
    ) -> Iterator[np.ndarray]:
        """Yield the next token of every row, step by step ([batch] int64); finished rows yield EOS (padding)."""
        ids, mask = self.validate(input_ids, attention_mask, max_new_tokens)
        eos = self.eos_token_id if eos_token_id == -1 else eos_token_id
        choose = TokenChooser(SamplingOptions(**sampling))
        steps = self.steps(ids.shape[0])
        history = ids
        finished = np.zeros(ids.shape[0], dtype=bool)
        logits = steps.prefill(ids, mask)
        for step in range(max_new_tokens):
            next_ids = choose(logits, history)
            if eos is not None:
                next_ids = np.where(finished, eos, next_ids)
                finished |= next_ids == eos
            history = np.concatenate([history, next_ids[:, None]], axis=1)
            yield next_ids.astype(np.int64)
            if finished.all() or step == max_new_tokens - 1:
                return
            logits = steps.decode_one_token(next_ids)

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        max_new_tokens: int = 32,
        eos_token_id: int | None = -1,
        **sampling: Any,
    ) -> np.ndarray:
        """transformers-style: int64 [batch, prompt] in, [batch, prompt + new] out (EOS pads finished rows)."""
        ids, mask = self.validate(input_ids, attention_mask, max_new_tokens)
        new = list(self.token_steps(ids, mask, max_new_tokens, eos_token_id, **sampling))
        return np.concatenate([ids, np.stack(new, axis=1)], axis=1)

    # -- text in, text out -----------------------------------------------------------------------------------

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise UserError(f"{self.folder}: the export has no tokenizer.json; pass token ids instead of text")
        return self.tokenizer

    def encode_batch(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids and mask, as transformers pads prompts for generation."""
        tokenizer = self.require_tokenizer()
        encoded = [tokenizer.encode(p) for p in prompts]
        if any(not e for e in encoded):
            raise UserError("a prompt is empty")
        width = max(map(len, encoded))
        ids = np.zeros((len(encoded), width), np.int64)
        mask = np.zeros((len(encoded), width), np.int64)
        for row, tokens in enumerate(encoded):
            ids[row, width - len(tokens) :] = tokens
            mask[row, width - len(tokens) :] = 1
        return ids, mask

    def stream(
        self, prompt: str, max_new_tokens: int = 64, stop_strings: list[str] | None = None, **options: Any
    ) -> Iterator[str]:
        """Yield text pieces as they are decoded; the text ends before the first stop string."""
        tokenizer = self.require_tokenizer()
        ids, mask = self.encode_batch([prompt])
        stops, decoder = StopStrings(stop_strings), StreamDecoder(tokenizer)
        text, released = "", 0
        for next_ids in self.token_steps(ids, mask, max_new_tokens, **options):
            if self.eos_token_id is not None and next_ids[0] == self.eos_token_id:
                break
            text += decoder.push(next_ids[0])
            cut = stops.find(text)
            if cut is not None:
                yield text[released:cut]
                return
            safe = stops.safe_length(text)
            if safe > released:
                yield text[released:safe]
                released = safe
        text += decoder.flush()
        cut = stops.find(text)
        if text[released:cut]:
            yield text[released:cut]

    def generate_text(
        self, prompt: str, max_new_tokens: int = 64, stop_strings: list[str] | None = None, **options: Any
    ) -> str:
        return "".join(self.stream(prompt, max_new_tokens, stop_strings, **options))

    def generate_texts(
        self, prompts: list[str], max_new_tokens: int = 64, stop_strings: list[str] | None = None, **options: Any
    ) -> list[str]:
        """A batch of prompts of different lengths (left-padded); each continuation ends before a stop string."""
        tokenizer = self.require_tokenizer()
        ids, mask = self.encode_batch(prompts)
        out = self.generate(ids, mask, max_new_tokens, **options)[:, ids.shape[1] :]
        stops, texts = StopStrings(stop_strings), []
        for row in out:
            tokens = list(row)
            if self.eos_token_id is not None and self.eos_token_id in tokens:
                tokens = tokens[: tokens.index(self.eos_token_id)]
            text = tokenizer.decode(tokens)
            cut = stops.find(text)
            texts.append(text[:cut])
        return texts

    def fill_in_the_middle(self, prefix: str, suffix: str, max_new_tokens: int = 64, **options: Any) -> str:
        return self.generate_text(self.require_tokenizer().fim_prompt(prefix, suffix), max_new_tokens, **options)


def is_optimum_export(folder: Path) -> bool:
    """An optimum-onnx gpt_bigcode export: model.onnx with past_key_values.{i}.key / .value, no starcast.json."""
    if (folder / "starcast.json").exists() or not (folder / "model.onnx").is_file():
        return False
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return any(value.name == "past_key_values.0.key" for value in graph.input)


def optimum_manifest(folder: Path) -> dict[str, Any]:
    """What the runtime needs to know about an optimum export, in the shape of a starcast manifest."""
    import onnx

    config = GPTBigCodeConfig.from_file(folder / "config.json")
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    cache_type = next(v for v in graph.input if v.name == "past_key_values.0.key").type.tensor_type.elem_type
    dtype = "fp16" if cache_type == onnx.TensorProto.FLOAT16 else "fp32"
    return {"format": "optimum", "model": "model.onnx", "dtype": dtype, "config": config.to_hf_dict(), "files": {}}


def read_eos(folder: Path, config: GPTBigCodeConfig) -> int | None:
    eos = config.eos_token_id
    path = folder / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id", eos)
        except json.JSONDecodeError:
            raise UserError(f"{path}: not valid JSON") from None
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if eos is not None and 0 <= eos < config.vocab_size else None


def check_export_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Cheap checks at load time (`starcast check` re-hashes everything): files present, config as recorded."""
    for name in manifest.get("files", {}):
        if not (folder / name).is_file():
            raise UserError(f"{folder}: {name} is missing (the export is incomplete)")
    recorded = GPTBigCodeConfig.from_hf_dict(manifest["config"])
    if (folder / "config.json").is_file() and GPTBigCodeConfig.from_file(folder / "config.json") != recorded:
        raise UserError(f"{folder}: config.json does not match the config recorded in starcast.json")
