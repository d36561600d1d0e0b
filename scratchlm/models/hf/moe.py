"""Hugging Face interchange for Mixture-of-Experts models: Mixtral, Qwen2-MoE, Qwen3-MoE.

All three are Llama with some MLPs replaced by a softmax top-k router over SwiGLU experts
(:mod:`scratchlm.models.blocks.moe`), so the attention, norms and embeddings map as in
:mod:`scratchlm.models.hf.llama`; :data:`NAMES` adds each family's own names. What each adds:

* **Mixtral** (``MixtralForCausalLM``): every layer MoE; the top-k probabilities renormalised.
  Tensors ``block_sparse_moe.gate`` (the router) and ``block_sparse_moe.experts.{i}.w1/w3/w2``
  (gate, up, down).
* **Qwen2-MoE** (``Qwen2MoeForCausalLM``): one shared expert of its own width, scaled by
  ``sigmoid(shared_expert_gate · u)``; ``norm_topk_prob`` chooses whether to renormalise; biases on
  q, k, v only (``qkv_bias``, our ``[model.attn] qkv_bias``); layer ``i`` is MoE when
  ``(i + 1) % decoder_sparse_step == 0`` and ``i`` is not in ``mlp_only_layers``, else a dense MLP
  of ``intermediate_size`` (our per-layer pattern ``GPTConfig.layers``).
* **Qwen3-MoE** (``Qwen3MoeForCausalLM``): no shared expert; an RMSNorm on each query and key
  head before RoPE (``q_norm``, ``k_norm``; our ``[model.attn] qk_norm``).

``transformers`` 5.x holds the experts fused in memory (``experts.gate_up_proj`` (E, 2F, C),
``experts.down_proj`` (E, C, F)), but ``save_pretrained`` writes them one expert at a time, in the
legacy names above; we read either form and write the per-expert form, which ``from_pretrained``
loads.

**The load-balancing coefficient changes meaning across the boundary.** transformers'
``load_balancing_loss_func`` computes *one* loss over the router logits of all ``L`` MoE layers
concatenated, with each expert's share of assignments counted over tokens (``N·L``), not
assignments: ``coef · E · Σ_i f_i P_i`` with ``f_i = (Σ_l c_li) / (N·L)`` and ``P_i`` the mean
probability over the ``N·L`` rows. Ours is a sum of per-layer losses, ``α · E · Σ_l Σ_i
c_li/(N·k) · P_li``. The two are equal when every layer routes alike (in particular for one MoE
layer, and at perfect balance, where HF's is ``coef·k`` and ours ``α·L``) exactly when

    α = coef · k / L

(tests/models/blocks/test_moe.py checks this against transformers' function). Otherwise transformers' loss also
couples layers (layer l's load weighs layer l''s probabilities), which ours does not. The importer
converts ``router_aux_loss_coef`` to ``aux_weight`` this way, the exporter back.
"""

from __future__ import annotations

import torch

from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.hf import llama
from scratchlm.models.hf.common import cpu_state, inverse, rename, stack_experts, unstack_experts

# Per-expert tensor names of each family: (gate, up, down) under ``<mlp>.experts.{i}.``.
_EXPERT_NAMES = {
    "mixtral": ("w1", "w3", "w2"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
}
_MLP_NAME = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp", "qwen3_moe": "mlp"}
_ATTN_NORMS = {
    f"model.layers.{{}}.self_attn.{n}.weight": f"blocks.{{}}.attn.{n}.weight" for n in ("q_norm", "k_norm")
}
_SHARED = {
    **{
        f"model.layers.{{}}.mlp.shared_expert.{p}_proj.weight": f"blocks.{{}}.mlp.shared.{p}.weight"
        for p in ("gate", "up", "down")
    },
    "model.layers.{}.mlp.shared_expert_gate.weight": "blocks.{}.mlp.shared_gate.weight",
}
# Hugging Face's names -> ours, per family: Llama's (q, k, v are fused by llama.qkv_from_hf), each
# MoE layer's router, Qwen3's q/k norms, Qwen2's gated shared expert. The experts: stack_experts.
NAMES = {
    kind: {
        **llama.NAMES,
        f"model.layers.{{}}.{mlp}.gate.weight": "blocks.{}.mlp.router.weight",
        **(_SHARED if kind == "qwen2_moe" else {}),
        **(_ATTN_NORMS if kind == "qwen3_moe" else {}),
    }
    for kind, mlp in _MLP_NAME.items()
}


# --- import ---------------------------------------------------------------------------------------
def _base_config(hf: dict) -> dict:
    """The Llama part of the config (embeddings, attention, RoPE, norms) as a GPTConfig dict."""
    llama_fields = {k: v for k, v in hf.items() if k not in ("attention_bias", "mlp_bias", "head_dim")}
    head_dim = hf.get("head_dim")
    if head_dim and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise ValueError(
            f"{hf['model_type']}: head_dim {head_dim} x {hf['num_attention_heads']} heads != hidden_size "
            f"{hf['hidden_size']}; scratchlm's heads split d_model"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"{hf['model_type']}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU needs silu)"
        )
    return llama.config_from_hf(llama_fields).to_dict()


def _n_experts(hf: dict) -> int:
    """Qwen3-MoE's config.json writes ``num_experts`` as ``num_local_experts`` (an attribute alias)."""
    return hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]


def _moe_layers(hf: dict) -> list[bool]:
    """Which layers are MoE, by the Qwen rule (Mixtral: all)."""
    if hf["model_type"] == "mixtral":
        return [True] * hf["num_hidden_layers"]
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    return [
        i not in dense and _n_experts(hf) > 0 and (i + 1) % step == 0 for i in range(hf["num_hidden_layers"])
    ]


def config_from_hf(hf: dict) -> GPTConfig:
    kind = hf["model_type"]
    base = _base_config(hf)
    attn = base.setdefault("attn", {})  # [model.attn]: the head width Llama's reader found, and what follows
    mixer = "attention"
    if kind == "mixtral":
        experts, width = hf["num_local_experts"], hf["intermediate_size"]
        moe = dict(normalize=True)
        window = hf.get("sliding_window")
        if window is not None and window < hf["max_position_embeddings"]:
            mixer, attn["window"] = "sliding", window  # Mistral's window: W keys, the query's own included
    else:
        if hf.get("use_sliding_window"):
            raise ValueError(f"{kind}: use_sliding_window is not supported")
        experts, width = _n_experts(hf), hf["moe_intermediate_size"]
        moe = dict(normalize=bool(hf.get("norm_topk_prob", False)))
    if kind == "qwen2_moe":
        moe.update(n_shared=1, d_shared=hf["shared_expert_intermediate_size"], shared_gate=True)
        attn["qkv_bias"] = bool(hf.get("qkv_bias", True))
    if kind == "qwen3_moe":
        if hf.get("attention_bias"):
            raise ValueError("qwen3_moe: attention_bias (on q, k, v and o) is not supported")
        attn["qk_norm"] = True
    layers = [f"{mixer}+moe" if sparse else mixer for sparse in _moe_layers(hf)]
    coef = float(hf.get("router_aux_loss_coef", 0.001))  # transformers' default for all three families
    moe.update(
        n_experts=experts,
        top_k=hf["num_experts_per_tok"],
        d_expert=width,
        aux_weight=aux_weight_from_hf(coef, hf["num_experts_per_tok"], sum(_moe_layers(hf))),
    )
    base["layers"] = layers[:1] if len(set(layers)) == 1 else layers  # one item repeats to every layer
    if any(_moe_layers(hf)):  # a config whose every layer is dense (mlp_only_layers) has no MoE table
        base["moe"] = moe
    return GPTConfig.from_dict(base)


def from_hf(t: dict, c: GPTConfig, kind: str) -> dict:
    """Their tensors -> our state dict: Llama's renames and fused q, k, v, the family's names
    (:data:`NAMES`), and each MoE layer's experts stacked."""
    out = llama.from_hf(t, c, NAMES[kind])
    for i in _moe_layer_numbers(c):
        theirs = f"model.layers.{i}.{_MLP_NAME[kind]}."
        out.update(stack_experts(t, theirs, f"blocks.{i}.mlp.", _EXPERT_NAMES[kind], c.moe.n_experts))
        out[f"blocks.{i}.mlp.router_bias"] = torch.zeros(c.moe.n_experts)  # none of these families has one
    return out


def _moe_layer_numbers(c: GPTConfig) -> list[int]:
    return [i for i, (_, mlp) in enumerate(c.layer_kinds()) if mlp == "moe"]


def aux_weight_from_hf(coef: float, top_k: int, moe_layers: int) -> float:
    """Our per-layer ``aux_weight`` α for transformers' ``router_aux_loss_coef`` (see the module
    docstring): α = coef · k / L, equal losses whenever the L MoE layers route alike."""
    return coef * top_k / max(moe_layers, 1)


def aux_weight_to_hf(aux_weight: float, top_k: int, moe_layers: int) -> float:
    """transformers' ``router_aux_loss_coef`` for our ``aux_weight``: the inverse of :func:`aux_weight_from_hf`."""
    return aux_weight * max(moe_layers, 1) / top_k


# --- export ---------------------------------------------------------------------------------------
def problems(c: GPTConfig, model: GPT | None = None, *, kind: str) -> list[str]:
    """What of ``c`` the ``kind`` family cannot hold, one line per property (with ``model``, also
    what of its weights: a router's selection bias)."""
    m = c.moe
    found = []
    if (c.position, c.norm, c.bias, c.mlp, c.prenorm) != ("rope", "rmsnorm", False, "swiglu", True):
        found.append(
            f"model.position/norm/mlp/bias = {c.position!r}/{c.norm!r}/{c.mlp!r}/{c.bias} "
            f"({kind} needs RoPE, pre-RMSNorm, SwiGLU and no biases)"
        )
    mixers = {"attention", "sliding"} if kind == "mixtral" else {"attention"}
    kinds = c.layer_kinds()
    if any(mixer not in mixers for mixer, _ in kinds) or len({mixer for mixer, _ in kinds}) > 1:
        found.append(
            f"model.layers = {c.layers} ({kind} needs every layer's mixer {' or '.join(sorted(mixers))}, one kind)"
        )
    if m is None or all(mlp != "moe" for _, mlp in kinds):
        found.append(f"model.layers = {c.layers} ({kind} needs MoE layers: '+moe')")
    elif kind == "mixtral" and any(mlp != "moe" for _, mlp in kinds):
        found.append(f"model.layers = {c.layers} (mixtral needs every layer MoE)")
    if m is not None:
        if m.router != "softmax" or m.n_groups != 1 or m.routed_scale != 1.0:
            found.append(
                f"model.moe router = {m.router!r} ({kind} needs a softmax router without groups or routed_scale)"
            )
        if kind == "mixtral" and not m.normalize:
            found.append("model.moe.normalize = false (mixtral needs renormalised top-k weights)")
        if kind == "qwen2_moe" and not (m.n_shared and m.shared_gate):
            found.append(
                "model.moe.n_shared / shared_gate (qwen2_moe needs a gated shared expert: n_shared >= 1, shared_gate)"
            )
        if kind != "qwen2_moe" and m.n_shared:
            found.append(f"model.moe.n_shared = {m.n_shared} ({kind} has no shared experts)")
        if model is not None and any(
            block.mlp.router_bias.abs().max() > 0
            for block in model.blocks
            if hasattr(block.mlp, "router_bias")
        ):
            found.append(
                "a nonzero router_bias (a loss-free-balanced model needs a format with "
                "e_score_correction_bias, e.g. DeepSeek-V3; the MoE families need a zero router_bias)"
            )
    if bool(c.attn.qk_norm) != (kind == "qwen3_moe"):
        found.append(
            "model.attn.qk_norm unset (qwen3_moe needs it)"
            if kind == "qwen3_moe"
            else f"model.attn.qk_norm = true ({kind} has no q/k norms)"
        )
    if c.attn.qkv_bias and kind != "qwen2_moe":
        found.append(f"model.attn.qkv_bias = true ({kind} has no q/k/v biases)")
    return found


def to_hf(model: GPT, kind: str) -> tuple[dict, dict]:
    """Our MoE model -> the ``kind`` family's tensors and config.json."""
    found = problems(model.config, model, kind=kind)
    if found:
        raise ValueError(f"{kind} export cannot hold this model: " + "; ".join(found))
    c, m = model.config, model.config.moe
    sd = cpu_state(model)
    if c.tie_embeddings:
        sd.pop("lm_head.weight")
    D, H, Hkv = c.head_dim, c.n_head, c.kv_heads
    tensors = {**rename(sd, inverse(NAMES[kind])), **llama.qkv_to_hf(sd, c)}  # router_bias (0) stays behind
    for i in _moe_layer_numbers(c):
        tensors.update(
            unstack_experts(
                sd, f"blocks.{i}.mlp.", f"model.layers.{i}.{_MLP_NAME[kind]}.", _EXPERT_NAMES[kind]
            )
        )
    dense_layers = [i for i, (_, mlp) in enumerate(c.layer_kinds()) if mlp == "dense"]
    width = m.d_expert or c.ff_width
    architecture = {
        "mixtral": "MixtralForCausalLM",
        "qwen2_moe": "Qwen2MoeForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM",
    }[kind]
    hf = {
        "architectures": [architecture],
        "model_type": kind,
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": H,
        "num_key_value_heads": Hkv,
        "head_dim": D,
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "num_experts_per_tok": m.top_k,
        "router_aux_loss_coef": aux_weight_to_hf(m.aux_weight, m.top_k, c.n_layer - len(dense_layers)),
        "attention_dropout": 0.0,
    }
    if kind == "mixtral":
        hf.update(
            intermediate_size=width,
            num_local_experts=m.n_experts,
            router_jitter_noise=0.0,
            sliding_window=c.attn.window if c.layer_kinds()[0][0] == "sliding" else None,
        )
    else:
        hf.update(
            intermediate_size=c.ff_width,
            moe_intermediate_size=width,
            num_experts=m.n_experts,
            norm_topk_prob=m.normalize,
            decoder_sparse_step=1,
            mlp_only_layers=dense_layers,
            use_sliding_window=False,
        )
    if kind == "qwen2_moe":
        hf.update(
            shared_expert_intermediate_size=m.d_shared or m.n_shared * width, qkv_bias=bool(c.attn.qkv_bias)
        )
    if kind == "qwen3_moe":
        hf["attention_bias"] = False
    return tensors, hf


def default_architecture(config: GPTConfig) -> str | None:
    """The family an MoE model of attention layers exports to by default (None: not ours)."""
    kinds = config.layer_kinds()
    m = config.moe
    if m is None or all(mlp != "moe" for _, mlp in kinds) or m.router != "softmax" or m.n_groups != 1:
        return None
    if any(mixer not in ("attention", "sliding") for mixer, _ in kinds):  # MLA, Mamba: not these families
        return None
    if m.shared_gate:
        return "qwen2_moe"
    if config.attn.qk_norm:
        return "qwen3_moe"
    return "mixtral"
