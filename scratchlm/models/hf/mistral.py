"""Hugging Face interchange for sliding-window attention on Llama blocks: Mistral and Ministral.

Both are Llama blocks (RMSNorm, SwiGLU, RoPE, GQA, no biases, the same tensor names) with a
sliding window, so the tensors go through :mod:`scratchlm.models.hf.llama` and only the config
differs:

* ``MistralForCausalLM``: ``sliding_window = W`` applies to every layer (our ``layers =
  ["sliding"]``); ``sliding_window = None`` is plain causal attention (our default layers).
* ``MinistralForCausalLM``: ``layer_types`` names each layer ``"sliding_attention"`` or
  ``"full_attention"`` — the alternating local/global pattern of Gemma-2, here on Llama blocks
  (our ``layers = ["sliding", "attention"]``).

Both define the window as ours does: key ``j`` is visible from query ``i`` when ``i - W < j <= i``
(``transformers.masking_utils.sliding_window_overlay``), ``W`` keys including the query's own.
Gemma-2, the same alternation on other blocks, is :mod:`scratchlm.models.hf.gemma`.
"""

from __future__ import annotations

from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.hf import llama
from scratchlm.models.hf.common import shortest_period

# Hugging Face's layer_types <-> our mixer kinds (Ministral and Gemma-2 name them alike).
HF_LAYER_TYPES = {"sliding": "sliding_attention", "attention": "full_attention"}
OUR_LAYER_TYPES = {theirs: ours for ours, theirs in HF_LAYER_TYPES.items()}


def _with_layers(hf: dict, layer_types: list[str]) -> GPTConfig:
    """A Llama-block config read from ``hf``, with one mixer per layer from HF ``layer_types``."""
    unknown = sorted(set(layer_types) - set(OUR_LAYER_TYPES))
    if unknown:
        raise ValueError(f"layer_types {unknown} are not supported; expected {' / '.join(OUR_LAYER_TYPES)}")
    if len(layer_types) != hf["num_hidden_layers"]:
        raise ValueError(f"layer_types has {len(layer_types)} items for {hf['num_hidden_layers']} layers")
    base = llama.config_from_hf(hf).to_dict()
    layers = shortest_period([OUR_LAYER_TYPES[t] for t in layer_types])
    sliding = "sliding" in layers
    if sliding and not hf.get("sliding_window"):
        raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
    attn = {**base.get("attn", {}), "window": hf["sliding_window"] if sliding else None}
    return GPTConfig.from_dict({**base, "layers": None if layers == ["attention"] else layers, "attn": attn})


def mistral_config(hf: dict) -> GPTConfig:
    kind = "sliding_attention" if hf.get("sliding_window") is not None else "full_attention"
    return _with_layers(hf, [kind] * hf["num_hidden_layers"])


def ministral_config(hf: dict) -> GPTConfig:
    layer_types = hf.get("layer_types")
    if layer_types is None:  # Ministral's own default: every layer sliding when a window is set
        return mistral_config(hf)
    return _with_layers(hf, list(layer_types))


def problems(c: GPTConfig, kind: str) -> list[str]:
    """What of ``c`` Mistral or Ministral (``kind``) cannot hold, one line per property."""
    found = llama.block_problems(c, kind, tuple(HF_LAYER_TYPES))
    mixers = {mixer for mixer, _ in c.layer_kinds()}
    if kind == "mistral" and not found and len(mixers) > 1:
        found.append(
            f"model.layers = {c.layers} (Mistral applies one window to every layer; a model mixing "
            "'sliding' and 'attention' layers exports as 'ministral')"
        )
    return found


def _layer_types(model: GPT) -> list[str]:
    return [HF_LAYER_TYPES[mixer] for mixer, _ in model.config.layer_kinds()]


def _base_hf(model: GPT, architecture: str, model_type: str) -> tuple[dict, dict]:
    tensors, hf = llama.to_hf(model)
    for key in ("attention_bias", "mlp_bias"):  # not Mistral / Ministral config fields
        hf.pop(key)
    hf.update({"architectures": [architecture], "model_type": model_type, "attention_dropout": 0.0})
    return tensors, hf


def mistral_to_hf(model: GPT) -> tuple[dict, dict]:
    layer_types = _layer_types(model)
    tensors, hf = _base_hf(model, "MistralForCausalLM", "mistral")
    hf["sliding_window"] = model.config.attn.window if layer_types[0] == "sliding_attention" else None
    return tensors, hf


def ministral_to_hf(model: GPT) -> tuple[dict, dict]:
    layer_types = _layer_types(model)
    tensors, hf = _base_hf(model, "MinistralForCausalLM", "ministral")
    hf.update({"layer_types": layer_types, "sliding_window": model.config.attn.window})
    return tensors, hf


def default_architecture(config: GPTConfig) -> str | None:
    """'mistral' for a model whose every layer is sliding, 'ministral' when sliding and full layers
    mix (dense MLPs only, no Gemma switches); None otherwise (another family decides)."""
    kinds = config.layer_kinds()
    mixers = {mixer for mixer, _ in kinds}
    if config.sandwich_norm or config.embed_scale:
        return None  # Gemma-2's switches: hf/gemma.py decides
    if (
        "sliding" not in mixers
        or not mixers <= set(HF_LAYER_TYPES)
        or any(mlp != "dense" for _, mlp in kinds)
    ):
        return None
    return "mistral" if mixers == {"sliding"} else "ministral"
