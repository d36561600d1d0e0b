"""Hugging Face interchange for Gemma-2: ``Gemma2ForCausalLM``.

Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical Size": Ministral's
alternation of sliding and full layers (``layer_types``, local first) on other blocks, expressed by
the Gemma switches — ``[model.attn]``'s ``head_dim``, ``scale`` (= ``query_pre_attn_scalar^-1/2``)
and ``softcap``; :class:`GPTConfig`'s ``final_softcap``, ``sandwich_norm`` and ``embed_scale`` —
and the ``"geglu"`` MLP. Its RMSNorms multiply by ``1 + w``; ours by ``w``: the
import folds ``w' = 1 + w`` (in float32, as Hugging Face adds the 1 in float32) and the export
unfolds ``w = w' - 1``. The tensor names are Llama's (:data:`NAMES` adds the four norms per layer).
"""

from __future__ import annotations

from scratchlm.models.blocks.attention import AttentionConfig
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.hf import llama
from scratchlm.models.hf.common import cpu_state, inverse, rename, rope_theta, shortest_period
from scratchlm.models.hf.mistral import HF_LAYER_TYPES, OUR_LAYER_TYPES

# Gemma2Config's defaults, for a config.json that leaves a key out (an explicit null turns a cap off).
_GEMMA2_DEFAULTS = {
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "sliding_window": 4096,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")  # GELU's tanh approximation, in two spellings
# Hugging Face's names -> ours: Llama's, with four norms per layer (all RMSNorms of the x·(1 + w) kind).
NAMES = {
    **{k: v for k, v in llama.NAMES.items() if "layernorm" not in k},
    "model.layers.{}.input_layernorm.weight": "blocks.{}.norm1.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blocks.{}.post_norm1.weight",
    "model.layers.{}.pre_feedforward_layernorm.weight": "blocks.{}.norm2.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "blocks.{}.post_norm2.weight",
}


def config_from_hf(hf: dict) -> GPTConfig:
    hf = {**_GEMMA2_DEFAULTS, **hf}
    if hf.get("attention_bias"):
        raise ValueError("Gemma-2 models with attention_bias are not supported")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(
            "Gemma-2 with use_bidirectional_attention is an encoder, not supported (causal only)"
        )
    activation = hf.get("hidden_activation") or hf.get("hidden_act")
    if activation not in _GELU_TANH:
        raise ValueError(
            f"Gemma-2 hidden_activation {activation!r} is not supported (only gelu_pytorch_tanh)"
        )
    theta = rope_theta(hf)
    n_layer, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)
    ]
    unknown = sorted(set(layer_types) - set(OUR_LAYER_TYPES))
    if unknown or len(layer_types) != n_layer:
        raise ValueError(
            f"layer_types must name each of the {n_layer} layers {' or '.join(OUR_LAYER_TYPES)}; got {layer_types}"
        )
    layers = shortest_period([OUR_LAYER_TYPES[t] for t in layer_types])
    sliding = "sliding" in layers
    if sliding and not hf.get("sliding_window"):
        raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
    head_dim, scalar = hf["head_dim"], hf["query_pre_attn_scalar"]
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        n_layer=n_layer,
        n_head=heads,
        n_kv_head=hf.get("num_key_value_heads") or heads,
        d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"],
        block_size=hf["max_position_embeddings"],
        position="rope",
        rope_theta=theta,
        norm="rmsnorm",
        norm_eps=hf["rms_norm_eps"],
        mlp="geglu",
        bias=False,
        tie_embeddings=hf["tie_word_embeddings"],
        layers=None if layers == ["attention"] else layers,
        attn=AttentionConfig(
            window=hf["sliding_window"] if sliding else None,
            head_dim=None if head_dim * heads == hf["hidden_size"] else head_dim,
            scale=None if scalar == head_dim else scalar**-0.5,  # HF's scaling, to the bit
            softcap=hf["attn_logit_softcapping"],
        ),
        final_softcap=hf["final_logit_softcapping"],
        sandwich_norm=True,
        embed_scale=True,
    )


def _is_norm(name: str) -> bool:
    return "norm" in name and not name.endswith(("q_norm.weight", "k_norm.weight"))


def from_hf(t: dict, c: GPTConfig) -> dict:
    """Llama's renames and fused q, k, v; every norm folded, x·(1 + w) = x·w' with w' = 1 + w in float32."""
    out = llama.from_hf(t, c, NAMES)
    return {k: 1.0 + v.float() if _is_norm(k) else v for k, v in out.items()}


def to_hf(model: GPT) -> tuple[dict, dict]:
    c = model.config
    needs = {
        "position": ("rope", c.position),
        "norm": ("rmsnorm", c.norm),
        "mlp": ("geglu", c.mlp),
        "bias": (False, c.bias),
        "prenorm": (True, c.prenorm),
        "sandwich_norm": (True, bool(c.sandwich_norm)),
        "embed_scale": (True, bool(c.embed_scale)),
        "attn.qkv_bias": (False, bool(c.attn.qkv_bias)),
        "attn.qk_norm": (False, bool(c.attn.qk_norm)),
    }
    wrong = [f"{k} = {found!r} (needs {want!r})" for k, (want, found) in needs.items() if want != found]
    if wrong or any(mlp != "dense" or mixer not in HF_LAYER_TYPES for mixer, mlp in c.layer_kinds()):
        raise ValueError(
            "Gemma-2 export needs RoPE, pre- and post-RMSNorms (sandwich_norm), GeGLU, scaled embeddings, "
            "no biases and 'sliding' / 'attention' layers with dense MLPs; "
            + ("; ".join(wrong) or "model.layers has other kinds")
        )
    D, H, Hkv = c.head_dim, c.n_head, c.kv_heads
    scalar = D if c.attn.scale is None else c.attn.scale**-2
    if abs(scalar - round(scalar)) > 1e-6 * scalar:  # Gemma2Config types query_pre_attn_scalar as an int
        raise ValueError(
            f"Gemma-2 stores the score scale as 1/sqrt(query_pre_attn_scalar) with an integer "
            f"query_pre_attn_scalar; model.attn.scale = {c.attn.scale} is 1/sqrt({scalar:g})"
        )
    sd = cpu_state(model)
    if c.tie_embeddings:
        sd.pop("lm_head.weight")
    # every norm unfolded, w = w' - 1, in float32
    tensors = {
        k: (v.float() - 1.0).contiguous() if _is_norm(k) else v for k, v in rename(sd, inverse(NAMES)).items()
    }
    tensors.update(llama.qkv_to_hf(sd, c))
    hf = {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.ff_width,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": H,
        "num_key_value_heads": Hkv,
        "head_dim": D,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "query_pre_attn_scalar": round(scalar),
        "attn_logit_softcapping": c.attn.softcap,
        "final_logit_softcapping": c.final_softcap,
        "sliding_window": c.attn.window,
        "layer_types": [HF_LAYER_TYPES[mixer] for mixer, _ in c.layer_kinds()],
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }  # Gemma's ids belong to its tokenizer
    return tensors, hf


def default_architecture(config: GPTConfig) -> str | None:
    """'gemma2' for a model with Gemma's sandwich norms or scaled embeddings whose layers Gemma-2
    can hold ('sliding' / 'attention' with dense MLPs); None otherwise."""
    kinds = config.layer_kinds()
    if not (config.sandwich_norm or config.embed_scale):
        return None
    mixers = {mixer for mixer, _ in kinds}
    return "gemma2" if mixers <= set(HF_LAYER_TYPES) and all(mlp == "dense" for _, mlp in kinds) else None
