"""Fit, evaluate and sample the bigram baselines on a prepared dataset (``scratchlm bigram``)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from scratchlm.data import Dataset
from scratchlm.device import pick_device
from scratchlm.models.bigram import CountBigram, NeuralBigram, bigram_pairs, sample_bigram
from scratchlm.tokenizers.base import Tokenizer


def run_bigram(
    dataset: str | Path, tokenizer: Tokenizer, *, models=("count", "neural"), smoothing: float = 1.0,
    fit_split: str = "train", steps: int = 300, lr: float = 0.3, n_samples: int = 10, max_tokens: int = 60,
    seed: int = 0, progress: bool = False, device: str | None = None,
) -> dict:
    """Fit the requested bigram models; report NLL and perplexity per split, and samples.

    ``fit_split="all"`` fits on every split (the textbook figure: names.txt's count bigram has
    mean NLL 2.4540 over all its bigrams); the default fits on train, so val/test are held out.
    """
    unknown = set(models) - {"count", "neural"}
    if unknown:
        raise ValueError(f"bigram models are 'count' and 'neural', got {sorted(unknown)}")
    ds = Dataset.load(dataset)
    boundary = tokenizer.eot_token
    pairs = {}
    for split in ("train", "val", "test"):
        docs = [tokenizer.encode_ordinary(d) for d in ds.documents(split)]
        pairs[split] = bigram_pairs(docs, boundary)
    pairs["all"] = tuple(np.concatenate([pairs[s][i] for s in ("train", "val", "test")]) for i in (0, 1))
    fit_x, fit_y = pairs[fit_split]
    V = tokenizer.vocab_size
    if V > 20_000:
        raise ValueError(f"a bigram table over {V} ids needs {V * V * 8 / 1e9:.1f} GB; use a tokenizer with a smaller vocabulary")
    start_token = boundary if boundary is not None else int(fit_x[0])
    report = {"dataset": str(dataset), "tokenizer_fingerprint": tokenizer.fingerprint, "vocab_size": V,
              "boundary_token": boundary, "fit_split": fit_split, "pairs": {s: int(len(p[0])) for s, p in pairs.items()},
              "models": {}}
    for name in models:
        start = time.perf_counter()
        if name == "count":
            model = CountBigram(V, smoothing).fit(fit_x, fit_y)
            extra = {"smoothing": smoothing}
        else:
            model = NeuralBigram(V).to(pick_device(device))
            history = model.fit(fit_x, fit_y, steps=steps, lr=lr, seed=seed, progress=progress)
            extra = {"steps": steps, "lr": lr, "final_train_loss": history[-1], "device": str(model.logits.device)}
        seconds = time.perf_counter() - start
        nll = {s: model.nll(*pairs[s]) for s in ("train", "val", "test", "all")}
        samples = sample_bigram(model.log_probs(), n_samples, start=start_token, stop=boundary, max_tokens=max_tokens, seed=seed)
        report["models"][name] = {
            **extra, "fit_seconds": seconds, "nll": nll,
            "perplexity": {s: math.exp(v) if math.isfinite(v) else float("inf") for s, v in nll.items()},
            "samples": [tokenizer.decode(s) for s in samples],
        }
    return report
