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

from scratchlm.tokenizers.chat import ChatTemplate


def load_chat_model(path: str | Path, tokenizer_spec: str | None = None, device=None):
    """(model, chat tokenizer) of a checkpoint, in eval mode; a base checkpoint without the chat
    tokens gets them, with fresh embedding rows, as SFT would start it."""
    from scratchlm.device import pick_device
    from scratchlm.models.checkpoint import load_checkpoint_tokenizer, load_model_from_checkpoint
    from scratchlm.tokenizers.chat import add_chat_tokens

    model, state = load_model_from_checkpoint(path, pick_device(device))
    plain = load_checkpoint_tokenizer(path, state, tokenizer_spec)
    tokenizer = add_chat_tokens(plain)
    model.grow_vocab(
        max(model.config.vocab_size, tokenizer.vocab_size),
        known=min(plain.vocab_size, model.config.vocab_size),
    )
    return model.eval(), tokenizer


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
    from scratchlm.serve import LLM, SamplingParams

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
    finally:
        model.train(was_training)
    failed = [o for o in outs if o.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"the engine could not finish a reply: {failed[0].error}")
    return [
        {
            "text": o.text,
            "ended": bool(o.token_ids) and o.token_ids[-1] == template.end_id,
            "prompt_ids": o.prompt_token_ids,
            "token_ids": o.token_ids,
        }
        for o in outs
    ]
