"""Hugging Face interchange for GPT-2 (``GPT2LMHeadModel``, Radford et al. 2019).

GPT-2 stores its linear layers as ``Conv1D`` with weights ``(in, out)``; ours are ``(out, in)``,
so the weights in :data:`TRANSPOSED` are transposed on the way in and out. Its q, k, v projections
are already fused (``c_attn``), like ours: everything else is a rename, :data:`NAMES`.
"""

from __future__ import annotations

from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.hf.common import cpu_state, inverse, rename

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


def _transposed(tensors: dict) -> dict:
    """Conv1D's (in, out) <-> our (out, in), for the weights in TRANSPOSED (whichever side named)."""
    return {k: v.T.contiguous() if k.endswith(TRANSPOSED) or _is_conv1d(k) else v for k, v in tensors.items()}


def _is_conv1d(name: str) -> bool:
    return name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))


def from_hf(t: dict, c: GPTConfig) -> dict:
    out = _transposed(rename({k.removeprefix("transformer."): v for k, v in t.items()}, NAMES))
    if c.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def to_hf(model: GPT) -> tuple[dict, dict]:
    c = model.config
    if (c.position, c.norm, c.bias, c.mlp, c.prenorm, c.kv_heads) != (
        "learned",
        "layernorm",
        True,
        c.mlp,
        True,
        c.n_head,
    ) or c.mlp not in ("gelu", "gelu_tanh"):
        raise ValueError(
            "GPT-2 export needs learned positions, pre-LayerNorm with biases, GELU, and full MHA"
        )
    sd = cpu_state(model)
    if c.tie_embeddings:
        sd.pop("lm_head.weight")
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
    return tensors, hf
