"""Preference pairs as training data: what DPO and the reward model share.

Both learn from ``{"prompt", "chosen", "rejected"}`` lines (:func:`~scratchlm.posttrain.data.load_pairs`)
and compare the two replies of one prompt row by row: the data side is one, here —
:func:`render_pair` (prompt + reply, the mask on the final reply), :func:`prepare_pairs` (load,
split the held-out pairs by prompt, render, keep the pairs that fit the context) and
:class:`PairBatches` (random batches of pairs, the B chosen rows first, then the B rejected).
Each method turns a batch of pairs into its own tensors: DPO's summed log-probabilities against
a frozen reference, the reward model's scalar scores.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from scratchlm.posttrain.data import Pair, load_pairs
from scratchlm.tokenizers.chat import ChatTemplate


def render_pair(template: ChatTemplate, pair: Pair) -> tuple[tuple, tuple]:
    """(ids, mask) of prompt + chosen and of prompt + rejected; the mask covers the final reply
    (and its end of turn) only, not any earlier assistant turn of the prompt."""
    prefix = len(template.render(pair.prompt).ids)
    rows = []
    for reply in (pair.chosen, pair.rejected):
        r = template.render(pair.prompt + [{"role": "assistant", "content": reply}])
        rows.append((r.ids, [0] * prefix + r.mask[prefix:]))
    return rows[0], rows[1]


def prepare_pairs(trainer) -> tuple[list, list, list]:
    """(training rows, held-out rows, held-out conversations) of a chat trainer's pairs: each row
    the (chosen, rejected) rendered pair of :func:`render_pair`, the held-out part cut to
    ``eval_windows`` pairs; pairs longer than the context are dropped (with a line in the log),
    one the template refuses raises or, with ``skip_invalid``, is skipped."""
    s = trainer.settings
    if s.packing:
        raise ValueError(f"{s.SECTION}.packing is an SFT option (pairs are compared row by row)")
    # Held out by prompt: every pair of one prompt falls on the same side.
    train, val = trainer._load_items(load_pairs, lambda p: p.prompt)
    context = trainer.model_config.block_size + 1
    fits = lambda rows: max(len(rows[0][0]), len(rows[1][0])) <= context  # noqa: E731

    def render(pairs: list[Pair]):
        for p in pairs:
            try:
                yield render_pair(trainer.template, p)
            except ValueError as e:  # a special token in the text, a character the tokenizer lacks
                trainer._refused(p.where, e)

    train_rows = [r for r in render(train) if fits(r)]
    if len(train_rows) < len(train):
        trainer.log(f"dropped {len(train) - len(train_rows)} pairs longer than the context or refused")
    val = val[: trainer.cfg.eval_windows]
    val_rows = [r for r in render(val) if fits(r)]
    if not train_rows or not val_rows:
        raise ValueError(
            f"no training or no held-out pair fits the context: give {s.SECTION}.val_data, or shorter pairs"
        )
    return train_rows, val_rows, [p.prompt + [{"role": "assistant", "content": p.chosen}] for p in val]


def pair_step_lines(trainer) -> list[str]:
    """The header's account of one optimizer step of a trainer on pairs (``batch_size`` counts pairs)."""
    B, T = trainer.cfg.batch_size, trainer.model_config.block_size
    return [
        f"tokens per step: up to {trainer._per_step(2 * B * T):,} = {B} pairs ({2 * B} sequences) x up to "
        f"{T} tokens (padded to the longest){trainer._per_step_factors()}"
    ]


class PairBatches:
    """Random batches of pairs, ``make_batch(indices)`` turning the drawn pairs' indices into the
    method's tensors. Sampling with replacement from a ``torch.Generator`` (the state a checkpoint
    keeps, for an exact resume); with several processes each takes its own slice of one global draw."""

    def __init__(
        self,
        n_pairs: int,
        batch_size: int,
        seed: int,
        make_batch: Callable[[list[int]], tuple],
        rank=0,
        world_size=1,
    ):
        if not n_pairs:
            raise ValueError("no pairs to train on")
        self.n_pairs, self.batch_size, self.make_batch = n_pairs, batch_size, make_batch
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def get_batch(self):
        picks = torch.randint(self.n_pairs, (self.batch_size * self.world_size,), generator=self.generator)
        return self.make_batch(
            picks[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
        )
