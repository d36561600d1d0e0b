"""Byte-level tokenizer: every UTF-8 byte is a token (ids 0-255), plus optional special tokens.

No training, no unknown tokens, any text at all: the price is long sequences (one id per byte,
so about 1 byte per token on English and 2-4 on many other scripts).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from scratchlm.tokenizers.base import Tokenizer, default_special_tokens


class ByteTokenizer(Tokenizer):
    kind = "byte"

    def __init__(self, special_tokens: dict[str, int] | None = None):
        super().__init__(special_tokens)
        self._check_special_ids(256)

    @classmethod
    def train(cls, texts: Iterable[str] | str = (), special_tokens: Iterable[str] = ()) -> ByteTokenizer:
        """Nothing to learn; the signature matches the other tokenizers."""
        return cls(default_special_tokens(256, special_tokens))

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _decode_ordinary(self, ids: Sequence[int]) -> bytes:
        return bytes(ids)

    def _definition(self) -> dict:
        return {}

    @classmethod
    def _from_definition(cls, d: dict) -> ByteTokenizer:
        return cls(d["special_tokens"])
