"""Next tokens for a batch of sequences, each with its own sampling parameters.

The processors are the one-request path's own (:mod:`scratchlm.generate.sampling`), applied to
each sequence's row with that sequence's settings, and a seeded sequence draws from its own
``torch.Generator``: so a seeded request gives the same tokens alone or batched with any others.
Rows that are plain greedy (no repetition penalty) are decided together with one ``argmax``.

Log-probabilities are those of the model's distribution (``log_softmax`` of the raw logits, before
temperature and truncation), as the OpenAI API reports them.
"""

from __future__ import annotations

import torch

from scratchlm.generate.sampling import choose
from scratchlm.serve.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict | None]]:
    """(M, V) logits, one row per sequence -> (next token ids, logprob records or None)."""
    logits = logits.float()
    tokens = [0] * len(seqs)
    plain = [i for i, s in enumerate(seqs) if s.params.greedy and s.params.repetition_penalty == 1.0]
    plain_set = set(plain)
    if plain:
        index = torch.tensor(plain, device=logits.device)
        for i, t in zip(plain, logits[index].argmax(dim=-1).tolist()):
            tokens[i] = t
    for i, seq in enumerate(seqs):
        if i in plain_set:
            continue
        params = seq.params
        previous = None
        if params.repetition_penalty != 1.0:
            previous = torch.tensor([seq.output_ids], dtype=torch.long, device=logits.device)
        generator = seq.generator
        if generator is not None and generator.device != logits.device:  # first use on this device
            seq.generator = generator = torch.Generator(device=logits.device).manual_seed(params.seed)
        tokens[i] = int(choose(logits[i : i + 1], params.processors(), previous, generator)[0, 0])
    records: list[dict | None] = [None] * len(seqs)
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if wanted:
        logprobs = torch.log_softmax(logits[torch.tensor(wanted, device=logits.device)], dim=-1)
        for row, i in enumerate(wanted):
            k = seqs[i].params.logprobs
            record = {"token": tokens[i], "logprob": float(logprobs[row, tokens[i]])}
            if k:
                values, ids = logprobs[row].topk(k)
                record["top"] = list(zip(ids.tolist(), values.tolist()))
            records[i] = record
    return tokens, records
