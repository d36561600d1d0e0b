"""Named model shapes (``PRESETS``), and the ``[model]`` table reader that starts from one.

GPT-2's four sizes and Llama-style models for training; modern open models (Mixtral, DeepSeek-V2
and V3, Jamba) at their published shapes, to build on the meta device and count; and the tiny
CPU models of the learning path. A ``[model]`` table may name a preset and override its keys
(:func:`config_from_section`).
"""

from __future__ import annotations

import warnings

from scratchlm.models.block import KIND_TABLES
from scratchlm.models.blocks.attention import LEGACY_KEYS, move_legacy_keys
from scratchlm.models.config import GPTConfig, expand_layers

PRESETS: dict[str, dict] = {
    # GPT-2 family (Radford et al. 2019): learned positions, LayerNorm, GELU-tanh, biases, tied.
    **{
        name: dict(
            vocab_size=50257,
            block_size=1024,
            n_layer=L,
            n_head=H,
            d_model=C,
            position="learned",
            norm="layernorm",
            mlp="gelu_tanh",
            bias=True,
            tie_embeddings=True,
            norm_eps=1e-5,
        )
        for name, (L, H, C) in {
            "gpt2": (12, 12, 768),
            "gpt2-medium": (24, 16, 1024),
            "gpt2-large": (36, 20, 1280),
            "gpt2-xl": (48, 25, 1600),
        }.items()
    },
    # Llama-style: RMSNorm, SwiGLU, RoPE, GQA, no biases.
    "llama-tiny": dict(
        vocab_size=32000,
        block_size=2048,
        n_layer=8,
        n_head=8,
        n_kv_head=2,
        d_model=512,
        d_ff=1408,
        position="rope",
        norm="rmsnorm",
        norm_eps=1e-6,
        mlp="swiglu",
        bias=False,
        tie_embeddings=False,
    ),
    "llama3-1b": dict(
        vocab_size=128256,
        block_size=8192,
        n_layer=16,
        n_head=32,
        n_kv_head=8,
        d_model=2048,
        d_ff=8192,
        position="rope",
        rope_theta=500000.0,
        norm="rmsnorm",
        norm_eps=1e-5,
        mlp="swiglu",
        bias=False,
        tie_embeddings=True,
    ),
    # Modern open models at their published shapes (build them on the meta device: `scratchlm
    # model info --preset deepseek-v3` counts 671B parameters without allocating any).
    "mixtral-8x7b": dict(
        vocab_size=32000,
        block_size=32768,
        n_layer=32,
        n_head=32,
        n_kv_head=8,
        d_model=4096,
        d_ff=14336,
        position="rope",
        rope_theta=1e6,
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        tie_embeddings=False,
        layers=["attention+moe"],
        moe=dict(n_experts=8, top_k=2),
    ),
    **{
        name: dict(
            vocab_size=vocab,
            block_size=4096,
            n_layer=L,
            n_head=H,
            d_model=C,
            d_ff=F,
            position="rope",
            norm="rmsnorm",
            norm_eps=1e-6,
            mlp="swiglu",
            bias=False,
            tie_embeddings=False,
            layers=["mla"] * dense + ["mla+moe"] * (L - dense),
            mla=dict(
                q_lora_rank=q_rank,
                kv_lora_rank=512,
                qk_nope_head_dim=128,
                qk_rope_head_dim=64,
                v_head_dim=128,
            ),
            moe=moe,
            **extra,
        )
        for name, (vocab, L, H, C, F, dense, q_rank, moe, extra) in {
            "deepseek-v2-lite": (
                102400,
                27,
                16,
                2048,
                10944,
                1,
                None,
                dict(n_experts=64, top_k=6, d_expert=1408, n_shared=2, d_shared=2816, normalize=False),
                {},
            ),
            "deepseek-v2": (
                102400,
                60,
                128,
                5120,
                12288,
                1,
                1536,
                dict(
                    n_experts=160,
                    top_k=6,
                    d_expert=1536,
                    n_shared=2,
                    d_shared=3072,
                    normalize=False,
                    n_groups=8,
                    topk_groups=3,
                    routed_scale=16.0,
                ),
                {},
            ),
            "deepseek-v3": (
                129280,
                61,
                128,
                7168,
                18432,
                3,
                1536,
                dict(
                    n_experts=256,
                    top_k=8,
                    d_expert=2048,
                    n_shared=1,
                    d_shared=2048,
                    router="sigmoid",
                    n_groups=8,
                    topk_groups=4,
                    group_score="top2",
                    routed_scale=2.5,
                    balance="bias",
                    seq_aux_weight=1e-4,
                ),
                dict(mtp=dict(depth=1)),
            ),
        }.items()
    },
    # Jamba v0.1: Mamba layers, attention (no positions) every 8th layer at offset 4, MoE every 2nd.
    "jamba-v0.1": dict(
        vocab_size=65536,
        block_size=4096,
        n_layer=32,
        n_head=32,
        n_kv_head=8,
        d_model=4096,
        d_ff=14336,
        position="none",
        norm="rmsnorm",
        norm_eps=1e-6,
        mlp="swiglu",
        bias=False,
        tie_embeddings=False,
        layers=["mamba", "mamba+moe", "mamba", "mamba+moe", "attention", "mamba+moe", "mamba", "mamba+moe"],
        mamba=dict(d_state=16, d_conv=4, expand=2, dt_rank=256, dt_bc_norm=True),
        moe=dict(n_experts=16, top_k=2, normalize=False),
    ),
    # Tiny CPU models for character-level Shakespeare.
    "nanogpt-cpu": dict(
        vocab_size=65,
        block_size=64,
        n_layer=4,
        n_head=4,
        d_model=128,
        position="learned",
        norm="layernorm",
        mlp="gelu",
        bias=False,
        tie_embeddings=True,
    ),
    "shakespeare-char": dict(
        vocab_size=65,
        block_size=64,
        n_layer=4,
        n_head=4,
        d_model=128,
        position="rope",
        norm="rmsnorm",
        mlp="relu2",
        bias=False,
        tie_embeddings=True,
    ),
}


def preset(name: str, **overrides) -> GPTConfig:
    """A preset's config with ``overrides`` (the attention settings' old keyword names still work,
    with a notice)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    overrides, legacy = move_legacy_keys(overrides)
    _warn_legacy(legacy, stacklevel=3)
    return GPTConfig(**{**PRESETS[name], **overrides})


def _warn_legacy(legacy: list[str], stacklevel: int) -> None:
    if legacy:
        moves = ", ".join(f"model.{key} -> model.attn.{LEGACY_KEYS[key]}" for key in legacy)
        warnings.warn(
            f"deprecated [model] keys, now in the [model.attn] table: {moves}",
            FutureWarning,
            stacklevel=stacklevel,
        )


def config_from_section(section: dict) -> GPTConfig:
    """A ``[model]`` table: an optional ``preset``, then the table's keys over the preset's. A block
    kind's own table (``[model.moe]``, ``--set model.moe.top_k=4``) updates the preset's table key
    by key rather than replacing it. The attention settings' old top-level spellings
    (``sliding_window``, ``d_head``, ``qkv_bias``, ``qk_norm``, ``attn_scale``, ``attn_softcap``)
    still work, with a notice naming their keys in ``[model.attn]``."""
    section, legacy = move_legacy_keys(dict(section))
    _warn_legacy(legacy, stacklevel=3)
    name = section.pop("preset", None)
    merged = preset(name).to_dict() if name else {}
    for key, value in section.items():
        both_tables = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both_tables else value
    if name and "layers" in section:  # a new pattern: the preset's settings for kinds it no longer uses go
        pattern = expand_layers(merged.get("layers"), merged.get("n_layer", GPTConfig.n_layer))
        used = {kind for pair in pattern for kind in pair}
        for kind, (table, _) in KIND_TABLES.items():
            if kind not in used and table not in section:
                merged.pop(table, None)
        if "sliding" not in used and "window" not in section.get("attn", {}) and merged.get("attn"):
            merged["attn"] = {**merged["attn"], "window": None}
    return GPTConfig.from_dict(merged)
