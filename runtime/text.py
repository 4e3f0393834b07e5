"""Text in and out: the export's `tokenizer.json`, incremental detokenization, stop strings, fill-in-the-middle."""

from __future__ import annotations

from pathlib import Path

from starcast.contract.errors import InvalidType, InvalidValue, UserError
from starcast.contract.paths import JSON_LIMIT, confine, read_bytes

TOKENIZER_FILE = "tokenizer.json"
# StarCoder's spelling, then SantaCoder's: (prefix, suffix, middle).
FIM_SPELLINGS = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"))


class Tokenizer:
    """A thin layer over the `tokenizers` library's Tokenizer, read from the export folder."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        data = read_bytes(path, JSON_LIMIT)
        try:
            self.inner = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # tokenizers raises Exception with serde's message
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"{path}: not a valid tokenizer.json ({first})") from None

    @classmethod
    def from_export(cls, folder: Path) -> Tokenizer | None:
        path = confine(folder, TOKENIZER_FILE, str(folder))
        return cls(path) if path.is_file() else None

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InvalidType(f"text must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidValue("the text is not valid UTF-8 (it holds undecodable bytes)") from None
        return self.inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.inner.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def largest_id(self) -> int:
        """The largest id the tokenizer can produce (added and special tokens included)."""
        return max(self.inner.get_vocab(with_added_tokens=True).values(), default=-1)

    def token_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)

    def fim_tokens(self) -> tuple[str, str, str]:
        """The tokenizer's fill-in-the-middle tokens, in whichever spelling it has."""
        for spelling in FIM_SPELLINGS:
            if all(self.token_id(token) is not None for token in spelling):
                return spelling
        raise UserError(
            "this tokenizer has no fill-in-the-middle tokens (neither <fim_prefix>/<fim_suffix>/<fim_middle> nor "
            "<fim-prefix>/<fim-suffix>/<fim-middle>)"
        )

    def fim_prompt(self, prefix: str, suffix: str) -> str:
        """The prefix-suffix-middle prompt (StarCoder's and SantaCoder's PSM order); the model writes the middle."""
        start, hole, middle = self.fim_tokens()
        return f"{start}{prefix}{hole}{suffix}{middle}"


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

    def __init__(self, stops: str | list[str] | tuple[str, ...] | None):
        if isinstance(stops, str):
            stops = [stops]  # one stop string, as OpenAI's `stop` accepts
        if stops is not None and not (isinstance(stops, (list, tuple)) and all(isinstance(s, str) for s in stops)):
            raise InvalidType("stop strings must be str or a list of str")
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
