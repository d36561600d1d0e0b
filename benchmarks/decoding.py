"""Decoding strategies measured on a trained model: greedy, beam, temperature, top-k, top-p, min-p.

    python benchmarks/decoding.py --checkpoint runs/quickstart/gpt/best

For each strategy, ``--samples`` continuations of ``--tokens`` tokens are drawn from the same
prompts (lines from the val split). Reported per strategy:

* distinct-n: unique n-grams / all n-grams over the samples (diversity; 1.0 = no repeats);
* real words: the share of generated words that occur in the training text (a cheap
  fluency check for a character model);
* NLL: the model's own mean negative log-likelihood of what it generated (how "safe" the
  choices were; greedy and beam minimize it, high temperature raises it).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from common import save

STRATEGIES = [
    ("greedy", dict(temperature=0)),
    ("beam 4", dict(beam=4)),
    ("temperature 0.5", dict(temperature=0.5)),
    ("temperature 0.8", dict(temperature=0.8)),
    ("temperature 1.0", dict(temperature=1.0)),
    ("temperature 1.3", dict(temperature=1.3)),
    ("top-k 5", dict(temperature=1.0, top_k=5)),
    ("top-k 20", dict(temperature=1.0, top_k=20)),
    ("top-p 0.5", dict(temperature=1.0, top_p=0.5)),
    ("top-p 0.9", dict(temperature=1.0, top_p=0.9)),
    ("min-p 0.1", dict(temperature=1.0, min_p=0.1)),
]


def distinct(seqs, n):
    grams = [tuple(s[i : i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def main() -> None:
    import torch

    from scratchlm.generate import SamplingConfig, beam_search, generate
    from scratchlm.models.checkpoint import load_model_from_checkpoint
    from scratchlm.tokenizers import load_tokenizer

    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--tokens", type=int, default=200)
    args = p.parse_args()
    model, state = load_model_from_checkpoint(args.checkpoint)
    data = Path(state["train"]["data"])
    tokenizer = load_tokenizer(data / "tokenizer.json")
    from scratchlm.data import Dataset

    dataset = Dataset.load(Path(json.loads((data / "shards.json").read_text())["dataset"]))
    vocabulary = set(re.findall(r"[a-z]+", dataset.text("train").lower()))
    lines = [ln for ln in dataset.text("val").split("\n") if len(ln) > 20][: args.samples]
    prompts = [tokenizer.encode(ln[:20]) for ln in lines]
    rows = []
    for name, settings in STRATEGIES:
        outs = []
        for i, prompt in enumerate(prompts):
            if "beam" in settings:
                outs.append(beam_search(model, prompt, args.tokens, settings["beam"])[0][0])
            else:
                outs.append(generate(model, prompt, args.tokens, SamplingConfig(**settings), seed=i)[0])
        with torch.no_grad():
            nll = []
            for prompt, out in zip(prompts, outs):
                seq = torch.tensor([prompt + out])[:, -model.config.block_size - 1 :]
                logits, _ = model(seq[:, :-1])
                lp = torch.log_softmax(logits, -1).gather(-1, seq[:, 1:, None])[0, -len(out) :, 0]
                nll.append(-lp.mean().item())
        words = [w for out in outs for w in re.findall(r"[a-z]+", tokenizer.decode(out).lower())]
        rows.append(
            {
                "strategy": name,
                "settings": settings,
                "distinct_1": distinct(outs, 1),
                "distinct_2": distinct(outs, 2),
                "distinct_4": distinct(outs, 4),
                "real_words": sum(w in vocabulary for w in words) / max(len(words), 1),
                "model_nll": sum(nll) / len(nll),
                "example": tokenizer.decode(prompts[0] + outs[0])[:160],
            }
        )
        r = rows[-1]
        print(
            f"{name:<16} distinct-2 {r['distinct_2']:.3f}  distinct-4 {r['distinct_4']:.3f}  real words "
            f"{r['real_words']:.1%}  model NLL {r['model_nll']:.3f}",
            flush=True,
        )
    path = save(
        "decoding",
        {"checkpoint": args.checkpoint, "samples": args.samples, "tokens": args.tokens, "rows": rows},
    )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
