"""Hugging Face interchange for sliding-window attention: Mistral and Ministral (issue 9).

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

``IMPORT`` maps a ``model_type`` to (config reader, tensor renamer) and ``EXPORT`` an architecture
name to an exporter, as in :mod:`scratchlm.models.hf`.
"""

from __future__ import annotations

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


def default_architecture(config: GPTConfig) -> str | None:
    """'mistral' for a model whose every layer is sliding, 'ministral' when sliding and full
    layers mix (with dense MLPs only); None otherwise (another family decides)."""
    kinds = config.layer_kinds()
    mixers = {mixer for mixer, _ in kinds}
    if "sliding" not in mixers or not mixers <= set(_HF_LAYER) or any(mlp != "dense" for _, mlp in kinds):
        return None
    return "mistral" if mixers == {"sliding"} else "ministral"


IMPORT: dict = {"mistral": (_mistral_config, _llama_from_hf), "ministral": (_ministral_config, _llama_from_hf)}
EXPORT: dict = {"mistral": _mistral_to_hf, "ministral": _ministral_to_hf}
