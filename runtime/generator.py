"""`Generator`: transformers-style `generate()` over a starcast export, driven by ONNX Runtime.

    gen = Generator.from_pretrained("out/", provider="cpu")
    ids = gen.generate(input_ids, attention_mask, max_new_tokens=64)       # int64 [batch, prompt + new]
    text = gen.generate_text("def fib(n):", max_new_tokens=64)
    for piece in gen.stream("def fib(n):"): print(piece, end="")

It runs the fused graph when the export has one for the provider, else the plain graph (`graph_note` says
which, and why). The KV cache lives in one device buffer, for the batch size of the last call: a call with
another batch size frees it before allocating its own (after checking that it fits in the memory available),
so memory never grows with the batch sizes seen. It is bound by address every step.

Threads: one Generator may be shared by several threads; its calls take turns (a lock), since they share the
cache. A stream holds the Generator until it is exhausted or closed. Starting a second call in the thread that
holds it (two unfinished streams interleaved) raises GeneratorBusy (runtime/limits.py) instead of waiting forever.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from starcast.contract import interfaces as io
from starcast.contract.dtypes import numpy_dtype
from starcast.contract.errors import InvalidType, InvalidValue, UserError
from starcast.contract.manifest import Manifest
from starcast.runtime.export_folder import choose_graph, open_export, read_eos
from starcast.runtime.inputs import check_prompt_batch, check_whole_number
from starcast.runtime.limits import Turn, check_available, check_position_table, ort_failure
from starcast.runtime.sampling import SamplingOptions, TokenChooser
from starcast.runtime.session import SessionOptions, create_session, device_of
from starcast.runtime.steps import check_interface, make_steps
from starcast.runtime.text import StopStrings, StreamDecoder, Tokenizer


class Generator:
    def __init__(
        self, folder: Path, manifest: Manifest, provider: str, session: SessionOptions, graph: str, max_length: int
    ):
        self.folder, self.manifest, self.options = folder, manifest, session
        self.provider = provider
        self.config = manifest.config
        self.dtype = numpy_dtype(manifest.dtype)
        self.max_length = max_length
        if self.provider == "tensorrt":  # UNRUN here: see runtime/tensorrt/steps.py
            if manifest.tensorrt is None:
                raise UserError(f"{folder}: the export has no TensorRT engine (run starcast build-engine)")
            from starcast.runtime.tensorrt.steps import EngineLimits, load_engine

            self.graph_file, self.interface, self.session = manifest.engine_file, "tensorrt", None
            self.graph_note, self.cuda_graph = f"TensorRT engine {self.graph_file}", False
            engine = load_engine(manifest.path(folder, self.graph_file))
            self.max_length = min(max_length, EngineLimits.of(engine).max_length)
        else:
            choice = choose_graph(manifest, self.provider, graph)
            self.graph_file, self.interface, self.graph_note = choice.record.model, choice.record.interface, choice.note
            self.cuda_graph = session.cuda_graph and self.provider == "cuda" and self.interface == io.STATIC_CACHE
            options = SessionOptions(**{**vars(session), "cuda_graph": self.cuda_graph})
            self.session = create_session(manifest.path(folder, self.graph_file), options)
            check_interface(self.session, self.interface, self.config, self.dtype)
        self.eos_token_ids = read_eos(folder, self.config)
        self._tokenizer: Tokenizer | None = None
        self._tokenizer_loaded = False
        self._steps: dict[int, Any] = {}  # at most one batch size (see the module docstring)
        self._turn = Turn("Generator")

    @classmethod
    def from_pretrained(
        cls,
        export_dir: str | Path,
        provider: str = "cpu",
        graph: str = "auto",
        max_length: int | None = None,
        threads: int = 0,
        cuda_graph: bool = True,
        device_id: int = 0,
        tf32: bool = False,
        verbose: bool = False,
    ) -> Generator:
        folder = Path(export_dir).expanduser().absolute()
        manifest = open_export(folder)
        check_export_files(folder, manifest)
        n_positions = manifest.config.n_positions
        if max_length is None:
            max_length = n_positions
        check_whole_number("max_length", max_length)
        if not 0 < max_length <= n_positions:
            raise InvalidValue(f"max_length must be in 1..{n_positions} (the model's n_positions), got {max_length}")
        session = SessionOptions(
            provider="cuda" if provider == "tensorrt" else provider,
            threads=threads,
            device_id=device_id,
            cuda_graph=cuda_graph,
            tf32=tf32,
            verbose=verbose,
        )
        return cls(folder, manifest, provider, session, graph, max_length)

    @property
    def eos_token_id(self) -> int | None:
        """The first end-of-sequence id (what finished rows are padded with), or None."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def tokenizer(self) -> Tokenizer | None:
        """Loaded on first use: generating from token ids needs no tokenizer."""
        if not self._tokenizer_loaded:
            self._tokenizer = Tokenizer.from_export(self.folder)
            self._tokenizer_loaded = True
        return self._tokenizer

    # -- token ids in, token ids out ------------------------------------------------------------------------

    def steps(self, batch: int) -> Any:
        """The prefill/decode driver for this batch size, with its cache buffer (allocated once, and freed when
        another batch size is asked for)."""
        if batch not in self._steps:
            self._steps.clear()  # free the other size's cache before allocating this one
            if self.interface != "tensorrt" and device_of(self.provider) == "cpu":
                check_available(self.cache_bytes(batch), f"a batch of {batch} (its KV cache)")
            if self.interface == "tensorrt":
                from starcast.runtime.tensorrt.steps import TrtSteps

                engine = self.manifest.path(self.folder, self.graph_file)
                self._steps[batch] = TrtSteps(engine, self.config, batch, self.max_length, self.dtype)
            else:
                device = device_of(self.provider)
                self._steps[batch] = make_steps(
                    self.session, self.interface, self.config, batch, self.max_length, self.dtype, device,
                    cuda_graph=self.cuda_graph,
                )  # fmt: skip
        return self._steps[batch]

    def cache_bytes(self, batch: int) -> int:
        """What the KV cache of `batch` rows takes at most (two sides for concat-cache graphs), zeroing included."""
        c = self.config
        per_token = c.n_layer * 2 * (1 if c.multi_query else c.n_head) * (c.n_embd // c.n_head)
        sides = 1 if self.interface == io.STATIC_CACHE else 2
        return 2 * sides * batch * self.max_length * per_token * self.dtype.itemsize

    def validate(self, input_ids: Any, attention_mask: Any, max_new_tokens: Any) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = check_prompt_batch(input_ids, attention_mask, self.config.vocab_size)
        check_whole_number("max_new_tokens", max_new_tokens)
        if max_new_tokens < 1:
            raise InvalidValue(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if ids.shape[1] + max_new_tokens > self.max_length:
            raise InvalidValue(
                f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the maximum "
                f"length {self.max_length}: the cache would overflow"
            )
        return ids, mask

    def eos_for(self, eos_token_id: Any) -> tuple[int, ...]:
        if eos_token_id == -1:
            return self.eos_token_ids
        if eos_token_id is None:
            return ()
        check_whole_number("eos_token_id", eos_token_id)
        if not 0 <= eos_token_id < self.config.vocab_size:
            last = self.config.vocab_size - 1
            raise InvalidValue(f"eos_token_id {eos_token_id} is outside the vocabulary (0..{last})")
        return (int(eos_token_id),)

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
        eos = self.eos_for(eos_token_id)
        choose = TokenChooser(SamplingOptions(**sampling))
        with self._turn:
            try:
                yield from self.run_steps(ids, mask, max_new_tokens, eos, choose)
            except RuntimeError as exc:  # ONNX Runtime's errors; those with a cause a user can act on: one line
                failure = ort_failure(exc)
                if failure is None:
                    raise
                raise failure from None

    def run_steps(
        self, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, eos: tuple[int, ...], choose: TokenChooser
    ) -> Iterator[np.ndarray]:
        steps = self.steps(ids.shape[0])
        history = ids
        finished = np.zeros(ids.shape[0], dtype=bool)
        logits = steps.prefill(ids, mask)
        for step in range(max_new_tokens):
            next_ids = choose(logits, history)
            if eos:
                next_ids = np.where(finished, eos[0], next_ids)
                finished |= np.isin(next_ids, eos)
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
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise InvalidType("prompts must be a list of str")
        tokenizer = self.require_tokenizer()
        encoded = [tokenizer.encode(p) for p in prompts]
        if not encoded or any(not e for e in encoded):
            raise InvalidValue("a prompt is empty")
        width = max(map(len, encoded))
        ids = np.zeros((len(encoded), width), np.int64)
        mask = np.zeros((len(encoded), width), np.int64)
        for row, tokens in enumerate(encoded):
            ids[row, width - len(tokens) :] = tokens
            mask[row, width - len(tokens) :] = 1
        return ids, mask

    def stream(
        self, prompt: str, max_new_tokens: int = 64, stop_strings: list[str] | str | None = None, **options: Any
    ) -> Iterator[str]:
        """Yield text pieces as they are decoded; the text ends before the first stop string."""
        tokenizer = self.require_tokenizer()
        ids, mask = self.encode_batch([prompt])
        stops, decoder = StopStrings(stop_strings), StreamDecoder(tokenizer)
        text, released = "", 0
        for next_ids in self.token_steps(ids, mask, max_new_tokens, **options):
            if int(next_ids[0]) in self.eos_token_ids:
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
        self, prompt: str, max_new_tokens: int = 64, stop_strings: list[str] | str | None = None, **options: Any
    ) -> str:
        return "".join(self.stream(prompt, max_new_tokens, stop_strings, **options))

    def generate_texts(
        self, prompts: list[str], max_new_tokens: int = 64, stop_strings: list[str] | str | None = None, **options: Any
    ) -> list[str]:
        """A batch of prompts of different lengths (left-padded); each continuation ends before a stop string."""
        tokenizer = self.require_tokenizer()
        ids, mask = self.encode_batch(prompts)
        out = self.generate(ids, mask, max_new_tokens, **options)[:, ids.shape[1] :]
        stops, texts = StopStrings(stop_strings), []
        for row in out:
            tokens = list(row)
            end = next((i for i, t in enumerate(tokens) if t in self.eos_token_ids), len(tokens))
            text = tokenizer.decode(tokens[:end])
            texts.append(text[: stops.find(text)])
        return texts

    def fill_in_the_middle(self, prefix: str, suffix: str, max_new_tokens: int = 64, **options: Any) -> str:
        return self.generate_text(self.require_tokenizer().fim_prompt(prefix, suffix), max_new_tokens, **options)


def check_export_files(folder: Path, manifest: Manifest) -> None:
    """Cheap checks at load time (`starcast check` re-hashes everything): files present, config as recorded."""
    for name in manifest.files:
        path = manifest.path(folder, name)
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "is missing (the export is incomplete)"
            raise UserError(f"{folder}: {name} {what}")
    config_path = manifest.path(folder, "config.json")
    if manifest.source != "optimum" and config_path.is_file():
        from starcast.contract.config import GPTBigCodeConfig

        if GPTBigCodeConfig.from_file(config_path) != manifest.config:
            raise UserError(f"{folder}: config.json does not match the config recorded in starcast.json")
    check_position_table(folder, manifest)
