"""Text in and out: the export's `tokenizer.json`, incremental detokenization, stop strings, fill-in-the-middle."""

from __future__ import annotations

from pathlib import Path

from starcast.errors import UserError

FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


class Tokenizer:
    """A thin layer over the `tokenizers` library's Tokenizer, read from the export folder."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.inner = HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise UserError(f"{path}: cannot read tokenizer ({str(exc).splitlines()[0]})") from None

    @classmethod
    def from_export(cls, folder: Path) -> Tokenizer | None:
        path = folder / "tokenizer.json"
        return cls(path) if path.is_file() else None

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.inner.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)

    def fim_prompt(self, prefix: str, suffix: str) -> str:
        """StarCoder's prefix-suffix-middle prompt; the model then writes the middle."""
        missing = [t for t in FIM_TOKENS if self.token_id(t) is None]
        if missing:
            raise UserError(f"this tokenizer has no fill-in-the-middle tokens ({', '.join(missing)} missing)")
        return f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character or a BPE merge.

    Byte-level BPE tokens can hold part of a multi-byte character, and how a token renders can depend on its
    neighbours; so the text is re-decoded from a few tokens back and a piece is released only once it no
    longer ends in the replacement character.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window that is re-decoded
        self.read_offset = 0  # end of what has been released

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        released = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        current = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(current) > len(released) and not current.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return current[len(released) :]
        return ""

    def flush(self) -> str:
        released = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        current = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return current[len(released) :]


class StopStrings:
    """Watches generated text for stop strings; reports where the text must end (before the stop string)."""

    def __init__(self, stops: list[str] | tuple[str, ...] | None):
        self.stops = [s for s in (stops or []) if s]
        self.longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str) -> int | None:
        """Index in `text` where the earliest stop string starts, or None."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def safe_length(self, text: str) -> int:
        """How much of `text` can be released while streaming without risking a stop string's beginning."""
        if not self.stops:
            return len(text)
        for keep in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-keep:]
            if any(s.startswith(tail) for s in self.stops):
                return len(text) - keep
        return len(text)
