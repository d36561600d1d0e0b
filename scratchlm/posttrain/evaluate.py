"""Exact match: how often a chat model's greedy reply to a verifiable prompt is the answer.

The measure every post-training method reports on held-out prompts with known answers
(:class:`~scratchlm.posttrain.data.PromptWithAnswer`): SFT and DPO before and after, RL's
evaluation, the benchmarks. It sits at the post-training level because it reads that data's
verifier; evaluation code imports it from here.
"""

from __future__ import annotations

from pathlib import Path

from scratchlm.serve.chat import generate_replies, load_chat_model


def exact_match(model, tokenizer, prompts, max_tokens: int = 32) -> dict:
    """Fraction of :class:`~scratchlm.posttrain.data.PromptWithAnswer` answered exactly, and the
    fraction of replies that end with the end-of-turn token."""
    replies = generate_replies(model, tokenizer, [p.prompt for p in prompts], max_tokens)
    correct = [p.reward(r["text"]) for p, r in zip(prompts, replies)]
    return {
        "exact_match": sum(correct) / len(prompts),
        "ended_with_end_of_turn": sum(r["ended"] for r in replies) / len(prompts),
        "n": len(prompts),
    }


def exact_match_before_after(
    base: str | Path,
    tuned: str | Path,
    prompts_path: str | Path,
    base_tokenizer: str | None = None,
    device: str | None = None,
) -> dict:
    """Exact match of the base and the fine-tuned checkpoint on the same held-out prompts (greedy),
    on ``device`` (None: the best one here)."""
    from scratchlm.posttrain.data import load_prompts

    prompts = load_prompts(prompts_path).items
    out = {}
    for name, path in (("before", base), ("after", tuned)):
        # the base gets fresh rows for the chat tokens (as the fine-tuning started from)
        model, tokenizer = load_chat_model(path, base_tokenizer if name == "before" else None, device=device)
        out[name] = exact_match(model, tokenizer, prompts)
    return out
