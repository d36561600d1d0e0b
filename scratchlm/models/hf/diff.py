"""Hugging Face interchange for differential attention: ``DiffLlamaForCausalLM``.

DiffLlama is Llama with every attention replaced by differential attention V1
(:mod:`scratchlm.models.blocks.diff_attention`), so its config and tensors are Llama's plus four λ
vectors per layer (``self_attn.lambda_q1/k1/q2/k2``): :data:`NAMES`. It pairs query head ``i`` with head
``i + n/2`` and key/value head ``j`` with ``j + n_kv/2`` — our ``layout = "halves"`` — so importing
needs no permutation; a model stored in the official code's ``"adjacent"`` layout is permuted
back to halves on export. Differential attention V2 has no Hugging Face class: exporting it is
refused.
"""

from __future__ import annotations

import dataclasses

from scratchlm.models.blocks.diff_attention import DiffConfig, permute_heads
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.hf import llama

# Hugging Face's names -> ours: Llama's, and the four λ vectors of each layer.
NAMES = {
    **llama.NAMES,
    **{
        f"model.layers.{{}}.self_attn.{name}": f"blocks.{{}}.attn.{name}"
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
    },
}


def config_from_hf(hf: dict) -> GPTConfig:
    if hf.get("attention_dropout"):
        raise ValueError(
            "DiffLlama with attention_dropout > 0 is not supported (transformers refuses it too)"
        )
    base = llama.config_from_hf(hf)  # the Llama checks: no biases, default RoPE, head_dim × heads = hidden
    if base.n_head % 2 or base.kv_heads % 2:
        raise ValueError(
            f"DiffLlama pairs heads: num_attention_heads = {base.n_head} and num_key_value_heads = "
            f"{base.kv_heads} must both be even"
        )
    return dataclasses.replace(
        base,
        layers=["diff"],
        diff=DiffConfig(version=1, layout="halves", lambda_std=hf.get("lambda_std_dev") or 0.1),
    )


def from_hf(t: dict, c: GPTConfig) -> dict:
    return llama.from_hf(t, c, NAMES)


def problems(c: GPTConfig) -> list[str]:
    """What of ``c`` DiffLlama cannot hold, one line per property."""
    found = llama.block_problems(c, "diffllama", ("diff",))
    if c.diff is not None and c.diff.version != 1:
        found.append(
            f"model.diff.version = {c.diff.version} (diffllama needs differential attention V1; "
            "V2 has no Hugging Face class)"
        )
    return found


def to_hf(model: GPT) -> tuple[dict, dict]:
    c = model.config
    found = problems(c)
    if found:
        raise ValueError("diffllama export cannot hold this model: " + "; ".join(found))
    if c.diff.layout != "halves":  # DiffLlama reads halves: reorder the heads, then export that model
        halves = GPT(dataclasses.replace(c, diff=dataclasses.replace(c.diff, layout="halves")))
        halves.load_state_dict(permute_heads(model.state_dict(), c, "halves"))
        model = halves
    tensors, hf = llama.to_hf(model, NAMES)
    hf.update(
        {
            "architectures": ["DiffLlamaForCausalLM"],
            "model_type": "diffllama",
            "lambda_std_dev": c.diff.lambda_std,
            "attention_dropout": 0.0,
        }
    )
    hf.pop("mlp_bias", None)  # a Llama field DiffLlama does not have
    return tensors, hf


def default_architecture(config: GPTConfig) -> str | None:
    """A model with differential-attention layers exports as DiffLlama (or explains why not)."""
    return "diffllama" if any(mixer == "diff" for mixer, _ in config.layer_kinds()) else None
