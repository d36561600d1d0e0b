"""Pathological inputs encode in linear (n log n) time, with both encoders and all patterns.

The inputs grow 16x (10,000 -> 160,000 bytes, one chunk each). Linear time then grows 16x (n log
n a little more); quadratic grows 256x. The test takes the best of three CPU timings and allows up
to 64x — a log-log slope of 1.5, halfway between the two — so a machine twice as fast or slow, or a
busy neighbour, moves the ratio nowhere near either side of the bound.
"""

from __future__ import annotations

import time

import pytest

from scratchlm.tokenizers import train_bpe

CASES = {
    "letters": lambda n: "a" * n,
    "spaces": lambda n: " " * n,
    "newlines": lambda n: "\n" * n,
    "space-then-letter": lambda n: " " * n + "x",
    "digits": lambda n: "7" * n,
    "pair": lambda n: "ab" * (n // 2),
    "emoji": lambda n: "🤖" * (n // 4),
    "punctuation": lambda n: "!?" * (n // 2),
}


def _best_time(fn, repeats=3):
    # CPU time of this process, best of several: robust to other tests running beside it.
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


@pytest.fixture(scope="module")
def tokenizers(shakespeare_text):
    # Teach merges of long runs ("aaaa", "    ") so the chunk encoder has real work to do.
    corpus = shakespeare_text[:100_000] + "".join(make(64) + "\n" for make in CASES.values()) * 50
    return {p: train_bpe(corpus, 700, p) for p in ("gpt2", "cl100k", "o200k")}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("pattern", ["gpt2", "cl100k", "o200k"])
def test_linear_time(tokenizers, pattern, case):
    tok = tokenizers[pattern]
    small, large = CASES[case](10_000), CASES[case](160_000)

    def encode(text):
        tok._cache.clear()  # measure the merge algorithm, not the cache
        return tok.encode_ordinary_reference(text)

    assert tok.decode(encode(large)) == large
    assert encode(large) == tok.to_tiktoken().encode_ordinary(large)
    ratio = _best_time(lambda: encode(large)) / max(_best_time(lambda: encode(small)), 1e-4)
    assert ratio < 64, f"{case}: 16x the input took {ratio:.1f}x the time (linear ~16x, quadratic ~256x)"
