"""Chat on top of the engine: a checkpoint as a chat model, and assistant replies to conversations.

The two helpers every chat-shaped caller shares — post-training (RL rollouts, the critique-revise
loop, the held-out exact match), evaluation and the command line: :func:`load_chat_model` (a
checkpoint with the chat template's special tokens, grown as supervised fine-tuning starts it) and
:func:`generate_replies` (batched replies through :class:`~scratchlm.serve.LLM`, ended by
``<|im_end|>``, greedy or seeded). They live beside the engine they drive, below training, so eval
and the server reach them without importing a trainer.
"""

from __future__ import annotations

from pathlib import Path

from scratchlm.tokenizers.chat import ChatTemplate, add_chat_tokens, moved_ids


def load_chat_model(path: str | Path, tokenizer_spec: str | None = None, device=None):
    """(model, chat tokenizer) of a checkpoint, in eval mode; a base checkpoint without the chat
    tokens gets them, with fresh embedding rows, as SFT would start it."""
    from scratchlm.device import pick_device
    from scratchlm.models.checkpoint import load_model_from_checkpoint

    model, state = load_model_from_checkpoint(path, pick_device(device))
    plain, tokenizer = chat_tokenizers(path, state, tokenizer_spec)
    grow_for_chat(model, plain, tokenizer)
    return model.eval(), tokenizer


def chat_tokenizers(checkpoint: str | Path, state: dict, tokenizer_spec: str | None = None):
    """(the tokenizer the checkpoint was trained with, it with the chat tokens). Which tokenizer that
    is — the checkpoint's own, or a ``tokenizer_spec`` (``--tokenizer``) checked against it, a chat
    model's plain tokenizer included — is decided once for every command, by
    :func:`~scratchlm.generate.tokenizer.checkpoint_tokenizer`."""
    from scratchlm.generate.tokenizer import checkpoint_tokenizer

    source = f"--tokenizer {tokenizer_spec}" if tokenizer_spec is not None else None
    trained_with = checkpoint_tokenizer(checkpoint, state, tokenizer_spec, source=source)
    return trained_with, add_chat_tokens(trained_with)


def grow_for_chat(model, plain, tokenizer) -> None:
    """Give ``model`` (trained with ``plain``) the rows of the chat tokenizer ``tokenizer =
    add_chat_tokens(plain)``: fresh rows for its new ids (``GPT.grow_vocab``), and, where a
    character vocabulary grew the template's characters, each special token's trained row moved
    to its new id (:func:`~scratchlm.tokenizers.chat.moved_ids`) and the ids it left get fresh rows.
    Before building an optimizer (the matrices are new parameters)."""
    import torch

    known = min(plain.vocab_size, model.config.vocab_size)
    model.grow_vocab(max(model.config.vocab_size, tokenizer.vocab_size), known=known)
    moves = moved_ids(plain, tokenizer)
    if not moves:
        return
    index = list(range(model.config.vocab_size))
    for old, new in moves.items():
        index[new] = old
    # The ids below `known` that no old token holds now are new (grown characters): they take the
    # fresh rows that the moved tokens left unused above `known`.
    kept = {i for i in range(known) if i not in moves} | set(moves.values())
    fresh_below = [i for i in range(known) if i not in kept]
    spare = [new for new in moves.values() if new >= known]
    for i, row in zip(fresh_below, spare, strict=True):
        index[i] = row
    rows = torch.tensor(index, device=model.tok_emb.weight.device)
    with torch.no_grad():
        model.tok_emb.weight.data = model.tok_emb.weight.data[rows]
        if model.lm_head.weight is not model.tok_emb.weight:
            model.lm_head.weight.data = model.lm_head.weight.data[rows]


def first_new_id(plain, tokenizer) -> int:
    """The first id of ``tokenizer = add_chat_tokens(plain)`` that meant nothing to ``plain``'s model
    (every id from there on is new or moved: what LoRA trains besides its adapters)."""
    moves = moved_ids(plain, tokenizer)
    kept = {i for i in range(plain.vocab_size) if i not in moves} | set(moves.values())
    return min((i for i in range(tokenizer.vocab_size) if i not in kept), default=tokenizer.vocab_size)


def generate_replies(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_tokens: int = 32,
    *,
    temperature: float = 0.0,
    seeds: list[int] | None = None,
    progress: bool = False,
    **engine_options,
) -> list[dict]:
    """Assistant replies, batched through the inference engine — greedy by default, or sampled at
    ``temperature`` with one seed per prompt (a seeded request draws the same tokens alone or in
    any batch, so a run is reproducible). Each reply: ``text``, whether it ended with
    ``<|im_end|>`` (``ended``) rather than running out of tokens, and the ids (``prompt_ids``,
    ``token_ids``). A reply the engine could not finish raises (a training loop must not learn
    from half an answer)."""
    from scratchlm.serve import LLM, RequestFailed, SamplingParams

    if not prompts:
        return []
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    template = ChatTemplate(tokenizer)
    was_training = model.training
    context = model.config.block_size
    if not 0 < max_tokens < context:
        raise ValueError(f"max_tokens must be in (0, {context}) for this model's context, got {max_tokens}")
    ids = [template.prompt_ids(p)[-(context - max_tokens) :] for p in prompts]
    # Only <|im_end|> ends a reply (ignore_eos: a stop on <|endoftext|> must not count as one).
    params = [
        SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            stop_token_ids=[template.end_id],
            ignore_eos=True,
            seed=None if seeds is None else seeds[i],
        )
        for i in range(len(ids))
    ]
    seqs = min(len(ids), 64)  # a KV pool for this batch, not for 64 full contexts on a training GPU
    options = {"max_num_seqs": seqs, "num_blocks": seqs * -(-context // 16), **engine_options}
    try:
        outs = LLM(model, tokenizer, weight_format="dense", **options).generate(
            ids, params, progress=progress
        )
    except RequestFailed as e:
        raise RuntimeError(f"the engine could not finish a reply: {e}") from e
    finally:
        model.train(was_training)
    replies = []
    for o in outs:
        reply = o.outputs[0]
        replies.append(
            {
                "text": reply.text,
                "ended": reply.stop_reason == template.end_id,
                "prompt_ids": o.prompt_token_ids,
                "token_ids": reply.token_ids,
            }
        )
    return replies
