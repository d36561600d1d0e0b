"""Encoding throughput (MB/s): reference encoder, fast path, tiktoken, HF, and corpus-to-shards.

    python benchmarks/encode.py

* reference: our pure-Python encoder, one core, chunk cache cold (and warm, a second pass);
* fast path: our tokenizer with its tiktoken backend, which must equal tiktoken built from the
  same ranks (checked: same ids);
* corpus-to-shards: `tokenize_dataset` over every split of a prepared dataset, on all cores.

Corpora: tinyshakespeare (GPT-2's tokenizer) and ~5 MB of the stdlib (a BPE of 8192 trained on it).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from common import best_of, save, stdlib_corpus


def measure(name: str, tok, text: str, repeats: int = 3) -> dict:
    import tiktoken

    n = len(text.encode())
    tok.backend = "python"
    tok._cache.clear()
    import time

    start = time.perf_counter()
    reference_ids = tok.encode_ordinary(text)
    cold = time.perf_counter() - start
    warm = best_of(lambda: tok.encode_ordinary(text), 1)
    tok.backend = "tiktoken"
    fast = best_of(lambda: tok.encode_ordinary(text), repeats)
    peer = tiktoken.Encoding(
        "peer", pat_str=tok.pattern, mergeable_ranks=tok.ranks, special_tokens=tok.special_tokens
    )
    peer_s = best_of(lambda: peer.encode_ordinary(text), repeats)
    assert tok.encode_ordinary(text) == reference_ids == peer.encode_ordinary(text), "encoders disagree"
    return {
        "corpus": name,
        "bytes": n,
        "tokens": len(reference_ids),
        "reference_cold_MBps": n / cold / 1e6,
        "reference_warm_MBps": n / warm / 1e6,
        "fast_path_MBps": n / fast / 1e6,
        "tiktoken_MBps": n / peer_s / 1e6,
        "fast_vs_tiktoken": peer_s / fast,
    }


def main() -> None:
    from scratchlm.data import prepare_dataset, tokenize_dataset
    from scratchlm.downloads import fetch
    from scratchlm.tokenizers import gpt2_tokenizer, train_bpe

    rows = []
    gpt2 = gpt2_tokenizer()
    rows.append(measure("tinyshakespeare / GPT-2", gpt2, fetch("shakespeare").read_text()))
    docs = stdlib_corpus()
    stdlib_bpe = train_bpe(docs, 8192, "gpt2")
    rows.append(measure("stdlib 5MB / BPE-8192", stdlib_bpe, "".join(docs)))

    with tempfile.TemporaryDirectory() as tmp:
        ds, _ = prepare_dataset("stdlib", Path(tmp) / "stdlib", max_bytes=5_000_000, errors="replace")
        tok_path = stdlib_bpe.save(Path(tmp) / "bpe.json")
        shards = {}
        for workers in (1, os.cpu_count() or 1):
            summary = tokenize_dataset(ds, tok_path, Path(tmp) / f"shards{workers}", num_workers=workers)
            seconds = sum(e["seconds"] for e in summary["splits"].values())
            n = sum(e["bytes"] for e in summary["splits"].values())
            shards[workers] = n / seconds / 1e6
    result = {"rows": rows, "shards_MBps": {str(k): v for k, v in shards.items()}}
    path = save("encode", result)
    print(
        f"{'corpus':<26} {'ref cold':>9} {'ref warm':>9} {'fast':>8} {'tiktoken':>9} {'fast/tt':>8}   (MB/s)"
    )
    for r in rows:
        print(
            f"{r['corpus']:<26} {r['reference_cold_MBps']:>9.2f} {r['reference_warm_MBps']:>9.2f} "
            f"{r['fast_path_MBps']:>8.2f} {r['tiktoken_MBps']:>9.2f} {r['fast_vs_tiktoken']:>8.2f}"
        )
    print(
        "corpus-to-shards (stdlib 5MB, BPE-8192): "
        + ", ".join(f"{k} worker(s) {v:.2f} MB/s" for k, v in shards.items())
    )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
