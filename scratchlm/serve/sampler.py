"""Next tokens for a batch of sequences, each with its own sampling parameters.

The processors are the one-request path's own (:mod:`scratchlm.generate.sampling`), applied with
each sequence's settings. Rows are processed in groups: plain greedy rows (no repetition penalty)
are decided by one ``argmax``; rows with the same processors (temperature, top-k, top-p, min-p) are
truncated together in one call (a top-p sort over 64 rows at once costs little more than over
one); only rows with a repetition penalty, which depends on each row's own tokens, go one by one.
A seeded sequence draws from its own ``torch.Generator``, so it gives the same tokens alone or
batched with any others; unseeded rows of a group share one ``multinomial`` call.

A row whose logits are NaN or +inf (an overflow), or whose processed probabilities are not a
distribution, does not take the batch down: its sequence gets an error and every other row is
sampled as usual.

Log-probabilities are those of the model's distribution (``log_softmax`` of the raw logits, before
temperature and truncation), as the OpenAI API reports them; they are computed only for requests
that ask for them or rank ``best_of`` choices by them.
"""

from __future__ import annotations

from dataclasses import astuple

import torch

from scratchlm.generate.sampling import choose, process_logits
from scratchlm.serve.sequence import Sequence


def sample(
    logits: torch.Tensor, seqs: list[Sequence]
) -> tuple[list[int | None], list[dict | None], list[str | None]]:
    """(M, V) logits, one row per sequence -> (next token ids, logprob records, errors).

    A row with an error has token ``None`` and its message in ``errors``."""
    logits = logits.float()
    M = len(seqs)
    tokens: list[int | None] = [None] * M
    errors: list[str | None] = [None] * M
    broken = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1).tolist()
    groups: dict[object, list[int]] = {}  # "greedy" | ("alone", row) | the processors' settings -> rows
    configs = {}
    for i, seq in enumerate(seqs):
        p = seq.params
        if broken[i]:
            errors[i] = (
                "the model produced NaN or infinite logits for this request (an overflow: try float32 weights)"
            )
        elif p.repetition_penalty != 1.0:
            groups.setdefault(("alone", i), []).append(i)
        elif p.greedy:
            groups.setdefault("greedy", []).append(i)
        else:
            config = p.processors()
            configs[astuple(config)] = config
            groups.setdefault(astuple(config), []).append(i)
    for key, rows in groups.items():
        index = torch.tensor(rows, device=logits.device)
        if key == "greedy":
            for i, t in zip(rows, logits[index].argmax(dim=-1).tolist()):
                tokens[i] = t
            continue
        try:
            if key[0] == "alone":  # repetition penalty: this row alone, with its own tokens
                i = rows[0]
                seq = seqs[i]
                previous = torch.tensor([seq.output_ids], dtype=torch.long, device=logits.device)
                tokens[i] = int(
                    choose(logits[i : i + 1], seq.params.processors(), previous, _generator(seq, logits))[
                        0, 0
                    ]
                )
                continue
            probs = torch.softmax(process_logits(logits[index], configs[key]), dim=-1)
            ok = (torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)).tolist()
            for j, i in enumerate(rows):
                if not ok[j]:
                    errors[i] = "sampling failed: the processed probabilities are not a distribution"
            free = [j for j, i in enumerate(rows) if seqs[i].generator is None and ok[j]]
            if free:
                picked = torch.multinomial(probs[torch.tensor(free, device=logits.device)], 1)[:, 0].tolist()
                for j, t in zip(free, picked):
                    tokens[rows[j]] = t
            for j, i in enumerate(rows):
                if seqs[i].generator is not None and ok[j]:
                    tokens[i] = int(
                        torch.multinomial(probs[j : j + 1], 1, generator=_generator(seqs[i], logits))[0, 0]
                    )
        except RuntimeError as e:  # e.g. an inf logit made the probabilities NaN
            for i in rows:
                if tokens[i] is None and errors[i] is None:
                    errors[i] = f"sampling failed: {e}"
    records: list[dict | None] = [None] * M
    wanted = [i for i, s in enumerate(seqs) if _wants_logprobs(s.params) and tokens[i] is not None]
    if wanted:
        logprobs = torch.log_softmax(logits[torch.tensor(wanted, device=logits.device)], dim=-1)
        for row, i in enumerate(wanted):
            k = min(seqs[i].params.logprobs or 0, logprobs.shape[-1])
            record = {"token": tokens[i], "logprob": float(logprobs[row, tokens[i]])}
            if k:
                values, ids = logprobs[row].topk(k)
                record["top"] = list(zip(ids.tolist(), values.tolist()))
            records[i] = record
    return tokens, records, errors


def _wants_logprobs(params) -> bool:
    """Logprobs asked for, or needed to rank ``best_of`` choices by cumulative log-probability."""
    return params.logprobs is not None or params.num_choices > params.n


def _generator(seq: Sequence, logits: torch.Tensor) -> torch.Generator | None:
    """A seeded sequence's generator, on the logits' device (made there on first use)."""
    generator = seq.generator
    if generator is not None and generator.device != logits.device:
        seq.generator = generator = torch.Generator(device=logits.device).manual_seed(seq.seed)
    return generator
