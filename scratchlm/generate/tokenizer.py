"""Which tokenizer a checkpoint generates with, checked against the model before any work.

A checkpoint's tokenizer is the one it carries (``tokenizer.json`` in its folder) or the one its
training data was tokenized with; a user may name another (``--tokenizer``). Ids mean nothing
under another vocabulary: sampling gives garbage, or an index error halfway through. So the
tokenizer is checked once, up front, by :func:`checkpoint_tokenizer` — the one decision that
``sample``, ``generate``, the engine and the chat helpers (:func:`~scratchlm.serve.chat.chat_tokenizers`)
all make the same way:

* the tokenizer the checkpoint recorded (its fingerprint) is accepted as it is;
* the *plain* tokenizer of a chat model — the one its base was trained with, before supervised
  fine-tuning added the chat template's tokens — is accepted too, and grown the same way
  (:func:`~scratchlm.tokenizers.chat.add_chat_tokens`): the grown tokenizer is what the model was
  trained with (a character vocabulary may also have grown the template's characters, moving its
  special tokens' ids: only the grown tokenizer has them where the model does);
* anything else is refused by :func:`~scratchlm.tokenizers.base.check_model_tokenizer`, with a fix
  that holds for this checkpoint (:func:`where_its_tokenizer_is`).
"""

from __future__ import annotations

from pathlib import Path

from scratchlm.models.checkpoint import load_checkpoint_tokenizer
from scratchlm.tokenizers.base import Tokenizer, check_model_tokenizer
from scratchlm.tokenizers.chat import add_chat_tokens


def checkpoint_tokenizer(
    checkpoint: str | Path,
    state: dict,
    tokenizer: Tokenizer | str | Path | None = None,
    *,
    source: str | None = None,
    fix: str | None = None,
) -> Tokenizer:
    """The tokenizer to generate with: ``tokenizer`` (an object, a JSON path or ``"gpt2"``) if
    given, else the checkpoint's own; the plain tokenizer of a chat model becomes its chat
    tokenizer; refused unless it is the model's. ``source`` names the tokenizer in the refusal and
    ``fix`` says what to do instead (default: :func:`where_its_tokenizer_is`)."""
    if isinstance(tokenizer, Tokenizer):
        source = source or "the tokenizer given"
    else:
        source = source or (str(tokenizer) if tokenizer is not None else f"the tokenizer of {checkpoint}")
        tokenizer = load_checkpoint_tokenizer(checkpoint, state, tokenizer)
    recorded = state.get("tokenizer_fingerprint")
    if recorded and tokenizer.fingerprint != recorded:
        grown = add_chat_tokens(tokenizer)
        if grown.fingerprint == recorded:  # a chat model's base tokenizer: it was trained with the grown one
            return grown
    check_model_tokenizer(
        tokenizer,
        rows=state["model"]["vocab_size"],
        fingerprint=recorded,
        model=str(checkpoint),
        source=source,
        fix=fix or where_its_tokenizer_is(checkpoint, state),
    )
    return tokenizer


def where_its_tokenizer_is(checkpoint: str | Path, state: dict) -> str:
    """What to do instead of a refused tokenizer, true for this checkpoint: leave the tokenizer out
    where the checkpoint carries its own or its training data's still exists, else pass the right one."""
    if (Path(checkpoint) / "tokenizer.json").is_file():
        return f"leave the tokenizer out (no --tokenizer): {checkpoint} carries the tokenizer it was trained with"
    data = (state.get("train") or {}).get("data")
    if data and (Path(data) / "tokenizer.json").is_file():
        return (
            "leave the tokenizer out (no --tokenizer) to use the one it was trained with, "
            f"{Path(data) / 'tokenizer.json'}"
        )
    recorded = state.get("tokenizer_fingerprint")
    if not recorded:
        return "pass the tokenizer the model was imported with"
    return f"pass the tokenizer it was trained with (fingerprint {recorded[:12]})"
