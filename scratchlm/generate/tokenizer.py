"""Which tokenizer a checkpoint generates with, checked against the model before any work.

A checkpoint's tokenizer is the one it carries (``tokenizer.json`` in its folder) or the one its
training data was tokenized with; a user may name another (``--tokenizer``). Ids mean nothing
under another vocabulary: sampling gives garbage, or an index error halfway through. So the
tokenizer is checked once, up front, by :func:`~scratchlm.tokenizers.base.check_model_tokenizer`:
the fingerprint the checkpoint recorded, and the model's embedding rows.
"""

from __future__ import annotations

from pathlib import Path

from scratchlm.models.checkpoint import load_checkpoint_tokenizer
from scratchlm.tokenizers.base import Tokenizer, check_model_tokenizer


def checkpoint_tokenizer(
    checkpoint: str | Path, state: dict, tokenizer: Tokenizer | str | Path | None = None
):
    """The tokenizer to generate with: ``tokenizer`` (an object, a JSON path or ``"gpt2"``) if
    given, else the checkpoint's own; refused unless it is the model's."""
    if isinstance(tokenizer, Tokenizer):
        source = "the tokenizer given"
    else:
        source = str(tokenizer) if tokenizer is not None else f"the tokenizer of {checkpoint}"
        tokenizer = load_checkpoint_tokenizer(checkpoint, state, tokenizer)
    check_model_tokenizer(
        tokenizer,
        rows=state["model"]["vocab_size"],
        fingerprint=state.get("tokenizer_fingerprint"),
        model=str(checkpoint),
        source=source,
        fix="leave the tokenizer out (no --tokenizer) to use the checkpoint's own, or give the one it was "
        "trained with (the tokenizer.json beside its training shards)",
    )
    return tokenizer
