"""Hugging Face interchange for sliding-window attention: Mistral, Ministral and Gemma-2 (issue 9).

Both are Llama blocks (RMSNorm, SwiGLU, RoPE, GQA, no biases, the same tensor names) with a
sliding window, so the tensors go through :mod:`scratchlm.models.hf`'s Llama renamers and only the
config differs:

* ``MistralForCausalLM``: ``sliding_window = W`` applies to every layer (our ``layers =
  ["sliding"]``); ``sliding_window = None`` is plain causal attention (our default layers).
* ``MinistralForCausalLM``: ``layer_types`` names each layer ``"sliding_attention"`` or
  ``"full_attention"`` — the alternating local/global pattern of Gemma-2, here on Llama blocks
  (our ``layers = ["sliding", "attention"]``).

Both define the window as ours does: key ``j`` is visible from query ``i`` when ``i - W < j <= i``
(``transformers.masking_utils.sliding_window_overlay``), ``W`` keys including the query's own.

* ``Gemma2ForCausalLM`` (Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical
  Size"): the same alternation (``layer_types``, local first) on other blocks, expressed by the
  Gemma switches of :class:`GPTConfig` — ``d_head``, ``attn_scale`` (= ``query_pre_attn_scalar^-1/2``),
  ``attn_softcap``, ``final_softcap``, ``sandwich_norm``, ``embed_scale`` — and the ``"geglu"`` MLP.
  Its RMSNorms multiply by ``1 + w``; ours by ``w``: the import folds ``w' = 1 + w`` (in float32, as
  Hugging Face adds the 1 in float32) and the export unfolds ``w = w' - 1``.

``IMPORT`` maps a ``model_type`` to (config reader, tensor renamer) and ``EXPORT`` an architecture
name to an exporter, as in :mod:`scratchlm.models.hf`.
"""

from __future__ import annotations

import torch

from scratchlm.models.gpt import GPT, GPTConfig
from scratchlm.models.hf import _llama_config, _llama_from_hf, _llama_to_hf

_HF_LAYER = {"sliding": "sliding_attention", "attention": "full_attention"}
_OUR_LAYER = {theirs: ours for ours, theirs in _HF_LAYER.items()}


def _shortest_period(items: list[str]) -> list[str]:
    """The shortest prefix that repeats to ``items`` (our layer pattern repeats to ``n_layer``)."""
    n = len(items)
    for period in range(1, n + 1):
        if n % period == 0 and items == items[:period] * (n // period):
            return items[:period]
    return items


def _with_layers(hf: dict, layer_types: list[str]) -> GPTConfig:
    """A Llama-block config read from ``hf``, with one mixer per layer from HF ``layer_types``."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{hf.get('model_type')} models with hidden_act {hf['hidden_act']!r} are not supported (only silu)")
    unknown = sorted(set(layer_types) - set(_OUR_LAYER))
    if unknown:
        raise ValueError(f"layer_types {unknown} are not supported; expected {' / '.join(_OUR_LAYER)}")
    if len(layer_types) != hf["num_hidden_layers"]:
        raise ValueError(f"layer_types has {len(layer_types)} items for {hf['num_hidden_layers']} layers")
    base = _llama_config(hf).to_dict()
    layers = _shortest_period([_OUR_LAYER[t] for t in layer_types])
    sliding = "sliding" in layers
    if sliding and not hf.get("sliding_window"):
        raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
    return GPTConfig.from_dict({**base, "layers": None if layers == ["attention"] else layers,
                                "sliding_window": hf["sliding_window"] if sliding else None})


def _mistral_config(hf: dict) -> GPTConfig:
    kind = "sliding_attention" if hf.get("sliding_window") is not None else "full_attention"
    return _with_layers(hf, [kind] * hf["num_hidden_layers"])


def _ministral_config(hf: dict) -> GPTConfig:
    layer_types = hf.get("layer_types")
    if layer_types is None:  # Ministral's own default: every layer sliding when a window is set
        return _mistral_config(hf)
    return _with_layers(hf, list(layer_types))


def _layer_types(model: GPT) -> list[str]:
    kinds = model.config.layer_kinds()
    if any(mlp != "dense" or mixer not in _HF_LAYER for mixer, mlp in kinds):
        raise ValueError("Mistral / Ministral export needs every layer to be 'sliding' or 'attention' with a dense MLP")
    return [_HF_LAYER[mixer] for mixer, _ in kinds]


def _base_hf(model: GPT, architecture: str, model_type: str) -> tuple[dict, dict]:
    tensors, hf = _llama_to_hf(model)  # checks RoPE, pre-RMSNorm, SwiGLU and no biases
    for key in ("attention_bias", "mlp_bias"):  # not Mistral / Ministral config fields
        hf.pop(key)
    hf.update({"architectures": [architecture], "model_type": model_type, "attention_dropout": 0.0})
    return tensors, hf


def _mistral_to_hf(model: GPT) -> tuple[dict, dict]:
    layer_types = _layer_types(model)
    if len(set(layer_types)) > 1:
        raise ValueError("Mistral applies one window to every layer; a model mixing 'sliding' and 'attention' "
                         "layers exports as 'ministral'")
    tensors, hf = _base_hf(model, "MistralForCausalLM", "mistral")
    hf["sliding_window"] = model.config.sliding_window if layer_types[0] == "sliding_attention" else None
    return tensors, hf


def _ministral_to_hf(model: GPT) -> tuple[dict, dict]:
    layer_types = _layer_types(model)
    tensors, hf = _base_hf(model, "MinistralForCausalLM", "ministral")
    hf.update({"layer_types": layer_types, "sliding_window": model.config.sliding_window})
    return tensors, hf


# --- Gemma-2 ---------------------------------------------------------------------------------
# Gemma2Config's defaults, for a config.json that leaves a key out (an explicit null turns a cap off).
_GEMMA2_DEFAULTS = {"head_dim": 256, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
                    "final_logit_softcapping": 30.0, "sliding_window": 4096, "hidden_activation": "gelu_pytorch_tanh",
                    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")  # GELU's tanh approximation, in two spellings
# Per-layer tensors: our name, Gemma-2's; the four norms are RMSNorms of the x·(1 + w) kind.
_GEMMA2_NORMS = [("norm1", "input_layernorm"), ("post_norm1", "post_attention_layernorm"),
                 ("norm2", "pre_feedforward_layernorm"), ("post_norm2", "post_feedforward_layernorm")]


def _gemma2_config(hf: dict) -> GPTConfig:
    hf = {**_GEMMA2_DEFAULTS, **hf}
    if hf.get("attention_bias"):
        raise ValueError("Gemma-2 models with attention_bias are not supported")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("Gemma-2 with use_bidirectional_attention is an encoder, not supported (causal only)")
    activation = hf.get("hidden_activation") or hf.get("hidden_act")
    if activation not in _GELU_TANH:
        raise ValueError(f"Gemma-2 hidden_activation {activation!r} is not supported (only gelu_pytorch_tanh)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"RoPE scaling {rope.get('rope_type')!r} is not supported (only the default)")
    n_layer, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    layer_types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]
    unknown = sorted(set(layer_types) - set(_OUR_LAYER))
    if unknown or len(layer_types) != n_layer:
        raise ValueError(f"layer_types must name each of the {n_layer} layers {' or '.join(_OUR_LAYER)}; got {layer_types}")
    layers = _shortest_period([_OUR_LAYER[t] for t in layer_types])
    sliding = "sliding" in layers
    if sliding and not hf.get("sliding_window"):
        raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
    head_dim, scalar = hf["head_dim"], hf["query_pre_attn_scalar"]
    return GPTConfig(vocab_size=hf["vocab_size"], n_layer=n_layer, n_head=heads,
                     n_kv_head=hf.get("num_key_value_heads") or heads, d_model=hf["hidden_size"],
                     d_ff=hf["intermediate_size"], block_size=hf["max_position_embeddings"], position="rope",
                     rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), norm="rmsnorm",
                     norm_eps=hf["rms_norm_eps"], mlp="geglu", bias=False, tie_embeddings=hf["tie_word_embeddings"],
                     layers=None if layers == ["attention"] else layers,
                     sliding_window=hf["sliding_window"] if sliding else None,
                     d_head=None if head_dim * heads == hf["hidden_size"] else head_dim,
                     attn_scale=None if scalar == head_dim else scalar**-0.5,  # HF's scaling, to the bit
                     attn_softcap=hf["attn_logit_softcapping"], final_softcap=hf["final_logit_softcapping"],
                     sandwich_norm=True, embed_scale=True)


def _gemma2_from_hf(t: dict, c: GPTConfig) -> dict:
    def folded(w: torch.Tensor) -> torch.Tensor:  # x·(1 + w) is x·w' with w' = 1 + w, added in float32
        return 1.0 + w.float()

    out = {"tok_emb.weight": t["model.embed_tokens.weight"], "norm_f.weight": folded(t["model.norm.weight"])}
    if not c.tie_embeddings:
        out["lm_head.weight"] = t["lm_head.weight"]
    for i in range(c.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        for ours, theirs in _GEMMA2_NORMS:
            out[b + ours + ".weight"] = folded(t[h + theirs + ".weight"])
        out[b + "attn.qkv.weight"] = torch.cat([t[h + f"self_attn.{p}_proj.weight"] for p in "qkv"], dim=0)
        out[b + "attn.proj.weight"] = t[h + "self_attn.o_proj.weight"]
        for p in ("gate", "up", "down"):
            out[b + f"mlp.{p}.weight"] = t[h + f"mlp.{p}_proj.weight"]
    return out


def _gemma2_to_hf(model: GPT) -> tuple[dict, dict]:
    c = model.config
    needs = {"position": ("rope", c.position), "norm": ("rmsnorm", c.norm), "mlp": ("geglu", c.mlp),
             "bias": (False, c.bias), "prenorm": (True, c.prenorm), "sandwich_norm": (True, bool(c.sandwich_norm)),
             "embed_scale": (True, bool(c.embed_scale)), "qkv_bias": (False, bool(c.qkv_bias)),
             "qk_norm": (False, bool(c.qk_norm))}
    wrong = [f"{k} = {found!r} (needs {want!r})" for k, (want, found) in needs.items() if want != found]
    if wrong or any(mlp != "dense" or mixer not in _HF_LAYER for mixer, mlp in c.layer_kinds()):
        raise ValueError("Gemma-2 export needs RoPE, pre- and post-RMSNorms (sandwich_norm), GeGLU, scaled embeddings, "
                         "no biases and 'sliding' / 'attention' layers with dense MLPs; "
                         + ("; ".join(wrong) or "model.layers has other kinds"))
    D, H, Hkv = c.head_dim, c.n_head, c.kv_heads
    scalar = D if c.attn_scale is None else c.attn_scale**-2
    if abs(scalar - round(scalar)) > 1e-6 * scalar:  # Gemma2Config types query_pre_attn_scalar as an int
        raise ValueError(f"Gemma-2 stores the score scale as 1/sqrt(query_pre_attn_scalar) with an integer "
                         f"query_pre_attn_scalar; attn_scale = {c.attn_scale} is 1/sqrt({scalar:g})")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    def unfolded(w: torch.Tensor) -> torch.Tensor:
        return (w.float() - 1.0).contiguous()

    tensors = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": unfolded(sd["norm_f.weight"])}
    if not c.tie_embeddings:
        tensors["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(c.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        for ours, theirs in _GEMMA2_NORMS:
            tensors[h + theirs + ".weight"] = unfolded(sd[b + ours + ".weight"])
        q, k, v = sd[b + "attn.qkv.weight"].split([H * D, Hkv * D, Hkv * D], dim=0)
        tensors.update({h + "self_attn.q_proj.weight": q.contiguous(), h + "self_attn.k_proj.weight": k.contiguous(),
                        h + "self_attn.v_proj.weight": v.contiguous(),
                        h + "self_attn.o_proj.weight": sd[b + "attn.proj.weight"]})
        for p in ("gate", "up", "down"):
            tensors[h + f"mlp.{p}_proj.weight"] = sd[b + f"mlp.{p}.weight"]
    hf = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": c.vocab_size,
          "hidden_size": c.d_model, "intermediate_size": c.ff_width, "num_hidden_layers": c.n_layer,
          "num_attention_heads": H, "num_key_value_heads": Hkv, "head_dim": D, "hidden_activation": "gelu_pytorch_tanh",
          "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps,
          "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
          "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
          "query_pre_attn_scalar": round(scalar), "attn_logit_softcapping": c.attn_softcap,
          "final_logit_softcapping": c.final_softcap, "sliding_window": c.sliding_window,
          "layer_types": [_HF_LAYER[mixer] for mixer, _ in c.layer_kinds()],
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}  # Gemma's ids belong to its tokenizer
    return tensors, hf


def default_architecture(config: GPTConfig) -> str | None:
    """'gemma2' for a model with Gemma's sandwich norms and scaled embeddings; else 'mistral' for
    a model whose every layer is sliding, 'ministral' when sliding and full layers mix (with dense
    MLPs only); None otherwise (another family decides)."""
    kinds = config.layer_kinds()
    mixers = {mixer for mixer, _ in kinds}
    if config.sandwich_norm or config.embed_scale:
        return "gemma2" if mixers <= set(_HF_LAYER) and all(mlp == "dense" for _, mlp in kinds) else None
    if "sliding" not in mixers or not mixers <= set(_HF_LAYER) or any(mlp != "dense" for _, mlp in kinds):
        return None
    return "mistral" if mixers == {"sliding"} else "ministral"


IMPORT: dict = {"mistral": (_mistral_config, _llama_from_hf), "ministral": (_ministral_config, _llama_from_hf),
               "gemma2": (_gemma2_config, _gemma2_from_hf)}
EXPORT: dict = {"mistral": _mistral_to_hf, "ministral": _ministral_to_hf, "gemma2": _gemma2_to_hf}
