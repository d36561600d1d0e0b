"""BPE training time, ours vs Hugging Face `tokenizers`, same corpus, pattern and vocabulary.

    python benchmarks/bpe_train.py [--vocab-size 8192] [--max-bytes 5000000]

Corpus: the first ~5 MB of this Python's standard library (sorted .py files), as documents.
Both trainers use GPT-2's pre-tokenization pattern and no special tokens; the script also checks
that both learned the same merges in the same order.
"""

from __future__ import annotations

import argparse
import json

from common import best_of, save, stdlib_corpus


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-bytes", type=int, default=5_000_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from scratchlm.tokenizers import train_bpe
    from scratchlm.tokenizers.bpe import token_to_str

    docs = stdlib_corpus(args.max_bytes)
    n_bytes = sum(len(d.encode()) for d in docs)
    ours = {}

    def run_ours():
        ours["tok"] = train_bpe(docs, args.vocab_size, "gpt2", special_tokens=())

    hf = {}

    def run_hf():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        trainer = trainers.BpeTrainer(
            vocab_size=args.vocab_size,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(docs, trainer=trainer)
        hf["tok"] = tok

    ours_s = best_of(run_ours, args.repeats)
    hf_s = best_of(run_hf, args.repeats)
    hf_merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
        for m in json.loads(hf["tok"].to_str())["model"]["merges"]
    ]
    our_merges = [
        (token_to_str(ours["tok"].vocab[a]), token_to_str(ours["tok"].vocab[b]))
        for a, b in ours["tok"].merges
    ]
    same = sum(a == b for a, b in zip(our_merges, hf_merges))
    result = {
        "corpus": "stdlib",
        "corpus_bytes": n_bytes,
        "documents": len(docs),
        "vocab_size": args.vocab_size,
        "scratchlm_seconds": ours_s,
        "huggingface_seconds": hf_s,
        "ratio": ours_s / hf_s,
        "merges": len(our_merges),
        "identical_merges": same,
    }
    path = save("bpe_train", result)
    print(
        f"BPE training, vocab {args.vocab_size}, {n_bytes / 1e6:.2f} MB of stdlib ({len(docs)} files), best of {args.repeats}"
    )
    print(f"  scratchlm      {ours_s:6.2f} s")
    print(f"  HF tokenizers  {hf_s:6.2f} s")
    print(f"  ratio          {ours_s / hf_s:6.2f}x   (identical merges: {same}/{len(our_merges)})")
    print(f"  -> {path}")


if __name__ == "__main__":
    main()
