"""Hugging Face interchange for Llama (``LlamaForCausalLM``), and the Llama pieces other families reuse.

Llama keeps q, k, v as three projections; we concatenate them into one fused projection
(:func:`qkv_from_hf`, :func:`qkv_to_hf`). Its RoPE uses the "rotate half" pairing (dimension i with
i + D/2), as ours does, so no permutation is needed. Everything else is a rename: :data:`NAMES`.

Mistral, Ministral, the MoE families, DiffLlama and Jamba's attention layers are Llama blocks with
something added; their modules build on :func:`config_from_hf`, :func:`from_hf` and :func:`to_hf`.
"""

from __future__ import annotations

import torch

from scratchlm.models.blocks.attention import AttentionConfig
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.hf.common import cpu_state, inverse, rename, rope_theta

# Hugging Face's tensor names -> ours; ``{}`` is the layer number. q, k, v: see qkv_from_hf.
NAMES = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.norm.weight": "norm_f.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.input_layernorm.weight": "blocks.{}.norm1.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blocks.{}.norm2.weight",
    "model.layers.{}.self_attn.o_proj.weight": "blocks.{}.attn.proj.weight",
    "model.layers.{}.mlp.gate_proj.weight": "blocks.{}.mlp.gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "blocks.{}.mlp.up.weight",
    "model.layers.{}.mlp.down_proj.weight": "blocks.{}.mlp.down.weight",
}


def config_from_hf(hf: dict) -> GPTConfig:
    """Our config for a Llama ``config.json``; the other Llama-block families start from it."""
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("Llama models with attention_bias or mlp_bias are not supported")
    theta = rope_theta(hf)
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    own_width = head_dim * hf["num_attention_heads"] != hf["hidden_size"]  # heads wider or narrower
    return GPTConfig(
        attn=AttentionConfig(head_dim=head_dim if own_width else None),
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"],
        block_size=hf["max_position_embeddings"],
        position="rope",
        rope_theta=theta,
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        bias=False,
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def qkv_from_hf(t: dict, c: GPTConfig) -> dict[str, torch.Tensor]:
    """Our fused ``blocks.{i}.attn.qkv`` weight (and bias, where q, k, v have biases) from Hugging
    Face's ``model.layers.{i}.self_attn.{q,k,v}_proj``, in every layer that has all three."""
    out = {}
    for i in range(c.n_layer):
        prefix = f"model.layers.{i}.self_attn."
        for part in ("weight", "bias"):
            names = [f"{prefix}{p}_proj.{part}" for p in "qkv"]
            if all(name in t for name in names):
                out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([t[name] for name in names], dim=0)
    return out


def qkv_to_hf(sd: dict, c: GPTConfig) -> dict[str, torch.Tensor]:
    """Hugging Face's q, k, v projections from our fused ones: the inverse of :func:`qkv_from_hf`."""
    D, H, Hkv = c.head_dim, c.n_head, c.kv_heads
    out = {}
    for i in range(c.n_layer):
        for part in ("weight", "bias"):
            fused = sd.get(f"blocks.{i}.attn.qkv.{part}")
            if fused is not None:
                parts = fused.split([H * D, Hkv * D, Hkv * D])
                out.update(
                    {
                        f"model.layers.{i}.self_attn.{p}_proj.{part}": w.contiguous()
                        for p, w in zip("qkv", parts)
                    }
                )
    return out


def from_hf(t: dict, c: GPTConfig, names: dict[str, str] = NAMES) -> dict:
    """Their tensors -> our state dict: the renames of ``names``, then q, k, v fused per layer."""
    out = rename(t, names)
    if c.tie_embeddings:
        out.pop("lm_head.weight", None)
    out.update(qkv_from_hf(t, c))
    return out


def to_hf(model: GPT, names: dict[str, str] = NAMES) -> tuple[dict, dict]:
    """Our model -> their tensors and config.json (checks that the model is a Llama)."""
    c = model.config
    if (c.position, c.norm, c.bias, c.mlp, c.prenorm) != ("rope", "rmsnorm", False, "swiglu", True):
        raise ValueError("Llama export needs RoPE, pre-RMSNorm, SwiGLU and no biases")
    sd = cpu_state(model)
    if c.tie_embeddings:
        sd.pop("lm_head.weight")
    tensors = {**rename(sd, inverse(names)), **qkv_to_hf(sd, c)}
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.ff_width,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    return tensors, hf
