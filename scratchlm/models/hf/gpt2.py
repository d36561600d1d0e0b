"""Hugging Face interchange for GPT-2 (``GPT2LMHeadModel``, Radford et al. 2019).

GPT-2 stores its linear layers as ``Conv1D`` with weights ``(in, out)``; ours are ``(out, in)``,
so the weights in :data:`TRANSPOSED` are transposed on the way in and out. Its q, k, v projections
are already fused (``c_attn``), like ours: everything else is a rename, :data:`NAMES`.

GPT-2 always has biases; a model without them (nanoGPT's CPU recipe, ``nanogpt-cpu``) exports with
every bias zero, which computes exactly the same, and a folder whose biases are all zero imports
back as a model without biases (:func:`settle_config`). Its ``activation_function`` is ``gelu_new``
(our ``gelu_tanh``) or ``gelu`` (exact GELU, our ``gelu``).
"""

from __future__ import annotations

import dataclasses

import torch

from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.hf.common import cpu_state, inverse, rename, renamed

# Hugging Face's tensor names (after the ``transformer.`` prefix) -> ours; ``{}`` is the layer number.
NAMES = {
    "wte.weight": "tok_emb.weight",
    "wpe.weight": "pos_emb.weight",
    "ln_f.weight": "norm_f.weight",
    "ln_f.bias": "norm_f.bias",
    "lm_head.weight": "lm_head.weight",
    **{
        f"h.{{}}.{theirs}.{part}": f"blocks.{{}}.{ours}.{part}"
        for theirs, ours in (
            ("ln_1", "norm1"),
            ("ln_2", "norm2"),
            ("attn.c_attn", "attn.qkv"),
            ("attn.c_proj", "attn.proj"),
            ("mlp.c_fc", "mlp.up"),
            ("mlp.c_proj", "mlp.down"),
        )
        for part in ("weight", "bias")
    },
}
# Our weights that GPT-2 stores transposed, as Conv1D: (in, out).
TRANSPOSED = ("attn.qkv.weight", "attn.proj.weight", "mlp.up.weight", "mlp.down.weight")


def config_from_hf(hf: dict) -> GPTConfig:
    activation = hf.get("activation_function", "gelu_new")
    mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu2"}.get(
        activation
    )
    if mlp is None or activation == "relu":
        raise ValueError(f"GPT-2 activation {activation!r} is not supported")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        d_model=hf["n_embd"],
        d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
        block_size=hf["n_positions"],
        position="learned",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp=mlp,
        bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def settle_config(c: GPTConfig, t: dict) -> GPTConfig:
    """What the weights decide: biases that are all zero are no biases (an export of a model
    without them), so the import gives back that model, not one with zero biases to train."""
    biases = [v for k, v in t.items() if k.endswith(".bias") and not k.endswith(("attn.bias", "masked_bias"))]
    if biases and all(not b.any() for b in biases):
        return dataclasses.replace(c, bias=False)
    return c


def _transposed(tensors: dict) -> dict:
    """Conv1D's (in, out) <-> our (out, in), for the weights in TRANSPOSED (whichever side named)."""
    return {k: v.T.contiguous() if k.endswith(TRANSPOSED) or _is_conv1d(k) else v for k, v in tensors.items()}


def _is_conv1d(name: str) -> bool:
    return name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))


def from_hf(t: dict, c: GPTConfig) -> dict:
    out = _transposed(rename({k.removeprefix("transformer."): v for k, v in t.items()}, NAMES))
    if c.tie_embeddings:
        out.pop("lm_head.weight", None)
    if not c.bias:  # all zero (settle_config): a model without biases
        out = {k: v for k, v in out.items() if not k.endswith(".bias")}
    return out


def problems(c: GPTConfig) -> list[str]:
    """What of ``c`` GPT-2 cannot hold, one line per property."""
    found = []
    if c.position != "learned":
        found.append(f"model.position = {c.position!r} (gpt2 needs 'learned')")
    if c.norm != "layernorm":
        found.append(f"model.norm = {c.norm!r} (gpt2 needs 'layernorm')")
    if not c.prenorm:
        found.append("model.prenorm = false (gpt2 needs pre-norm blocks)")
    if c.mlp not in ("gelu", "gelu_tanh"):
        found.append(f"model.mlp = {c.mlp!r} (gpt2 needs 'gelu' or 'gelu_tanh')")
    if c.kv_heads != c.n_head:
        found.append(
            f"model.n_kv_head = {c.n_kv_head} (gpt2 needs full multi-head attention: n_kv_head = n_head)"
        )
    if any(kind != ("attention", "dense") for kind in c.layer_kinds()):
        found.append(f"model.layers = {c.layers} (gpt2 needs every layer 'attention' with a dense MLP)")
    return found


def to_hf(model: GPT) -> tuple[dict, dict]:
    c = model.config
    found = problems(c)
    if found:
        raise ValueError("gpt2 export cannot hold this model: " + "; ".join(found))
    sd = cpu_state(model)
    if c.tie_embeddings:
        sd.pop("lm_head.weight")
    if not c.bias:  # GPT-2 always has biases: zeros compute what none do
        for key, weight in list(sd.items()):
            bias = key.removesuffix("weight") + "bias"
            if key.endswith(".weight") and renamed(bias, inverse(NAMES)) and bias not in sd:
                sd[bias] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    theirs = _transposed(rename(sd, inverse(NAMES)))
    tensors = {k if k == "lm_head.weight" else "transformer." + k: v for k, v in theirs.items()}
    hf = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.d_model,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.ff_width,
        "activation_function": "gelu_new" if c.mlp == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }
    if c.vocab_size <= 50256:  # GPT2Config's end of text (50256) is not in this vocabulary
        hf.update({"bos_token_id": None, "eos_token_id": None})
    return tensors, hf
