"""Interchange with Hugging Face: GPT-2 (``GPT2LMHeadModel``) and Llama (``LlamaForCausalLM``).

A Hugging Face model folder is ``config.json`` + ``model.safetensors``. Importing maps its config
to a :class:`GPTConfig` and renames (and, for GPT-2, transposes) its tensors into ours; exporting
does the reverse, so ``transformers`` loads the folder with ``from_pretrained`` and gives the
same logits. Nothing is downloaded: you bring the folder.

Two conventions worth knowing:

* GPT-2 stores linear layers as ``Conv1D`` with weights ``(in, out)``; ours are ``(out, in)``.
  Its q, k, v projections are already fused (``c_attn``), like ours.
* Llama keeps q, k, v separate; we concatenate them into one fused projection. Its RoPE uses
  the "rotate half" pairing (dimension i with i + D/2), as ours does, so no permutation is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from scratchlm.io import atomic_write
from scratchlm.models.gpt import GPT, GPTConfig


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        tensors = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(load_file(str(folder / shard)))
        return tensors
    raise FileNotFoundError(f"{folder}: no model.safetensors (or index); only safetensors folders are read, never pickles")


def _gpt2_config(hf: dict) -> GPTConfig:
    activation = hf.get("activation_function", "gelu_new")
    mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu2"}.get(activation)
    if mlp is None or activation == "relu":
        raise ValueError(f"GPT-2 activation {activation!r} is not supported")
    return GPTConfig(vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=hf["n_embd"],
                     d_ff=hf.get("n_inner") or 4 * hf["n_embd"], block_size=hf["n_positions"], position="learned",
                     norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp=mlp, bias=True,
                     tie_embeddings=hf.get("tie_word_embeddings", True))


def _llama_config(hf: dict) -> GPTConfig:
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("Llama models with attention_bias or mlp_bias are not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"RoPE scaling {rope.get('rope_type')!r} is not supported (only the default)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    d_head = head_dim if head_dim * hf["num_attention_heads"] != hf["hidden_size"] else None  # heads wider or narrower
    return GPTConfig(d_head=d_head, vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                     n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], d_model=hf["hidden_size"],
                     d_ff=hf["intermediate_size"], block_size=hf["max_position_embeddings"], position="rope",
                     rope_theta=float(theta), norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
                     bias=False, tie_embeddings=hf.get("tie_word_embeddings", False))


# Families in their own modules (one per block kind's models), each with IMPORT / EXPORT tables
# like the two below and an optional ``default_architecture(config)``.
_FAMILY_MODULES = ("hf_moe", "hf_deepseek", "hf_attention", "hf_diff", "hf_ssm")


def _families() -> tuple[dict, dict, list]:
    """model_type -> (config reader, tensor renamer); architecture -> exporter; default pickers."""
    import importlib

    importers = {"gpt2": (_gpt2_config, _gpt2_from_hf), "llama": (_llama_config, _llama_from_hf)}
    exporters = {"gpt2": _gpt2_to_hf, "llama": _llama_to_hf}
    pickers = []
    for name in _FAMILY_MODULES:
        module = importlib.import_module(f"scratchlm.models.{name}")
        importers.update(module.IMPORT)
        exporters.update(module.EXPORT)
        if hasattr(module, "default_architecture"):
            pickers.append(module.default_architecture)
    return importers, exporters, pickers


def config_from_hf(hf: dict) -> GPTConfig:
    """Our config for a Hugging Face ``config.json`` (as a dict)."""
    importers = _families()[0]
    model_type = hf.get("model_type")
    if model_type not in importers:
        raise ValueError(f"model_type {model_type!r} is not supported; scratchlm imports {', '.join(sorted(importers))}")
    return importers[model_type][0](hf)


def import_hf(folder: str | Path) -> GPT:
    """Build our model from a Hugging Face folder (GPT-2, Llama, or a family in ``_FAMILY_MODULES``)."""
    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text())
    config = config_from_hf(hf)
    tensors = _read_hf_tensors(folder)
    ours = _families()[0][hf["model_type"]][1](tensors, config)
    model = GPT(config)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{folder}: tensors do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()


# Per-block GPT-2 tensors: (our name, GPT-2's name, stored transposed as Conv1D?).
_GPT2_BLOCK = [("norm1", "ln_1", False), ("norm2", "ln_2", False), ("attn.qkv", "attn.c_attn", True),
               ("attn.proj", "attn.c_proj", True), ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True)]


def _gpt2_from_hf(t: dict, c: GPTConfig) -> dict:
    t = {k.removeprefix("transformer."): v for k, v in t.items()}
    out = {"tok_emb.weight": t["wte.weight"], "pos_emb.weight": t["wpe.weight"],
           "norm_f.weight": t["ln_f.weight"], "norm_f.bias": t["ln_f.bias"]}
    if not c.tie_embeddings:
        out["lm_head.weight"] = t["lm_head.weight"]
    for i in range(c.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ours, theirs, transpose in _GPT2_BLOCK:
            weight = t[h + theirs + ".weight"]
            out[b + ours + ".weight"] = weight.T.contiguous() if transpose else weight
            out[b + ours + ".bias"] = t[h + theirs + ".bias"]
    return out


def _llama_from_hf(t: dict, c: GPTConfig) -> dict:
    out = {"tok_emb.weight": t["model.embed_tokens.weight"], "norm_f.weight": t["model.norm.weight"]}
    if not c.tie_embeddings:
        out["lm_head.weight"] = t["lm_head.weight"]
    for i in range(c.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        out[b + "norm1.weight"] = t[h + "input_layernorm.weight"]
        out[b + "norm2.weight"] = t[h + "post_attention_layernorm.weight"]
        out[b + "attn.qkv.weight"] = torch.cat([t[h + f"self_attn.{p}_proj.weight"] for p in "qkv"], dim=0)
        out[b + "attn.proj.weight"] = t[h + "self_attn.o_proj.weight"]
        for p in ("gate", "up", "down"):
            out[b + f"mlp.{p}.weight"] = t[h + f"mlp.{p}_proj.weight"]
    return out


def _gpt2_to_hf(model: GPT) -> tuple[dict, dict]:
    c = model.config
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if (c.position, c.norm, c.bias, c.mlp, c.prenorm, c.kv_heads) != ("learned", "layernorm", True, c.mlp, True, c.n_head) \
            or c.mlp not in ("gelu", "gelu_tanh"):
        raise ValueError("GPT-2 export needs learned positions, pre-LayerNorm with biases, GELU, and full MHA")
    tensors = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
               "transformer.ln_f.weight": sd["norm_f.weight"], "transformer.ln_f.bias": sd["norm_f.bias"]}
    if not c.tie_embeddings:
        tensors["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(c.n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ours, theirs, transpose in _GPT2_BLOCK:
            weight = sd[b + ours + ".weight"]
            tensors[h + theirs + ".weight"] = weight.T.contiguous() if transpose else weight
            tensors[h + theirs + ".bias"] = sd[b + ours + ".bias"]
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
          "n_positions": c.block_size, "n_embd": c.d_model, "n_layer": c.n_layer, "n_head": c.n_head,
          "n_inner": c.ff_width, "activation_function": "gelu_new" if c.mlp == "gelu_tanh" else "gelu",
          "layer_norm_epsilon": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    return tensors, hf


def _llama_to_hf(model: GPT) -> tuple[dict, dict]:
    c = model.config
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if (c.position, c.norm, c.bias, c.mlp, c.prenorm) != ("rope", "rmsnorm", False, "swiglu", True):
        raise ValueError("Llama export needs RoPE, pre-RMSNorm, SwiGLU and no biases")
    D, H, Hkv = c.head_dim, c.n_head, c.kv_heads
    tensors = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm_f.weight"]}
    if not c.tie_embeddings:
        tensors["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(c.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        q, k, v = sd[b + "attn.qkv.weight"].split([H * D, Hkv * D, Hkv * D], dim=0)
        tensors.update({h + "input_layernorm.weight": sd[b + "norm1.weight"],
                        h + "post_attention_layernorm.weight": sd[b + "norm2.weight"],
                        h + "self_attn.q_proj.weight": q.contiguous(), h + "self_attn.k_proj.weight": k.contiguous(),
                        h + "self_attn.v_proj.weight": v.contiguous(), h + "self_attn.o_proj.weight": sd[b + "attn.proj.weight"]})
        for p in ("gate", "up", "down"):
            tensors[h + f"mlp.{p}_proj.weight"] = sd[b + f"mlp.{p}.weight"]
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
          "hidden_size": c.d_model, "intermediate_size": c.ff_width, "num_hidden_layers": c.n_layer,
          "num_attention_heads": H, "num_key_value_heads": Hkv, "head_dim": D, "max_position_embeddings": c.block_size,
          "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
          "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
          "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}
    return tensors, hf


def export_hf(model: GPT, folder: str | Path, architecture: str | None = None, tokenizer=None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers`` loads (GPT-2, Llama, or
    a family in ``_FAMILY_MODULES``); with ``tokenizer``, also the tokenizer in Hugging Face form
    (with the chat template of a chat tokenizer) and a ``generation_config.json`` whose end of
    sequence is the end of a turn."""
    c = model.config
    _, exporters, pickers = _families()
    if architecture is None:
        architecture = next((a for pick in pickers if (a := pick(c))), None) or ("llama" if c.position == "rope" else "gpt2")
    if architecture not in exporters:
        raise ValueError(f"architecture must be one of {', '.join(sorted(exporters))}, got {architecture!r}")
    if architecture in ("gpt2", "llama") and any(kind != ("attention", "dense") for kind in c.layer_kinds()):
        raise ValueError(f"{architecture} export needs every layer to be attention + a dense MLP")
    # Switches only some formats can hold: refuse the others, never drop a switch silently.
    gemma = [k for k in ("attn_scale", "attn_softcap", "final_softcap", "sandwich_norm", "embed_scale") if getattr(c, k)]
    gemma += ["d_head"] if c.d_head is not None and c.d_head * c.n_head != c.d_model else []
    if gemma and architecture != "gemma2":
        raise ValueError(f"{architecture} export cannot express model.{', model.'.join(gemma)}; export as 'gemma2'")
    for switch, formats in (("qkv_bias", ("qwen2_moe",)), ("qk_norm", ("qwen3_moe",))):
        if getattr(c, switch) and architecture not in formats:
            raise ValueError(f"{architecture} export cannot express model.{switch}; formats that can: {', '.join(formats)}")
    tensors, hf = exporters[architecture](model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / "model.safetensors") as f:
        from safetensors.torch import save

        f.write(save(tensors, metadata={"format": "pt"}))
    if tokenizer is not None:
        from scratchlm.tokenizers.chat import IM_END
        from scratchlm.tokenizers.hf import save_hf_tokenizer

        if tokenizer.vocab_size > c.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, the model {c.vocab_size}: not its tokenizer")
        save_hf_tokenizer(tokenizer, folder, model_max_length=c.block_size)
        specials = tokenizer.special_tokens
        eos = specials.get(IM_END, tokenizer.eot_token)
        hf.update({"eos_token_id": eos, "bos_token_id": None, "pad_token_id": tokenizer.eot_token})
        with atomic_write(folder / "generation_config.json", "w") as f:
            json.dump({"eos_token_id": eos, "pad_token_id": tokenizer.eot_token, "bos_token_id": None}, f, indent=1)
    with atomic_write(folder / "config.json", "w") as f:
        json.dump({**hf, "torch_dtype": "float32"}, f, indent=1)
    return folder
