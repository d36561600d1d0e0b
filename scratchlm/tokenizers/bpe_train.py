"""Training a byte-level BPE vocabulary: the incremental algorithm.

The textbook loop (count every adjacent pair in the corpus, merge the most frequent, recount) costs
a full pass over the corpus per merge. Three observations make it fast:

1. **Count each distinct chunk once.** Merges never cross pre-tokenization chunks, so the corpus
   is just a multiset of chunks: "the" occurring 50,000 times is one word with weight 50,000.
2. **Index pair -> words.** ``where[pair]`` is the set of distinct words that contain ``pair``;
   a merge only rewrites those words and only adjusts the counts of pairs inside them.
3. **Lazy max-heap.** Counts sit in a heap as ``(-count, pair)``. Counts of old pairs only go
   down after a merge, so a popped entry whose count is out of date is pushed back with its true
   count; only the new pairs (those containing the new token) are pushed after each merge.

Tie-break (deterministic, documented): among pairs with the highest count, the pair with the
smallest ``(left_id, right_id)`` wins. With ids 0-255 in GPT-2's byte order (see
:mod:`~scratchlm.tokenizers.bpe`) this is exactly the rule of Hugging Face ``tokenizers``' BPE
trainer, so on the same chunks both learn the same merges in the same order.

Special tokens are added after training: they are never part of the text that is counted, so
they can never be merged.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import regex

from scratchlm.tokenizers.base import DEFAULT_SPECIAL_TOKENS, default_special_tokens
from scratchlm.tokenizers.bpe import BASE_VOCAB, BYTE_TO_ID, BPETokenizer
from scratchlm.tokenizers.patterns import compile_pattern, resolve_pattern

PARALLEL_MIN_CHARS = 2_000_000  # below this, starting worker processes costs more than it saves


def _count_chunks(pattern: str, texts: Sequence[str]) -> Counter:
    findall = compile_pattern(pattern).findall
    counts: Counter = Counter()
    for text in texts:
        counts.update(findall(text))
    return counts


def count_chunks(texts: Iterable[str], pattern: str, num_workers: int | None = None) -> Counter:
    """Pre-tokenize ``texts`` and count each distinct chunk, on every core for a large corpus."""
    texts = list(texts)
    total = sum(len(t) for t in texts)
    workers = min(num_workers or os.cpu_count() or 1, len(texts))
    if workers <= 1 or total < PARALLEL_MIN_CHARS:
        return _count_chunks(pattern, texts)
    # Deal texts out so every worker gets about the same number of characters.
    groups: list[list[str]] = [[] for _ in range(workers)]
    sizes = [0] * workers
    for text in sorted(texts, key=len, reverse=True):
        k = sizes.index(min(sizes))
        groups[k].append(text)
        sizes[k] += len(text)
    from concurrent.futures import ProcessPoolExecutor

    counts: Counter = Counter()
    with ProcessPoolExecutor(workers) as pool:
        for part in pool.map(_count_chunks, [pattern] * workers, groups):
            counts.update(part)
    return counts


def train_bpe(
    texts: Iterable[str] | str,
    vocab_size: int,
    pattern: str = "gpt2",
    special_tokens: Iterable[str] | None = None,
    num_workers: int | None = None,
    progress: bool = False,
) -> BPETokenizer:
    """Learn a byte-level BPE vocabulary of ``vocab_size`` ids (256 bytes + merges + specials).

    ``texts`` are separate documents: chunks never span two of them. Training stops early (with
    a smaller vocabulary) if the corpus runs out of pairs to merge.
    """
    if isinstance(texts, str):
        texts = [texts]
    special_tokens = list(dict.fromkeys(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens))
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens plus "
            f"{len(special_tokens)} special token(s); ask for at least {256 + len(special_tokens)}"
        )
    pattern = resolve_pattern(pattern)
    if special_tokens:
        # Text that spells a special token is cut there, so its spelling is never learned as merges.
        splitter = regex.compile(
            "|".join(regex.escape(s) for s in sorted(special_tokens, key=len, reverse=True))
        )
        texts = [piece for text in texts for piece in splitter.split(text)]
    counts = count_chunks(texts, pattern, num_workers)

    # Words: distinct chunks of two or more bytes, as lists of base ids, with their counts.
    words: list[list[int]] = []
    freqs: list[int] = []
    for chunk, count in counts.items():
        encoded = chunk.encode("utf-8").translate(BYTE_TO_ID)
        if len(encoded) > 1:
            words.append(list(encoded))
            freqs.append(count)

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    vocab = list(BASE_VOCAB)
    merges: list[tuple[int, int]] = []
    bar = _progress(n_merges, progress)
    while len(merges) < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count <= 0:
            continue
        if count != -neg_count:  # out of date: push back with the true count
            heapq.heappush(heap, (-count, pair))
            continue
        a, b = pair
        new_id = len(vocab)
        token = vocab[a] + vocab[b]
        vocab.append(token)
        merges.append(pair)
        new_pairs = set()
        for w in where.pop(pair):
            word, freq = words[w], freqs[w]
            # Rewrite the word left to right. At each (a, b) only the pairs next to it change:
            # (left, a) becomes (left, new) and (b, right) becomes (new, right). Working on the
            # output as it grows makes back-to-back occurrences come out right: in "a b a b"
            # the step (b, a) -> (new, a) is followed by (new, a) -> (new, new).
            out: list[int] = []
            i, n = 0, len(word)
            while i < n:
                if word[i] == a and i + 1 < n and word[i + 1] == b:
                    if out:
                        left = out[-1]
                        pair_counts[left, a] -= freq
                        p = (left, new_id)
                        pair_counts[p] += freq
                        new_pairs.add(p)
                        where[p].add(w)
                    if i + 2 < n:
                        right = word[i + 2]
                        pair_counts[b, right] -= freq
                        p = (new_id, right)
                        pair_counts[p] += freq
                        new_pairs.add(p)
                        where[p].add(w)
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[w] = out  # (a word the lazy index still lists without the pair comes out unchanged)
        del pair_counts[pair]
        for p in new_pairs:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
        bar.update(1)
    bar.close()
    _check_unique(vocab)
    return BPETokenizer(vocab, merges, pattern, default_special_tokens(len(vocab), special_tokens))


def _check_unique(vocab: list[bytes]) -> None:
    """A rank table needs one id per byte string.

    In principle two different merges could spell the same bytes (``ab + c`` and ``a + bc``);
    Hugging Face then reuses the old id. Rank-based encoders (tiktoken, ours) cannot represent
    that, so it is refused with a clear message instead of giving silently different ids.
    """
    seen: dict[bytes, int] = {}
    for i, token in enumerate(vocab):
        if token in seen:
            raise RuntimeError(
                f"BPE training made the token {token!r} twice (ids {seen[token]} and {i}) through different "
                "merges; a rank-based tokenizer cannot hold that. Try another vocabulary size or corpus."
            )
        seen[token] = i


class _NoBar:
    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="BPE merges", unit="merge")
