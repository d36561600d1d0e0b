"""BPE vs byte vs character: what a vocabulary buys and what it costs, measured on one corpus.

Every tokenizer is trained on the train split and measured on held-out text (the val split):

* **bytes per token**: how much text one token carries. More bytes per token means shorter
  sequences: more text fits in the context window and each training step sees more text.
* **total tokens**: the same fact as a length: the sequence the model must process.
* **embedding parameters**: ``vocab_size x d_model`` for the input table (and as many again for
  an untied output layer): what the larger vocabulary costs in the model.

A character vocabulary is tiny but gives ~1 byte per token; bytes never meet an unknown symbol
but are the longest sequences; BPE buys shorter sequences with a larger embedding table.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from scratchlm.tokenizers import train_tokenizer


def compare_tokenizers(
    train_texts: Sequence[str],
    eval_texts: Sequence[str],
    *,
    bpe_vocab_sizes: Sequence[int] = (512, 1024, 2048, 4096),
    pattern: str = "gpt2",
    d_model: int = 384,
    progress: bool = False,
) -> list[dict]:
    """Train char, byte and BPE (one per vocabulary size) tokenizers; measure them on ``eval_texts``."""
    eval_bytes = sum(len(t.encode("utf-8")) for t in eval_texts)
    specs = [("char", None), ("byte", None)] + [("bpe", v) for v in sorted(bpe_vocab_sizes)]
    rows = []
    for kind, vocab_size in specs:
        start = time.perf_counter()
        tokenizer = train_tokenizer(
            kind,
            train_texts,
            vocab_size=vocab_size,
            pattern=pattern,
            unknown="replace" if kind == "char" else "error",
            progress=progress,
        )
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        ids = [i for text in eval_texts for i in tokenizer.encode_ordinary(text)]
        encode_seconds = time.perf_counter() - start
        unk = tokenizer.special_tokens.get("<|unk|>")
        rows.append(
            {
                "tokenizer": kind if kind != "bpe" else f"bpe-{vocab_size}",
                "kind": kind,
                "vocab_size": tokenizer.vocab_size,
                "eval_bytes": eval_bytes,
                "tokens": len(ids),
                "bytes_per_token": eval_bytes / max(len(ids), 1),
                "unknown_tokens": sum(i == unk for i in ids) if unk is not None else 0,
                "embedding_params": tokenizer.vocab_size * d_model,
                "embedding_params_untied": 2 * tokenizer.vocab_size * d_model,
                "d_model": d_model,
                "train_seconds": train_seconds,
                "encode_seconds": encode_seconds,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'tokenizer':<11} {'vocab':>6} {'tokens':>9} {'bytes/tok':>9} {'embed params':>13} {'unk':>5}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['tokenizer']:<11} {r['vocab_size']:>6} {r['tokens']:>9,} {r['bytes_per_token']:>9.3f} "
            f"{r['embedding_params']:>13,} {r['unknown_tokens']:>5}"
        )
    return "\n".join(lines)


def plot_comparison(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Bytes per token and embedding parameters against vocabulary size (log scale)."""
    from scratchlm.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    vocab = [r["vocab_size"] for r in rows]
    ax.plot(vocab, [r["bytes_per_token"] for r in rows], "o-", color="tab:blue")
    for r in rows:
        ax.annotate(
            r["tokenizer"],
            (r["vocab_size"], r["bytes_per_token"]),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=8,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("vocabulary size")
    ax.set_ylabel("bytes per token (held-out text)", color="tab:blue")
    twin = ax.twinx()
    twin.plot(vocab, [r["embedding_params"] / 1e6 for r in rows], "s--", color="tab:red")
    twin.set_ylabel(f"embedding parameters, millions (d_model={rows[0]['d_model']})", color="tab:red")
    ax.set_title(title or "BPE vs byte vs character")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
