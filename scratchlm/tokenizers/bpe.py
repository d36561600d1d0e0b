"""Byte-level BPE: the tokenizer of GPT-2, GPT-4 and most modern LLMs, encoded from scratch.

A byte-level BPE vocabulary is a list of byte strings. Ids 0-255 are the 256 single bytes (so any
text can be encoded); every later id was made by merging two earlier tokens during training
(:mod:`scratchlm.tokenizers.bpe_train`). The id of a token is also its *rank*: lower ranks were
learned earlier and are merged first.

Encoding ``text``:

1. cut it into chunks with the pre-tokenization regex (:mod:`~scratchlm.tokenizers.patterns`);
2. for each chunk, start from its bytes and repeatedly merge the adjacent pair whose joined
   bytes have the lowest rank, until no adjacent pair is in the vocabulary;
3. the ids are the ranks of the parts left.

Step 2 is :func:`bpe_chunk`: a heap of candidate pairs over a linked list of parts, so a chunk of
n bytes costs O(n log n) even for ``"a" * 100_000`` (the textbook rescan-after-every-merge loop is
O(n^2)). Chunks repeat a lot in real text, so encoded chunks are cached.

This pure-Python encoder is the *reference*. For bulk work the same ranks are handed to
tiktoken (:meth:`BPETokenizer.to_tiktoken`), whose Rust encoder gives the same ids, faster;
the tests hold the two equal.

Ids 0-255 follow GPT-2's byte order (printable bytes ``!`` .. ``~``, ``¡`` .. ``¬``, ``®`` .. ``ÿ``
first, then the rest), not raw byte values: it is the order of GPT-2's and tiktoken's vocabularies
and of Hugging Face's byte-level alphabet, so our ids, merges and tie-breaks line up with theirs.
The JSON file shows tokens in GPT-2's printable byte-to-character form (``Ġthe`` is `` the``).

``normalizer="NFC"`` puts text in Unicode normal form C before step 1 (Qwen2's and Qwen3's
tokenizers do): ``"e\u0301"`` and ``"é"`` then encode alike. Special tokens are cut out first and
never normalized, as Hugging Face does with its non-normalized added tokens.
"""

from __future__ import annotations

import heapq
import json
import os
import unicodedata
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

from scratchlm.io import FormatError
from scratchlm.tokenizers.base import ENDOFTEXT, Tokenizer
from scratchlm.tokenizers.patterns import GPT2_PATTERN, compile_pattern, pattern_name, resolve_pattern


def _gpt2_byte_order() -> tuple[list[int], dict[int, str]]:
    """GPT-2's byte order and its byte -> printable character map.

    Printable Latin-1 bytes stand for themselves; the other 68 (control characters, space, ...)
    are shifted to U+0100 and up so that every byte has a visible, unambiguous character.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    order = printable + [b for b in range(256) if b not in printable]
    to_char = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in printable]
    to_char.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return order, to_char


BYTE_ORDER, BYTE_TO_CHAR = _gpt2_byte_order()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
BYTE_TO_ID = bytes(BYTE_ORDER.index(b) for b in range(256))  # translate table: byte value -> base id
BASE_VOCAB = [bytes([b]) for b in BYTE_ORDER]


def token_to_str(token: bytes) -> str:
    """Bytes -> GPT-2's printable form (``b" the"`` -> ``"Ġthe"``)."""
    return "".join(BYTE_TO_CHAR[b] for b in token)


def str_to_token(s: str) -> bytes:
    try:
        return bytes(CHAR_TO_BYTE[c] for c in s)
    except KeyError as e:
        raise ValueError(f"{s!r} is not in GPT-2's byte-level form (character {e.args[0]!r})") from None


def bpe_chunk(chunk: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Encode one pre-tokenized chunk: merge the lowest-ranked adjacent pair until none is left.

    Parts are a linked list over byte offsets (a part starts at ``s`` and ends at ``nxt[s]``);
    the heap holds candidate pairs ``(rank, left_start, right_start, right_end)``. A merge only
    removes a boundary, so a heap entry is still valid iff both of its parts still start where
    they did and the right part still ends at ``right_end``. Ties in rank only happen between
    equal byte pairs, and the heap then takes the leftmost, as tiktoken does.
    """
    if chunk in ranks:
        return [ranks[chunk]]
    n = len(chunk)
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    alive = [True] * n
    heap = []
    for i in range(n - 1):
        rank = ranks.get(chunk[i : i + 2])
        if rank is not None:
            heap.append((rank, i, i + 1, i + 2))
    heapq.heapify(heap)
    while heap:
        _, s, m, e = heapq.heappop(heap)
        if not (alive[s] and alive[m] and nxt[m] == e):
            continue  # stale: one of the two parts has merged with something else since
        alive[m] = False
        nxt[s] = e
        if e < n:
            prv[e] = s
        p = prv[s]
        if p >= 0 and (rank := ranks.get(chunk[p:e])) is not None:
            heapq.heappush(heap, (rank, p, s, e))
        if e < n and (rank := ranks.get(chunk[s : nxt[e]])) is not None:
            heapq.heappush(heap, (rank, s, e, nxt[e]))
    ids = []
    s = 0
    while s < n:
        ids.append(ranks[chunk[s : nxt[s]]])
        s = nxt[s]
    return ids


NORMALIZERS = (None, "NFC")


class BPETokenizer(Tokenizer):
    """Byte-level BPE with regex pre-tokenization and tiktoken-compatible special tokens.

    ``backend="tiktoken"`` (the default) encodes with tiktoken built from these ranks;
    ``backend="python"`` uses the reference encoder above. Both give the same ids.
    """

    kind = "bpe"
    CACHE_ENTRIES = 200_000

    def __init__(
        self,
        vocab: Sequence[bytes],
        merges: Sequence[tuple[int, int]],
        pattern: str = GPT2_PATTERN,
        special_tokens: dict[str, int] | None = None,
        backend: str = "tiktoken",
        normalizer: str | None = None,
    ):
        super().__init__(special_tokens)
        if normalizer not in NORMALIZERS:
            raise FormatError(f"BPE normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
        self.normalizer = normalizer
        vocab = [bytes(t) for t in vocab]
        if sorted(vocab[:256]) != [bytes([b]) for b in range(256)]:
            raise FormatError("the first 256 BPE tokens must be the 256 single bytes")
        self.vocab = vocab
        self.ranks = {t: i for i, t in enumerate(vocab)}
        if len(self.ranks) != len(vocab):
            raise FormatError("BPE vocabulary has duplicate tokens")
        self._check_special_ids(len(vocab))
        self.merges = [(int(a), int(b)) for a, b in merges]
        for a, b in self.merges:
            if vocab[a] + vocab[b] not in self.ranks:
                raise FormatError(f"merge ({a}, {b}) makes a token that is not in the vocabulary")
        self.pattern = resolve_pattern(pattern)
        self._regex = compile_pattern(self.pattern)
        self._cache: dict[str, list[int]] = {}
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in ("tiktoken", "python"):
            raise ValueError(f"backend must be 'tiktoken' or 'python', got {value!r}")
        self._backend = value

    @property
    def releases_gil(self) -> bool:
        return self._backend == "tiktoken"

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + len(self.special_tokens)

    def encode_ordinary(self, text: str) -> list[int]:
        if self._backend == "tiktoken":
            if self.normalizer:
                text = unicodedata.normalize(self.normalizer, text)
            return self.to_tiktoken().encode_ordinary(text)
        return self.encode_ordinary_reference(text)

    def encode_ordinary_reference(self, text: str) -> list[int]:
        """The pure-Python encoder: regex chunks, cached :func:`bpe_chunk` per distinct chunk."""
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        cache, ranks, ids = self._cache, self.ranks, []
        for chunk in self._regex.findall(text):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = bpe_chunk(chunk.encode("utf-8"), ranks)
                if len(cache) >= self.CACHE_ENTRIES:
                    cache.clear()
                cache[chunk] = chunk_ids
            ids.extend(chunk_ids)
        return ids

    def encode_batch(self, texts: Iterable[str], num_threads: int | None = None, **kwargs) -> list[list[int]]:
        texts = list(texts)
        if self._backend == "python" or len(texts) < 2:
            return super().encode_batch(texts, **kwargs)
        # tiktoken releases the GIL while it encodes, so threads use every core.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(num_threads or os.cpu_count() or 1) as pool:
            return list(pool.map(lambda t: self.encode(t, **kwargs), texts))

    def _decode_ordinary(self, ids: Sequence[int]) -> bytes:
        vocab = self.vocab
        return b"".join(vocab[i] for i in ids)

    @cached_property
    def _tiktoken(self):
        import tiktoken

        return tiktoken.Encoding(
            name=f"scratchlm-bpe-{self.fingerprint[:12]}",
            pat_str=self.pattern,
            mergeable_ranks=self.ranks,
            special_tokens=self.special_tokens,
        )

    def to_tiktoken(self):
        """A ``tiktoken.Encoding`` with exactly these ranks, pattern and special tokens (it does not
        normalize: :meth:`encode_ordinary` does that before handing text to it)."""
        return self._tiktoken

    # --- files ------------------------------------------------------------------------
    def _definition(self) -> dict:
        return {
            "pattern": self.pattern,
            "pattern_name": pattern_name(self.pattern),
            "vocab": [token_to_str(t) for t in self.vocab],
            "merges": [list(m) for m in self.merges],
            **({"normalizer": self.normalizer} if self.normalizer else {}),  # absent: fingerprints unchanged
        }

    @classmethod
    def _from_definition(cls, d: dict) -> BPETokenizer:
        vocab = [str_to_token(s) for s in d["vocab"]]
        merges = [tuple(m) for m in d["merges"]]
        return cls(vocab, merges, d["pattern"], d["special_tokens"], normalizer=d.get("normalizer"))

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> BPETokenizer:
        """Build GPT-2's tokenizer from OpenAI's original ``encoder.json`` and ``vocab.bpe``.

        ``encoder.json`` maps each token (in byte-to-character form) to its id; ``vocab.bpe``
        lists the 50,000 merges in the order they were learned. Merge i must create id 256 + i,
        which is checked, so the ids reproduce GPT-2's exactly.
        """
        encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")
        merge_lines = [ln for ln in lines[1:] if ln.strip()]  # line 0 is "#version: 0.2"
        specials = {s: i for s, i in encoder.items() if s == ENDOFTEXT}
        by_id = sorted((i, s) for s, i in encoder.items() if s not in specials)
        if [i for i, _ in by_id] != list(range(len(by_id))):
            raise FormatError(f"{encoder_json}: ids are not 0..{len(by_id) - 1}")
        vocab = [str_to_token(s) for _, s in by_id]
        merges = []
        for rank, line in enumerate(merge_lines):
            left, right = line.split(" ")
            merges.append((encoder[left], encoder[right]))
            if encoder[left + right] != 256 + rank:
                raise FormatError(f"{vocab_bpe}: merge {rank} ({line!r}) does not create id {256 + rank}")
        return cls(vocab, merges, GPT2_PATTERN, specials)
