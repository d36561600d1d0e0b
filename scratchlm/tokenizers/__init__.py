"""Tokenizers written from scratch: character, byte, and byte-level BPE, behind one interface."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from scratchlm.io import FormatError, read_json
from scratchlm.tokenizers.base import (
    DEFAULT_SPECIAL_TOKENS,
    ENDOFTEXT,
    TOKENIZER_FORMAT,
    TOKENIZER_VERSION,
    Tokenizer,
)
from scratchlm.tokenizers.bpe import BPETokenizer
from scratchlm.tokenizers.bpe_train import train_bpe
from scratchlm.tokenizers.byte import ByteTokenizer
from scratchlm.tokenizers.char import CharTokenizer

KINDS = ("char", "byte", "bpe")


def train_tokenizer(
    kind: str,
    texts: Iterable[str],
    *,
    vocab_size: int | None = None,
    pattern: str = "gpt2",
    special_tokens: Iterable[str] | None = None,
    unknown: str = "error",
    progress: bool = False,
) -> Tokenizer:
    """Train (or, for ``byte``, just build) a tokenizer of the given kind on ``texts``.

    ``special_tokens=None`` means :data:`DEFAULT_SPECIAL_TOKENS` (``<|endoftext|>``) for every kind;
    pass ``[]`` for none.
    """
    special_tokens = DEFAULT_SPECIAL_TOKENS if special_tokens is None else tuple(special_tokens)
    if kind == "char":
        return CharTokenizer.train(texts, special_tokens, unknown)
    if kind == "byte":
        return ByteTokenizer.train(texts, special_tokens)
    if kind == "bpe":
        if vocab_size is None:
            raise ValueError("a BPE tokenizer needs a vocabulary size (--vocab-size)")
        return train_bpe(texts, vocab_size, pattern, special_tokens, progress=progress)
    raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load any tokenizer saved by :meth:`Tokenizer.save` (the ``type`` field picks the class)."""
    d = read_json(path, TOKENIZER_FORMAT, (TOKENIZER_VERSION,))
    classes = {c.kind: c for c in (CharTokenizer, ByteTokenizer, BPETokenizer)}
    if d.get("type") not in classes:
        raise FormatError(f"{path}: tokenizer type {d.get('type')!r} is not one of {sorted(classes)}")
    try:
        return classes[d["type"]]._from_definition(d)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, FormatError):
            raise FormatError(f"{path}: {e}") from None
        raise FormatError(
            f"{path}: corrupt {d['type']} tokenizer definition ({type(e).__name__}: {e}); retrain or re-save it"
        ) from None


def gpt2_tokenizer(download: bool = True) -> BPETokenizer:
    """GPT-2's tokenizer from OpenAI's original files (fetched and checksum-verified)."""
    from scratchlm.downloads import fetch

    return BPETokenizer.from_gpt2_files(fetch("gpt2-encoder", download), fetch("gpt2-vocab", download))


def resolve_tokenizer_path(spec: str | Path) -> Path:
    """A tokenizer JSON path, or ``gpt2`` for GPT-2's tokenizer (built once from OpenAI's files
    into the cache folder)."""
    if str(spec) == "gpt2":
        from scratchlm.downloads import cache_dir

        path = cache_dir() / "gpt2-tokenizer.json"
        if not path.exists():
            gpt2_tokenizer().save(path)
        return path
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer file {str(spec)!r} does not exist (train one with "
            "`scratchlm tokenizer train`, or use 'gpt2')"
        )
    return path


__all__ = [
    "DEFAULT_SPECIAL_TOKENS",
    "ENDOFTEXT",
    "KINDS",
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "Tokenizer",
    "gpt2_tokenizer",
    "load_tokenizer",
    "resolve_tokenizer_path",
    "train_bpe",
    "train_tokenizer",
]
